"""Frozen ImageNet features: One-Class SVM on pooled features, and PatchCore-style patch memory.

Backbone weights come from a local file (``--backbone-weights``) or torchvision's cache
(``$TORCH_HOME/hub/checkpoints``); nothing is downloaded.  ``--random-init`` builds an untrained
backbone for tests, and its results mean nothing about the method.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from defectkit.anomaly.config import FeatureConfig
from defectkit.core.errors import ConfigError, MissingFileError

# torchvision's file names for the ImageNet weights it would download
WEIGHT_FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-11ad3fa6.pth",
                "wide_resnet50_2": "wide_resnet50_2-9ba9bcbe.pth"}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load_backbone(name: str, weights: Path | None = None, random_init: bool = False):
    """A torchvision ResNet with ImageNet weights read from disk.

    Raises ``FileNotFoundError`` naming where the weights were looked for and how to get them.
    """
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if random_init:
        return net.eval()
    candidates = [weights] if weights else []
    hub = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHT_FILES[name]
    candidates.append(hub)
    for c in candidates:
        if c is not None and Path(c).is_file():
            net.load_state_dict(torch.load(c, map_location="cpu", weights_only=True))
            return net.eval()
    raise MissingFileError(
        f"ImageNet weights for {name} not found (looked at {', '.join(str(c) for c in candidates if c)}). "
        f"This machine cannot download them: copy {WEIGHT_FILES[name]} from a machine where torchvision has it "
        f"(~/.cache/torch/hub/checkpoints) and pass --backbone-weights PATH, or use --random-init for a smoke test."
    )


class _Features:
    def __init__(self, cfg: FeatureConfig, device: str):
        self.net = load_backbone(cfg.backbone, cfg.backbone_weights, cfg.random_init).to(device)
        self.device = device
        self.size = cfg.imgsz
        self.batch = 16

    def _prep(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).to(self.device)
        if t.shape[1] == 1:
            t = t.repeat(1, 3, 1, 1)
        return (t - MEAN.to(self.device)) / STD.to(self.device)

    @torch.no_grad()
    def layers(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        l1 = n.layer1(x)
        l2 = n.layer2(l1)
        l3 = n.layer3(l2)
        return l1, l2, l3, n.layer4(l3)

    def _batches(self, x: np.ndarray):
        for i in range(0, len(x), self.batch):
            yield self._prep(x[i : i + self.batch])

    def image_scores(self, maps: np.ndarray) -> np.ndarray:
        return self._image_scores_from_maps(maps)


class OCSVMScorer(_Features):
    """Global-average-pooled layer2-4 features, standardised, scored by ``-decision_function``
    of a One-Class SVM (scikit-learn).  Image level only: maps are constant per image."""

    def fit(self, x: np.ndarray) -> None:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import OneClassSVM

        self.svm = make_pipeline(StandardScaler(), OneClassSVM(nu=0.1, gamma="scale")).fit(self._pooled(x))

    @torch.no_grad()
    def _pooled(self, x: np.ndarray) -> np.ndarray:
        out = []
        for t in self._batches(x):
            _, l2, l3, l4 = self.layers(t)
            out.append(torch.cat([f.mean(dim=(2, 3)) for f in (l2, l3, l4)], 1).cpu().numpy())
        return np.concatenate(out)

    def maps(self, x: np.ndarray) -> np.ndarray:
        s = -self.svm.decision_function(self._pooled(x))
        return np.repeat(s[:, None, None], self.size, 1).repeat(self.size, 2).astype(np.float32)

    def _image_scores_from_maps(self, maps: np.ndarray) -> np.ndarray:
        return maps[:, 0, 0].astype(np.float64)


class PatchCoreScorer(_Features):
    """PatchCore (Roth et al. 2022), compact: layer2 + layer3 features, 3x3 local averaging,
    layer3 upsampled to layer2's grid and concatenated; a greedy k-centre coreset of the training
    patches (after a random projection, as in the paper) is the memory bank; a patch's score is its
    distance to the nearest memory patch; maps are upsampled and Gaussian-smoothed; the image
    score is the map maximum."""

    def __init__(self, cfg: FeatureConfig, device: str):
        super().__init__(cfg, device)
        self.fraction = cfg.coreset
        self.sigma = cfg.sigma
        self.seed = cfg.seed

    @torch.no_grad()
    def _patches(self, t: torch.Tensor) -> torch.Tensor:
        _, l2, l3, _ = self.layers(t)
        l2 = F.avg_pool2d(l2, 3, 1, 1)
        l3 = F.interpolate(F.avg_pool2d(l3, 3, 1, 1), size=l2.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([l2, l3], 1)  # (B, D, h, w)

    @torch.no_grad()
    def fit(self, x: np.ndarray) -> None:
        feats = []
        for t in self._batches(x):
            p = self._patches(t)
            feats.append(p.permute(0, 2, 3, 1).reshape(-1, p.shape[1]).cpu())
        self.memory = coreset(torch.cat(feats), self.fraction, self.seed).to(self.device)

    @torch.no_grad()
    def maps(self, x: np.ndarray) -> np.ndarray:
        from defectkit.anomaly.scoring import gaussian_smooth

        out = []
        for t in self._batches(x):
            p = self._patches(t)
            b, d, h, w = p.shape
            q = p.permute(0, 2, 3, 1).reshape(-1, d)
            dist = torch.cat([torch.cdist(c, self.memory).min(1).values for c in q.split(4096)])
            m = dist.view(b, 1, h, w)
            m = F.interpolate(m, size=(self.size, self.size), mode="bilinear", align_corners=False)[:, 0]
            out.append(gaussian_smooth(m, self.sigma).cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def _image_scores_from_maps(self, maps: np.ndarray) -> np.ndarray:
        return maps.reshape(len(maps), -1).max(1).astype(np.float64)


def coreset(feats: torch.Tensor, fraction: float, seed: int = 0, proj_dim: int = 128) -> torch.Tensor:
    """Greedy k-centre subsample (``fraction`` of the rows), distances in a random projection."""
    n = len(feats)
    k = max(1, int(round(n * fraction)))
    if k >= n:
        return feats
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(feats.shape[1], min(proj_dim, feats.shape[1]), generator=g) / np.sqrt(proj_dim)
    z = feats @ proj
    chosen = [int(torch.randint(n, (1,), generator=g))]
    dmin = torch.cdist(z, z[chosen]).squeeze(1)
    for _ in range(k - 1):
        i = int(torch.argmax(dmin))
        chosen.append(i)
        dmin = torch.minimum(dmin, torch.cdist(z, z[i : i + 1]).squeeze(1))
    return feats[chosen]


def build_feature_model(cfg: FeatureConfig, device: str):
    if cfg.model == "ocsvm":
        return OCSVMScorer(cfg, device)
    if cfg.model == "patchcore":
        return PatchCoreScorer(cfg, device)
    raise ConfigError(f"unknown feature model {cfg.model!r}")
