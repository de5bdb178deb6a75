"""Reconstruct-and-discriminate (DRAEM; Zavrtanik, Kristan, Skocaj, ICCV 2021), sized for a CPU.

* Reconstructive subnetwork: the suite's U-Net-width autoencoder *without* skips (a skip would
  copy the defect through), trained to restore the good image from a synthesized defective one
  (L2 + SSIM).
* Discriminative subnetwork: a small U-Net on ``[image, reconstruction]`` that outputs the
  defect mask (focal loss on a 2-class softmax).
* Training data: good images only; half of each batch gets a synthetic defect from
  :mod:`defectkit.datasets.defect_synth` (Perlin blobs, scratches, CutPaste, scars; foreign
  textures from other good images or procedural ones; opacity in (0.2, 1]; on objects, only on
  the part), the other half stays unaltered with an empty mask, as DRAEM does.  Inputs stay in
  [0, 1]: no ImageNet normalisation (anomalib's DRAEM lost accuracy to it: PR #1431, #1813).
* Anomaly map: the softmax defect channel, mean-filtered (DRAEM's 21x21 at 256 px, scaled to the
  input size); image score: the maximum of that map (``--topk max``, the default for draem).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectkit.anomaly.blocks import down, up, widths
from defectkit.anomaly.models import UNetAE
from defectkit.anomaly.scoring import AnomalyHead, Scorer
from defectkit.core.training import rng as stream_rng


class SegUNet(nn.Module):
    """A small U-Net with every skip: ``(B, cin, H, W)`` -> ``(B, 2, H, W)`` logits."""

    def __init__(self, cin: int, base: int = 16, depth: int = 4):
        super().__init__()
        w = widths(base, depth)
        self.stem = nn.Sequential(nn.Conv2d(cin, base, 3, 1, 1), nn.BatchNorm2d(base), nn.ReLU(True))
        self.downs = nn.ModuleList(down(a, b) for a, b in zip([base, *w[:-1]], w, strict=True))
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        chans = [base, *w[:-1]]  # resolution of each skip, shallow to deep
        for i in range(depth):
            cin_up = w[depth - 1 - i] if i == 0 else chans[depth - i]
            self.ups.append(up(cin_up, chans[depth - 1 - i]))
            self.fuse.append(nn.Conv2d(2 * chans[depth - 1 - i], chans[depth - 1 - i], 3, 1, 1))
        self.head = nn.Conv2d(base, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = [x]
        for d in self.downs:
            x = d(x)
            skips.append(x)
        x = skips.pop()
        for stage, fuse in zip(self.ups, self.fuse, strict=True):
            x = stage(x)
            x = F.relu(fuse(torch.cat([x, skips.pop()], 1)))
        return self.head(x)


class Draem(nn.Module):
    """``forward(x)`` is the reconstruction (so plots and latents work as for autoencoders);
    :meth:`segment` gives the defect logits; :meth:`anomaly_map` the per-pixel defect probability."""

    def __init__(self, in_ch: int = 3, base: int = 16, depth: int = 4, latent: int = 64):
        super().__init__()
        self.recon = UNetAE(in_ch, base, depth, latent, skips=())
        self.seg = SegUNet(2 * in_ch, base, depth)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.recon.encode(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.recon(x)

    def segment(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return self.seg(torch.cat([x, recon], 1))

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.segment(x, self.recon(x)), 1)[:, 1]


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al.) of 2-class logits ``(B, 2, H, W)`` against a ``(B, H, W)`` 0/1 mask."""
    logp = F.log_softmax(logits, 1)
    t = target.long()
    logp_t = logp.gather(1, t[:, None])[:, 0]
    return (-(1 - logp_t.exp()) ** gamma * logp_t).mean()


class DraemObjective:
    """One training step's loss: synthesize defects on half the batch, reconstruct, segment.

    Each sample's defect is drawn from its own ``defect`` stream (seed, epoch, the sample's key:
    its position in the epoch), so the same sample gets the same defect in one process or across
    DDP processes, and after a resume."""

    def __init__(self, synthesizer, ssim_lambda: float = 1.0, seed: int = 0):
        self.synth, self.ssim_lambda = synthesizer, ssim_lambda
        self.seed, self.epoch = seed, 0

    def reseed(self, seed: int, epoch: int) -> None:
        self.seed, self.epoch = seed, epoch

    def corrupt(self, x: np.ndarray, keys=None) -> tuple[np.ndarray, np.ndarray]:
        """``(B, C, H, W)`` good images -> images with defects on about half of them, and masks."""
        keys = range(len(x)) if keys is None else [int(k) for k in keys]
        out, masks = x.copy(), np.zeros((len(x), *x.shape[2:]), np.float32)
        for i, (img, key) in enumerate(zip(x, keys, strict=True)):
            rng = stream_rng(self.seed, self.epoch, "defect", key)
            if rng.random() < 0.5:
                continue  # DRAEM keeps half the samples unaltered, with an empty mask
            painted, m, _ = self.synth(np.ascontiguousarray(img.transpose(1, 2, 0)), rng)
            out[i], masks[i] = painted.transpose(2, 0, 1), m
        return out, masks

    def __call__(self, model: Draem, x: torch.Tensor, keys=None) -> torch.Tensor:
        import kornia

        aug, masks = self.corrupt(x.detach().cpu().numpy(), keys)
        aug_t = torch.from_numpy(aug).to(x.device)
        recon = model(aug_t)
        l2 = torch.mean((recon - x) ** 2)
        dssim = 2 * kornia.losses.ssim_loss(recon, x, window_size=11)
        seg = model.segment(aug_t, recon)
        return l2 + self.ssim_lambda * dssim + focal_loss(seg, torch.from_numpy(masks).to(x.device))


def build_synthesizer(train_x: np.ndarray, max_others: int = 64):
    """A synthesizer for ``(N, C, H, W)`` training inputs: foreground mode estimated from them,
    foreign textures taken from them."""
    from defectkit.datasets.defect_synth import Synthesizer, estimate_foreground

    hwc = [np.ascontiguousarray(a.transpose(1, 2, 0)) for a in train_x[:max_others]]
    return Synthesizer(estimate_foreground(hwc), others=hwc)


def mean_filter_size(imgsz: int) -> int:
    """DRAEM's 21x21 mean filter at 256 px, scaled to the input size (odd, at least 3)."""
    k = max(3, int(round(21 * imgsz / 256)))
    return k if k % 2 else k + 1


class DraemScorer(Scorer):
    """Maps (softmax defect channel, mean-filtered) and image scores (max, or top-k % mean), through the
    same :class:`~defectkit.anomaly.scoring.AnomalyHead` that predict and the ONNX export run."""

    def __init__(self, model: Draem, imgsz: int, topk: float | str = "max", device: str = "cpu", batch: int = 16):
        head = AnomalyHead(model, "draem", topk=topk, kernel=mean_filter_size(imgsz))
        super().__init__(model, topk=topk, device=device, batch=batch, head=head)
        self.kernel = head.kernel
