"""From a trained model to anomaly maps and image scores.

* pixel map: squared reconstruction error (mean over channels), 1 - SSIM map (kornia), or their
  sum weighted like the loss; Gaussian-smoothed;
* multi-scale sliding windows: the model reconstructs overlapping ``p x p`` windows for each
  scale ``p``; the overlaps are averaged, each scale's map is standardised with statistics of
  good validation images, and the scales are averaged;
* image score: the mean of the top-k % pixels of the map (``k=100`` is the mean, ``max`` the
  maximum).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from defectkit.core.errors import ConfigError

MAP_KINDS = ("mse", "ssim", "mse_ssim")


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 11) -> torch.Tensor:
    """``(B, H, W)`` SSIM averaged over channels (kornia)."""
    import kornia

    return kornia.metrics.ssim(x, y, window_size=window).mean(1)


def error_map(x: torch.Tensor, recon: torch.Tensor, kind: str = "mse", ssim_lambda: float = 0.84) -> torch.Tensor:
    """``(B, H, W)`` per-pixel anomaly from input and reconstruction."""
    if kind not in MAP_KINDS:
        raise ConfigError(f"unknown map kind {kind!r}; choose one of {MAP_KINDS}")
    mse = ((x - recon) ** 2).mean(1)
    if kind == "mse":
        return mse
    dssim = 1.0 - ssim_map(x, recon)
    return dssim if kind == "ssim" else mse + ssim_lambda * dssim


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return maps
    import kornia

    k = int(2 * round(3 * sigma) + 1)
    return kornia.filters.gaussian_blur2d(maps[:, None], (k, k), (sigma, sigma), border_type="reflect")[:, 0]


@torch.no_grad()
def window_maps(model, x: torch.Tensor, patch: int, kind: str, ssim_lambda: float = 0.84,
                batch: int = 32) -> torch.Tensor:
    """Anomaly maps from overlapping ``patch`` windows (stride ``patch // 2``), overlaps averaged.
    ``patch >= H`` reconstructs the whole image at once."""
    b, c, h, w = x.shape
    if patch >= min(h, w):
        return error_map(x, model(x), kind, ssim_lambda)
    stride = patch // 2
    ys = list(range(0, h - patch + 1, stride))
    xs = list(range(0, w - patch + 1, stride))
    if ys[-1] != h - patch:
        ys.append(h - patch)
    if xs[-1] != w - patch:
        xs.append(w - patch)
    out = torch.zeros(b, h, w, device=x.device)
    count = torch.zeros(1, h, w, device=x.device)
    coords = [(y, xx) for y in ys for xx in xs]
    for i in range(0, len(coords), max(1, batch // max(1, b))):
        chunk = coords[i : i + max(1, batch // max(1, b))]
        crops = torch.cat([x[:, :, y : y + patch, xx : xx + patch] for y, xx in chunk])
        maps = error_map(crops, model(crops), kind, ssim_lambda).view(len(chunk), b, patch, patch)
        for (y, xx), m in zip(chunk, maps, strict=True):
            out[:, y : y + patch, xx : xx + patch] += m
            count[:, y : y + patch, xx : xx + patch] += 1
    return out / count


class AnomalyHead(torch.nn.Module):
    """The one inference forward of an anomaly run: ``(N, C, S, S)`` inputs in [0, 1] -> ``maps (N, S, S)``,
    ``scores (N,)``.  The trainer's scorers, ``predict`` and the ONNX export all run this module, so an
    exported model cannot disagree with the trainer (anomalib #2747: two implementations of one step).

    ``family="draem"``: the segmentation network's softmax defect channel, mean-filtered (DRAEM's 21x21 at
    256 px, scaled).  ``family="reconstruction"``: the reconstruction error map (``map_kind``) per window
    scale, Gaussian-smoothed, each scale standardised with ``stats`` (from good images) and averaged.
    Image score: the maximum (``topk="max"``) or the mean of the top ``topk`` % pixels.
    """

    def __init__(self, model: torch.nn.Module, family: str = "reconstruction", *, topk: float | str = 1.0,
                 map_kind: str = "mse", ssim_lambda: float = 0.84, scales: Sequence[int] | None = None,
                 sigma: float = 4.0, kernel: int = 3):
        super().__init__()
        if family not in ("reconstruction", "draem"):
            raise ConfigError(f"unknown anomaly head family {family!r}")
        self.model, self.family, self.topk = model, family, topk
        self.map_kind, self.ssim_lambda, self.sigma, self.kernel = map_kind, ssim_lambda, sigma, kernel
        self.scales = list(scales) if scales else [None]
        self.register_buffer("stats", torch.zeros(0, 2))  # (scales, [mean, std]) once calibrated

    @property
    def calibrated(self) -> bool:
        return len(self.stats) == len(self.scales)

    def scale_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-scale smoothed maps before standardisation (reconstruction family)."""
        return [gaussian_smooth(window_maps(self.model, x, p or x.shape[-1], self.map_kind, self.ssim_lambda),
                                self.sigma) for p in self.scales]

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "draem":
            m = self.model.anomaly_map(x)[:, None]
            return F.avg_pool2d(m, self.kernel, 1, self.kernel // 2, count_include_pad=False)[:, 0]
        ms = self.scale_maps(x)
        if len(ms) > 1 and not self.calibrated:
            raise RuntimeError("call calibrate() with good validation images before multi-scale scoring")
        if self.calibrated:
            ms = [(m - self.stats[k, 0]) / self.stats[k, 1] for k, m in enumerate(ms)]
        return torch.stack(ms).mean(0)

    def scores(self, maps: torch.Tensor) -> torch.Tensor:
        flat = maps.flatten(1)
        if self.topk == "max":
            return flat.max(1).values
        k = max(1, int(round(flat.shape[1] * float(self.topk) / 100.0)))
        return torch.topk(flat, k, dim=1).values.mean(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.maps(x)
        return maps, self.scores(maps)


class Scorer:
    """Turns a trained model into maps and image scores, in batches, through its :class:`AnomalyHead`.

    ``scales``: window sizes in model-input pixels (``None`` or the input size: whole image).
    Call :meth:`calibrate` with good validation images before scoring when several scales are
    used, so that each scale's map is standardised before the scales are averaged.
    """

    def __init__(self, model, kind: str = "mse", ssim_lambda: float = 0.84, scales: Sequence[int] | None = None,
                 sigma: float = 4.0, topk: float = 1.0, device: str = "cpu", batch: int = 16, *,
                 head: AnomalyHead | None = None):
        self.head = head or AnomalyHead(model, "reconstruction", topk=topk, map_kind=kind, ssim_lambda=ssim_lambda,
                                        scales=scales, sigma=sigma)
        self.model, self.device, self.batch = model, device, batch
        self.scales, self.topk = self.head.scales, topk

    @torch.no_grad()
    def calibrate(self, good: np.ndarray) -> None:
        self.head.eval()
        per_scale = [[] for _ in self.scales]
        for i in range(0, len(good), self.batch):
            x = torch.from_numpy(good[i : i + self.batch]).to(self.device)
            for k, m in enumerate(self.head.scale_maps(x)):
                per_scale[k].append(m.cpu().numpy())
        stats = [(float(np.concatenate(v).mean()), float(np.concatenate(v).std() + 1e-8)) for v in per_scale]
        self.head.stats = torch.tensor(stats, dtype=torch.float32, device=self.device)

    @property
    def stats(self) -> list[tuple[float, float]] | None:
        return [tuple(r) for r in self.head.stats.tolist()] if self.head.calibrated else None

    @torch.no_grad()
    def maps(self, inputs: np.ndarray) -> np.ndarray:
        """``(N, H, W)`` float32 anomaly maps at the model input resolution."""
        self.head.eval()
        out = [self.head.maps(torch.from_numpy(inputs[i : i + self.batch]).to(self.device)).cpu().numpy()
               for i in range(0, len(inputs), self.batch)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 1, 1), np.float32)

    @torch.no_grad()
    def image_scores(self, maps: np.ndarray) -> np.ndarray:
        if not len(maps):
            return np.zeros(0)
        return self.head.scores(torch.from_numpy(np.ascontiguousarray(maps, np.float32))).double().numpy()


def image_scores(maps: np.ndarray, topk: float | str = 1.0) -> np.ndarray:
    """Mean of the top ``topk`` % pixels of each map (``"max"``: the maximum), in float64 (for scorers
    without an :class:`AnomalyHead`: the feature models)."""
    flat = np.asarray(maps, np.float64).reshape(len(maps), -1)
    if topk == "max":
        return flat.max(1)
    k = max(1, int(round(flat.shape[1] * float(topk) / 100.0)))
    return np.sort(flat, axis=1)[:, -k:].mean(1)


def reconstruct(model, inputs: np.ndarray, device: str = "cpu", batch: int = 16) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(inputs[i : i + batch]).to(device)).cpu().numpy()
                               for i in range(0, len(inputs), batch)])


def latents(model, inputs: np.ndarray, device: str = "cpu", batch: int = 32) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate([model.encode(torch.from_numpy(inputs[i : i + batch]).to(device)).cpu().numpy()
                               for i in range(0, len(inputs), batch)])


def knn_scores(train: np.ndarray, test: np.ndarray, k: int = 5) -> np.ndarray:
    """Mean distance to the ``k`` nearest training latents (scikit-learn)."""
    from sklearn.neighbors import NearestNeighbors

    nn_ = NearestNeighbors(n_neighbors=min(k, len(train))).fit(train)
    return nn_.kneighbors(test)[0].mean(1)


def pca_scores(train: np.ndarray, test: np.ndarray, variance: float = 0.95) -> np.ndarray:
    """Reconstruction error of test latents in the PCA subspace of training latents."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=min(variance, len(train) - 1) if len(train) > 2 else None).fit(train)
    back = pca.inverse_transform(pca.transform(test))
    return ((test - back) ** 2).sum(1)


def upsample(maps: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``(N, h, w)`` maps to ``(N, H, W)``, bilinear."""
    t = torch.from_numpy(np.ascontiguousarray(maps, np.float32))[:, None]
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[:, 0].numpy()
