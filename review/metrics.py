"""The metrics every model family shares: pure functions over score arrays and masks.

One implementation, used by ``anomaly/train.py``, ``finetune/sam.py``, ``finetune/yolo.py`` and
``review/compare.py``, so every table reports the same number for the same run.

* Ranking metrics (image and pixel AUROC, AP, F1-max, AUPRO) come from **one descending sort**
  of all scores, with ties handled as blocks (every pixel of a tie block changes side at the same
  threshold).  Exact: no subsampling, no histogram binning.  Tested against scikit-learn's
  ``roc_auc_score`` / ``average_precision_score`` and a slow per-threshold AUPRO reference.
* Pixel metrics are computed at the **ground truth's resolution**: :func:`pixel_metrics` takes
  one map and one mask per image, each map resized (:func:`resize_map`, bilinear) to its mask's
  own size, so a 128 px model scored on 900x900 MVTec masks is judged on 900x900 pixels.
* Mask overlap: :func:`iou_dice` of a predicted and a ground-truth mask; an image where both are
  empty has no defined IoU (NaN) and is left out of means (:func:`mean_defined`), everywhere.
* Thresholds are chosen on a validation split only: F1-optimal, OTSU, or a percentile of
  good-image scores (the fallback when validation has no defect).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from defectkit.converters.instances import iou_dice, mask_iou  # the one definition; re-exported
from defectkit.core.errors import DataError

__all__ = ["auroc", "average_precision", "f1_max", "aupro", "pixel_metrics", "resize_map", "iou_dice", "mask_iou",
           "mean_defined", "choose_threshold", "f1_threshold", "otsu_threshold", "percentile_threshold",
           "image_metrics", "rank_curves"]


#: how a threshold is chosen on validation scores (:func:`choose_threshold`); every family offers them
THRESHOLDS = ("f1", "otsu", "percentile", "false_alarm", "recall")


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores).reshape(-1)
    if s.dtype.kind != "f":
        s = s.astype(np.float64)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise DataError(f"scores and labels differ in size: {s.size} vs {y.size}")
    if not np.isfinite(s).all():
        raise DataError("scores contain NaN or inf")
    return s, y


@dataclass(frozen=True)
class RankCurves:
    """Cumulative counts at the end of each tie block of the descending sorted scores."""

    thresholds: np.ndarray  # predict positive where score >= threshold
    tp: np.ndarray
    fp: np.ndarray
    n_pos: int
    n_neg: int
    order: np.ndarray  # the descending sort of the scores
    last: np.ndarray  # position (in sorted order) of the end of each tie block


def rank_curves(scores, labels) -> RankCurves:
    """Exact TP/FP counts at every distinct threshold, from one stable descending sort."""
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1] if s.size else np.zeros(0, int)
    tp = np.cumsum(y[order], dtype=np.int64)[last]
    return RankCurves(s_sorted[last], tp, (last + 1) - tp, int(y.sum()), int(y.size - y.sum()), order, last)


def _auroc(c: RankCurves) -> float:
    if c.n_pos == 0 or c.n_neg == 0:
        return float("nan")
    tpr = np.r_[0.0, c.tp / c.n_pos]
    fpr = np.r_[0.0, c.fp / c.n_neg]
    return float(np.trapezoid(tpr, fpr))


def _ap(c: RankCurves) -> float:
    """Step-wise average precision, sum of (R_k - R_k-1) P_k (scikit-learn's definition)."""
    if c.n_pos == 0:
        return float("nan")
    precision = c.tp / np.maximum(c.tp + c.fp, 1)
    recall = np.r_[0.0, c.tp / c.n_pos]
    return float(np.sum(np.diff(recall) * precision))


def _f1max(c: RankCurves) -> tuple[float, float]:
    if c.n_pos == 0:
        return float("nan"), float("nan")
    p = c.tp / np.maximum(c.tp + c.fp, 1)
    r = c.tp / c.n_pos
    f1 = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)
    k = int(np.argmax(f1))
    return float(f1[k]), float(c.thresholds[k])


def auroc(scores, labels) -> float:
    """ROC AUC, exact and tie-aware; NaN when only one class is present."""
    return _auroc(rank_curves(scores, labels))


def average_precision(scores, labels) -> float:
    """Average precision (area under the step precision-recall curve); NaN without positives."""
    return _ap(rank_curves(scores, labels))


def f1_max(scores, labels) -> tuple[float, float]:
    """The best F1 over all thresholds, and that threshold (predict defect where score >= it)."""
    return _f1max(rank_curves(scores, labels))


def _region_weights(masks: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """Per pixel ``1 / area`` of its 8-connected ground-truth region (0 off-defect), flattened in
    the order of ``masks``, and the number of regions."""
    import cv2

    out, n_regions = [], 0
    for m in masks:
        w = np.zeros(m.shape, np.float64)
        if m.any():
            n, lab, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
            area = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
            inv = np.where(np.arange(n) > 0, 1.0 / np.maximum(area, 1), 0.0)
            w = inv[lab]
            n_regions += n - 1
        out.append(w.reshape(-1))
    return (np.concatenate(out) if out else np.zeros(0)), n_regions


def _aupro(c: RankCurves, weights: np.ndarray, n_regions: int, max_fpr: float) -> float:
    if n_regions == 0 or c.n_neg == 0:
        return float("nan")
    pro = np.cumsum(weights[c.order])[c.last] / n_regions
    fpr, pro = np.r_[0.0, c.fp / c.n_neg], np.r_[0.0, pro]
    k = int(np.searchsorted(fpr, max_fpr, side="right"))
    x, y = fpr[:k], pro[:k]
    if k < fpr.size and x[-1] < max_fpr:  # interpolate the curve at max_fpr
        x1, y1 = fpr[k], pro[k]
        y_end = y[-1] + (y1 - y[-1]) * (max_fpr - x[-1]) / (x1 - x[-1])
        x, y = np.r_[x, max_fpr], np.r_[y, y_end]
    return float(min(1.0, np.trapezoid(y, x) / max_fpr))  # clip float rounding


def aupro(maps, masks, max_fpr: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``max_fpr``, normalised to [0, 1].

    ``maps`` and ``masks``: one ``(H, W)`` map and bool mask per image (a list, or ``(N, H, W)``
    arrays; the sizes may differ between images).  Each 8-connected ground-truth region weighs
    the same, whatever its size (Bergmann et al.); the false-positive rate is over all
    defect-free pixels.  NaN when there is no region or no defect-free pixel.
    """
    return pixel_metrics(maps, masks, max_fpr)["aupro"]


def _flatten_pairs(maps, masks) -> tuple[np.ndarray, list[np.ndarray]]:
    maps = list(maps)
    masks = [np.asarray(m, bool) for m in masks]
    if len(maps) != len(masks):
        raise DataError(f"{len(maps)} maps but {len(masks)} masks")
    for i, (a, m) in enumerate(zip(maps, masks, strict=True)):
        if np.shape(a) != m.shape or m.ndim != 2:
            raise DataError(f"image {i}: map {np.shape(a)} and mask {m.shape} must both be (H, W) of one size "
                            "(resize maps to the mask with resize_map first)")
    flat = np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in maps]) if maps else np.zeros(0, np.float32)
    return flat, masks


def pixel_metrics(maps, masks, max_fpr: float = 0.3, types: Sequence[str] | None = None) -> dict:
    """Pixel AUROC, AUPRO@``max_fpr``, AP and F1-max (with its threshold) from one sort.

    ``maps``/``masks``: per image, an ``(H, W)`` float map and bool mask of the same size, at the
    resolution the metric is meant for (the ground truth's).  Scores are compared as float32.
    ``types``: each image's defect type (``good`` for good ones); adds ``per_type_auroc``, the pixel
    AUROC of the good images' pixels and that type's images' pixels, because a type with large
    masks (magnetic tiles' ``uneven``: 29 % of the tile) outweighs the others in the pooled figure.
    """
    s, masks = _flatten_pairs(maps, masks)
    y = np.concatenate([m.reshape(-1) for m in masks]) if masks else np.zeros(0, bool)
    curves = rank_curves(s, y)
    weights, n_regions = _region_weights(masks)
    f1, thr = _f1max(curves)
    out = {"auroc": _auroc(curves), "aupro": _aupro(curves, weights, n_regions, max_fpr),
           "ap": _ap(curves), "f1_max": f1, "f1_threshold": thr, "max_fpr": max_fpr,
           "pixels": int(s.size), "regions": n_regions,
           "resolution": "ground truth (each map resized to its mask's size, bilinear)"}
    if types is not None:
        t = np.asarray(list(types))
        if len(t) != len(masks):
            raise DataError(f"{len(t)} defect types but {len(masks)} masks")
        edges = np.cumsum([0, *(m.size for m in masks)])  # image i's pixels are s[edges[i]:edges[i + 1]]
        out["per_type_auroc"] = {}
        for d in sorted(set(t) - {"good"}):
            idx = np.flatnonzero(np.isin(t, ["good", d]))
            ss = np.concatenate([s[edges[i] : edges[i + 1]] for i in idx])  # copies of just these images
            ys = np.concatenate([y[edges[i] : edges[i + 1]] for i in idx])
            out["per_type_auroc"][str(d)] = auroc(ss, ys) if ys.any() else float("nan")  # nan: no defect pixel
    return out


def resize_map(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """An ``(h, w)`` float map resized to ``hw`` (bilinear, pixel centres aligned as OpenCV and
    ``F.interpolate(align_corners=False)`` do); unchanged when already that size."""
    import cv2

    a = np.asarray(a, np.float32)
    if a.shape == tuple(hw):
        return a
    return cv2.resize(a, (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_LINEAR)


# ------------------------------------------------------------------------------ mask overlap


def mean_defined(values) -> float | None:
    """Mean over the defined (non-NaN) values; ``None`` when there is none."""
    v = np.asarray(list(values), np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else None


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
        raise DataError("need at least one good-image score to place a threshold")
    return float(np.quantile(g, 1.0 - false_alarm_rate))


def max_false_alarm_threshold(good_scores, max_false_alarm: float) -> tuple[float, dict]:
    """The lowest threshold at which at most ``max_false_alarm`` of the good (validation) images reach it
    (NG means score >= threshold), and whether that many good images can show such a rate at all.

    With ``n`` good images the measurable rates are multiples of ``1/n``: a stated rate below ``1/n``
    is not supported by the data; the threshold is then placed just above every good score (0 of n false
    alarms), and the result says the real rate is only known to lie below about ``1/n``."""
    g = np.sort(np.asarray(good_scores, np.float64).reshape(-1))[::-1]
    if not g.size:
        raise DataError("need at least one good validation image to place a false-alarm threshold")
    n = len(g)
    allowed = int(np.floor(max_false_alarm * n + 1e-9))
    thr = float(np.nextafter(g[allowed], np.inf)) if allowed < n else float(g[-1])
    supported = max_false_alarm * n >= 1 - 1e-9 or max_false_alarm >= 1
    info = {"max_false_alarm": max_false_alarm, "val_good_images": n, "val_false_alarms_allowed": allowed,
            "supported": bool(supported)}
    if not supported:
        info["note"] = (f"{n} good validation images measure false-alarm rates only in steps of 1/{n} = {1 / n:.3g}: "
                        f"{max_false_alarm:g} is not supported; the threshold lies above every good validation score")
    return thr, info


def recall_threshold(scores, labels, target_recall: float) -> float:
    """The highest threshold that still flags ``target_recall`` of the defective (validation) images."""
    s, y = _check(scores, labels)
    d = np.sort(s[y])[::-1]
    if not d.size:
        raise DataError("need at least one defective validation image to place a recall threshold")
    k = max(1, int(np.ceil(target_recall * len(d) - 1e-9)))
    return float(d[min(k, len(d)) - 1])


def choose_threshold(method: str, scores, labels, false_alarm_rate: float = 0.01,
                     target_recall: float = 0.95) -> tuple[float, str]:
    """A threshold on validation scores and the rule actually used.

    ``method``: ``f1`` (F1-optimal), ``otsu``, ``percentile`` (of good scores), ``false_alarm`` (at most
    ``false_alarm_rate`` of good images flagged; the rule says when the data cannot support the rate) or
    ``recall`` (flag ``target_recall`` of the defects).  With no defect among the labels, F1 and recall
    would degenerate, so they fall back to ``percentile`` and say so in the returned rule.
    """
    s, y = _check(scores, labels)
    if method == "otsu":
        return otsu_threshold(s), "otsu"
    if method == "false_alarm":
        thr, info = max_false_alarm_threshold(s[~y] if (~y).any() else s, false_alarm_rate)
        rule = (f"false alarms <= {false_alarm_rate:g} on {info['val_good_images']} good validation images"
                + (f" (NOT SUPPORTED: {info['note']})" if not info["supported"] else ""))
        return thr, rule
    if method == "percentile" or not y.any():
        rule = f"percentile: {100 * (1 - false_alarm_rate):g}th of good validation scores"
        if method != "percentile":
            rule += " (fallback: no defect in the validation data)"
        return percentile_threshold(s[~y] if (~y).any() else s, false_alarm_rate), rule
    if method == "recall":
        return recall_threshold(s, y, target_recall), f"recall >= {target_recall:g} on validation defects"
    if method != "f1":
        raise DataError(f"unknown threshold method {method!r}; choose f1, otsu, percentile, false_alarm or recall")
    return f1_threshold(s, y), "f1"


def confusion_at(scores, labels, threshold: float) -> dict:
    """The operating point on (test) images: NG = score >= threshold; counts and rates."""
    s, y = _check(scores, labels)
    pred = s >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    return {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "false_alarm_rate": fp / max(fp + tn, 1), "miss_rate": fn / max(fn + tp, 1),
            "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1)}


# ------------------------------------------------------------------------------ reports


def image_metrics(scores, labels, types: Sequence[str] | None = None) -> dict:
    """AUROC, AP and F1-max overall; per defect type, AUROC of good vs that type."""
    s, y = _check(scores, labels)
    c = rank_curves(s, y)
    f1, thr = _f1max(c)
    out = {"auroc": _auroc(c), "ap": _ap(c), "f1_max": f1, "f1_threshold": thr}
    if types is not None:
        t = np.asarray(types)
        out["per_type_auroc"] = {str(d): auroc(np.r_[s[~y], s[t == d]],
                                               np.r_[np.zeros((~y).sum()), np.ones((t == d).sum())])
                                 for d in sorted(set(t[y]))}
    return out
