"""Anomaly-detection metrics and thresholds: pure functions over score arrays.

Image level: AUROC; pixel level: AUROC, AUPRO up to a false-positive rate (0.3 by default, as
Bergmann et al.), average precision, F1-max.  Thresholds are chosen on a validation split only:
F1-optimal, OTSU on the score histogram, or a percentile of good-image scores.  AUROC and AP are
scikit-learn's; AUPRO is computed exactly from one sort of all pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return s, y


def auroc(scores, labels) -> float:
    """ROC AUC (scikit-learn); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    s, y = _check(scores, labels)
    return float("nan") if y.all() or not y.any() else float(roc_auc_score(y, s))


def average_precision(scores, labels) -> float:
    from sklearn.metrics import average_precision_score

    s, y = _check(scores, labels)
    return float("nan") if not y.any() else float(average_precision_score(y, s))


def f1_max(scores, labels) -> tuple[float, float]:
    """The best F1 over all thresholds, and that threshold (predict defect where score >= it)."""
    from sklearn.metrics import precision_recall_curve

    s, y = _check(scores, labels)
    if not y.any():
        return float("nan"), float("nan")
    p, r, t = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0)[:-1]
    k = int(np.argmax(f1))
    return float(f1[k]), float(t[k])


def aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``max_fpr``, normalised to [0, 1].

    ``maps`` ``(N, H, W)`` float anomaly maps, ``masks`` ``(N, H, W)`` bool ground truth.  Each
    8-connected ground-truth region weighs the same, whatever its size; the false-positive rate
    is over all defect-free pixels.  Exact: one descending sort of all pixels gives the PRO and
    FPR at every threshold.  NaN when there is no region or no defect-free pixel.
    """
    import cv2

    maps = np.asarray(maps, np.float64)
    masks = np.asarray(masks, bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps and masks must both be (N, H, W); got {maps.shape} and {masks.shape}")
    weights = np.zeros(maps.shape, np.float64)
    n_regions = 0
    for i, m in enumerate(masks):
        n, lab, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
        for r in range(1, n):
            weights[i][lab == r] = 1.0 / stats[r, cv2.CC_STAT_AREA]
        n_regions += n - 1
    n_neg = int((~masks).sum())
    if n_regions == 0 or n_neg == 0:
        return float("nan")
    s = maps.reshape(-1)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    pro = np.cumsum(weights.reshape(-1)[order]) / n_regions
    fpr = np.cumsum(~masks.reshape(-1)[order]) / n_neg
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]  # the end of each tie block
    fpr, pro = np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]
    if fpr[-1] < max_fpr:  # cannot happen with every pixel counted, kept for safety
        max_fpr = float(fpr[-1])
    k = int(np.searchsorted(fpr, max_fpr, side="right"))
    x, y = fpr[:k], pro[:k]
    if k < fpr.size and x[-1] < max_fpr:  # interpolate the curve at max_fpr
        x1, y1 = fpr[k], pro[k]
        y_end = y[-1] + (y1 - y[-1]) * (max_fpr - x[-1]) / (x1 - x[-1])
        x, y = np.r_[x, max_fpr], np.r_[y, y_end]
    return float(min(1.0, np.trapezoid(y, x) / max_fpr))  # clip float rounding


# ------------------------------------------------------------------------------ thresholds


def f1_threshold(scores, labels) -> float:
    """The F1-optimal threshold on (validation) scores."""
    return f1_max(scores, labels)[1]


def otsu_threshold(scores) -> float:
    """OTSU's threshold on the histogram of the scores (scikit-image), label-free."""
    from skimage.filters import threshold_otsu

    s = np.asarray(scores, np.float64).reshape(-1)
    return float(threshold_otsu(s)) if np.ptp(s) > 0 else float(s[0])


def percentile_threshold(good_scores, false_alarm_rate: float = 0.01) -> float:
    """The score above which only ``false_alarm_rate`` of good images fall."""
    g = np.asarray(good_scores, np.float64).reshape(-1)
    if not g.size:
        raise ValueError("need at least one good-image score")
    return float(np.quantile(g, 1.0 - false_alarm_rate))


# ------------------------------------------------------------------------------ reports


def image_metrics(scores, labels, types: Sequence[str] | None = None) -> dict:
    """AUROC, AP and F1-max overall; per defect type, AUROC of good vs that type."""
    s, y = _check(scores, labels)
    f1, thr = f1_max(s, y)
    out = {"auroc": auroc(s, y), "ap": average_precision(s, y), "f1_max": f1, "f1_threshold": thr}
    if types is not None:
        t = np.asarray(types)
        out["per_type_auroc"] = {str(d): auroc(np.r_[s[~y], s[t == d]], np.r_[np.zeros((~y).sum()), np.ones((t == d).sum())])
                                 for d in sorted(set(t[y]))}
    return out


def pixel_metrics(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> dict:
    maps, masks = np.asarray(maps), np.asarray(masks, bool)
    f1, thr = f1_max(maps, masks)
    return {"auroc": auroc(maps, masks), "aupro": aupro(maps, masks, max_fpr), "ap": average_precision(maps, masks),
            "f1_max": f1, "f1_threshold": thr}
