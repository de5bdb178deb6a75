"""Anomaly metrics on hand-made score arrays with known answers, and against scikit-learn."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from defectkit.core.errors import DataError
from defectkit.review import metrics as M


def test_auroc_by_hand():
    # positive/negative pairs ranked right: (.35>.1), (.8>.1), (.8>.4); wrong: (.35<.4) -> 3/4
    assert M.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert np.isnan(M.auroc([0.1, 0.2], [1, 1]))
    with pytest.raises(ValueError, match="differ in size"):
        M.auroc([0.1], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        M.auroc([np.nan, 1], [0, 1])


def test_f1_max_and_threshold():
    f1, thr = M.f1_max([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert f1 == 1.0 and thr == 0.8
    f1, _ = M.f1_max([0.9, 0.1, 0.8], [0, 1, 1])  # best: everything >= 0.1 -> P 2/3, R 1 -> F1 0.8
    assert f1 == pytest.approx(0.8)


def test_aupro_perfect_and_worst():
    maps = np.array([[[0.9, 0.8, 0.1, 0.2]]])
    masks = np.array([[[1, 1, 0, 0]]], bool)
    assert M.aupro(maps, masks) == pytest.approx(1.0)
    assert M.aupro(-maps, masks) == pytest.approx(0.0)


def test_aupro_by_hand_two_regions_weigh_the_same():
    # region A: 1 px at 0.9; region B: 3 px at .7/.5/.3; negatives: .6, .4 and eight 0.0
    # (fpr, pro) steps: (0, 2/3) -> (0.1, 5/6) -> (0.2, 1): area to 0.3 = .0667 + .0833 + .1 = .25
    maps = np.array([[[0.9, 0, 0.7, 0.5, 0.3, 0.6, 0.4, 0, 0, 0, 0, 0, 0, 0]]], float)
    masks = np.array([[[1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]]], bool)
    assert M.aupro(maps, masks) == pytest.approx(0.25 / 0.3)
    assert M.aupro(maps, masks, max_fpr=0.1) == pytest.approx((0.1 * 2 / 3) / 0.1)


def _aupro_reference(maps, masks, max_fpr=0.3):
    """Slow and obvious: every threshold, every region, then trapezoids."""
    regions = []
    for i, m in enumerate(masks):
        n, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        regions += [(i, lab == r) for r in range(1, n)]
    neg = ~masks
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        pro = np.mean([pred[i][r].mean() for i, r in regions])
        pts.append(((pred & neg).sum() / neg.sum(), pro))
    x, y = np.array(pts).T
    xi = np.r_[x[x <= max_fpr], max_fpr]
    k = np.searchsorted(x, max_fpr, side="right")
    yi = (
        np.r_[y[:k], y[k - 1] + (y[k] - y[k - 1]) * (max_fpr - x[k - 1]) / (x[k] - x[k - 1])]
        if k < len(x)
        else np.r_[y[:k], y[-1]]
    )
    return np.trapezoid(yi, xi) / max_fpr


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_a_slow_reference(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 2:5, 2:6] = True
    masks[0, 8, 8] = True
    masks[1, 6:12, 0:3] = True
    maps = rng.random((3, 12, 12)).round(2) + masks * rng.random((3, 12, 12)) * 0.8
    assert M.aupro(maps, masks) == pytest.approx(_aupro_reference(maps, masks), abs=1e-9)


def test_pixel_and_image_reports_agree_with_sklearn():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16, 16), bool)
    masks[1, 3:8, 3:8] = masks[2, 10:12, 1:15] = True
    maps = rng.random(masks.shape) + masks
    p = M.pixel_metrics(maps, masks)
    assert p["auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert 0 < p["aupro"] <= 1 and 0 < p["ap"] <= 1
    scores = np.array([0.1, 0.2, 0.9, 0.22, 0.8, 0.25])  # hole (.22) beats 2 of 3 good images
    labels = np.array([0, 0, 1, 1, 1, 0])
    types = ["good", "good", "crack", "hole", "crack", "good"]
    im = M.image_metrics(scores, labels, types)
    assert im["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert im["per_type_auroc"] == {"crack": 1.0, "hole": pytest.approx(2 / 3)}


def test_per_type_pixel_auroc_by_hand():
    # one row of two pixels per image; each type is scored against the good images' pixels only
    maps = [np.array([[0.1, 0.5]]), np.array([[0.9, 0.3]]), np.array([[0.4, 0.2]])]
    masks = [np.array([[0, 0]], bool), np.array([[1, 0]], bool), np.array([[1, 1]], bool)]
    p = M.pixel_metrics(maps, masks, types=["good", "crack", "uneven"])
    # crack: 0.9 beats 0.1, 0.5 and its own image's 0.3 -> 1; uneven: 0.4 and 0.2 each beat 0.1 only -> 2/4
    assert p["per_type_auroc"] == {"crack": 1.0, "uneven": 0.5}
    assert p["auroc"] == pytest.approx(6 / 9)  # pooled: 3 + 2 + 1 of 9 pairs
    with pytest.raises(DataError, match="2 defect types but 3 masks"):
        M.pixel_metrics(maps, masks, types=["good", "crack"])


def test_thresholds():
    good = np.linspace(0, 1, 101)
    assert M.percentile_threshold(good, 0.01) == pytest.approx(0.99)
    bimodal = np.r_[np.random.default_rng(0).normal(0, 0.1, 500), np.random.default_rng(1).normal(3, 0.1, 500)]
    t = M.otsu_threshold(bimodal)
    assert bimodal[:500].max() < t < bimodal[500:].min()  # OTSU splits the two modes
    assert M.f1_threshold([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 0.8
    with pytest.raises(ValueError, match="at least one"):
        M.percentile_threshold([])


def test_ranking_metrics_match_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(3)
    s = rng.integers(0, 6, 400).astype(float)  # many ties
    y = rng.random(400) < 0.3
    assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_pixel_metrics_take_images_of_different_sizes_at_their_own_resolution():
    """Two images, 4x4 and 2x6: one sort over all 28 pixels, as if concatenated."""
    a, b = np.zeros((4, 4)), np.zeros((2, 6))
    ma, mb = np.zeros((4, 4), bool), np.zeros((2, 6), bool)
    ma[0, 0] = mb[1, 5] = True
    a[0, 0], b[1, 5], b[0, 0] = 0.9, 0.7, 0.8  # one false positive ranked between the defects
    p = M.pixel_metrics([a, b], [ma, mb])
    flat_s, flat_y = np.r_[a.ravel(), b.ravel()], np.r_[ma.ravel(), mb.ravel()]
    assert p["auroc"] == pytest.approx(roc_auc_score(flat_y, flat_s))
    assert p["pixels"] == 28 and p["regions"] == 2
    # by hand: PRO 1/2 at FPR 0, 1/2 at FPR 1/26, 1 at 1/26 ... area to 0.3 = 0.5/26 + 1 * (0.3 - 1/26)
    assert p["aupro"] == pytest.approx((0.5 / 26 + (0.3 - 1 / 26)) / 0.3)
    with pytest.raises(ValueError, match="resize_map"):
        M.pixel_metrics([a], [mb])


def test_resize_map_goes_back_to_the_mask_size():
    m = np.arange(4, dtype=np.float32).reshape(2, 2)
    up = M.resize_map(m, (4, 6))
    assert up.shape == (4, 6) and up.min() == 0 and up.max() == 3
    assert M.resize_map(up, (4, 6)) is not None and M.resize_map(m, (2, 2)).tolist() == m.tolist()


def test_iou_is_undefined_when_both_masks_are_empty_and_left_out_of_means():
    empty = np.zeros((3, 3), bool)
    one = empty.copy()
    one[1, 1] = True
    assert np.isnan(M.mask_iou(empty, empty))
    assert M.iou_dice(one, one) == (1.0, 1.0) and M.iou_dice(one, empty) == (0.0, 0.0)
    assert M.mean_defined([np.nan, 1.0, 0.0]) == 0.5 and M.mean_defined([np.nan]) is None


def test_threshold_falls_back_to_a_percentile_without_val_defects():
    good = np.linspace(0, 1, 101)
    thr, rule = M.choose_threshold("f1", good, np.zeros(101, bool), 0.01)
    assert thr == pytest.approx(0.99) and "fallback" in rule
    thr, rule = M.choose_threshold("f1", [0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert thr == 0.8 and rule == "f1"


def test_pixel_auroc_and_aupro_match_independent_implementations():
    """Values computed once by torchmetrics' BinaryAUROC and anomalib's AUPRO (versions in the fixture;
    tests/fixtures/make_reference_metrics.py says how), not by code that shares the suite's conventions."""
    import importlib.util
    import json
    from pathlib import Path

    ref = json.loads((Path(__file__).parent / "fixtures" / "independent_metrics.json").read_text())
    here = Path(__file__).parent / "fixtures"
    spec = importlib.util.spec_from_file_location("metric_fixture", here / "metric_fixture.py")
    fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixture)
    maps, masks = fixture.maps_and_masks(ref["fixture_seed"])
    p = M.pixel_metrics(list(maps), list(masks), max_fpr=0.3)
    assert p["auroc"] == pytest.approx(ref["pixel_auroc"], abs=1e-6)
    assert p["aupro"] == pytest.approx(ref["aupro_0.3"], abs=1e-6)
