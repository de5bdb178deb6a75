"""Detection metrics on a fixture whose answers were computed by hand (COCO 101-point AP).

Image A: crack g1 [0,0,10,10], hole h1 [30,30,40,40]; predictions: crack [0,0,10,10] .9 (TP),
         its duplicate .8 (FP), crack [50,50,60,60] .7 (FP, no defect there), hole [30,30,40,40] .5 (TP)
Image B: crack g2 [0,0,10,10]; prediction crack [0,0,10,16] .6: IoU 100/160 = 0.625 (TP below IoU .65)
Image C: a small crack g3 [20,20,24,24], missed.

crack, IoU .50: TP FP FP TP of 3 -> recall 1/3,1/3,1/3,2/3, precision 1,.5,.33,.5; the envelope is 1
  up to recall 1/3 (34 of the 101 recall points) and .5 up to 2/3 (33 points): AP = 50.5/101 = 0.5.
  IoU .65-.95 (7 thresholds): B's box no longer matches: AP = 34/101.  AP50:95 = (3 * .5 + 7 * 34/101) / 10.
hole: 1.0 at every IoU.  mAP50 = .75.
class-agnostic, IoU .5: TP FP FP TP TP of 4 -> envelope 1 up to recall .25 (26 points), .6 up to .75
  (50 points): AP50 = (26 + 30) / 101.
"""

from __future__ import annotations

import numpy as np
import pytest

from defectkit.converters.canonical import ImageRecord
from defectkit.review.detection import coco_evaluate

CRACK_50 = 0.5
CRACK_50_95 = (3 * 0.5 + 7 * 34 / 101) / 10
AGNOSTIC_50 = 56 / 101


def _rec(name, boxes, labels, scores=None, defect="crack"):
    return ImageRecord(image=name, height=64, width=64, boxes_xyxy=np.asarray(boxes, float).reshape(-1, 4),
                       labels=labels, scores=None if scores is None else np.asarray(scores, float), defect_type=defect)


GT = [_rec("A.png", [[0, 0, 10, 10], [30, 30, 40, 40]], ["crack", "hole"]),
      _rec("B.png", [[0, 0, 10, 10]], ["crack"]),
      _rec("C.png", [[20, 20, 24, 24]], ["crack"])]
PRED = [_rec("A.png", [[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [30, 30, 40, 40]],
             ["crack", "crack", "crack", "hole"], [0.9, 0.8, 0.7, 0.5]),
        _rec("B.png", [[0, 0, 10, 16]], ["crack"], [0.6])]


def _agnostic(recs):
    return [ImageRecord(**{**r.__dict__, "labels": ["defect"] * len(r)}) for r in recs]


def test_class_aware_ap_by_hand():
    r = coco_evaluate(GT, PRED, ["crack", "hole"], "bbox")
    assert r["per_class"]["crack"]["ap50"] == pytest.approx(CRACK_50)
    assert r["per_class"]["hole"]["ap50"] == pytest.approx(1.0)
    assert r["map50"] == pytest.approx((CRACK_50 + 1) / 2)
    assert r["per_class"]["crack"]["ap50_95"] == pytest.approx(CRACK_50_95)
    assert r["map50_95"] == pytest.approx((CRACK_50_95 + 1) / 2)
    assert r["n_gt"] == 4 and r["n_det"] == 5


def test_class_agnostic_ap_by_hand():
    r = coco_evaluate(_agnostic(GT), _agnostic(PRED), ["defect"], "bbox")
    assert r["map50"] == pytest.approx(AGNOSTIC_50)


def test_the_same_answers_straight_from_pycocotools():
    """COCOeval on a COCO dict written by hand (xywh boxes), not through the suite's conversion."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [{"id": i, "width": 64, "height": 64} for i in (1, 2, 3)],
          "categories": [{"id": 1, "name": "crack"}, {"id": 2, "name": "hole"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 30, 10, 10], "area": 100,
                           "iscrowd": 0},
                          {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
                          {"id": 4, "image_id": 3, "category_id": 1, "bbox": [20, 20, 4, 4], "area": 16, "iscrowd": 0}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8},
            {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.7},
            {"image_id": 1, "category_id": 2, "bbox": [30, 30, 10, 10], "score": 0.5},
            {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 16], "score": 0.6}]
    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO()
        c.dataset = gt
        c.createIndex()
        ev = COCOeval(c, c.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ours = coco_evaluate(GT, PRED, ["crack", "hole"], "bbox")
    assert ev.stats[1] == pytest.approx(ours["map50"]) and ev.stats[0] == pytest.approx(ours["map50_95"])


def test_pixel_iou_and_dice_by_hand():
    from defectkit.review.metrics import iou_dice

    gt = np.zeros((4, 4), bool)
    gt[0, :] = True  # 4 px
    pred = np.zeros((4, 4), bool)
    pred[0, :2] = pred[1, :2] = True  # 4 px, 2 of them on the defect
    assert iou_dice(pred, gt) == (pytest.approx(2 / 6), pytest.approx(4 / 8))


def test_box_f1_conf_by_hand():
    """The fixture above, boxes by falling score: .9 TP, .8 FP, .7 FP, .6 TP (IoU .625), .5 TP, of 4 defects.
    F1 after each: .4, 1/3, 2/7, .5, 2*.6*.75/1.35 = 2/3 -> conf .5, precision .6, recall .75.
    At IoU .65 B's box misses: .4, 1/3, 2/7, .25, 2*.4*.5/.9 = 4/9 (still at .5)."""
    from defectkit.review.detection import box_f1_conf

    r = box_f1_conf(GT, PRED)
    assert r == pytest.approx({"conf": 0.5, "f1": 2 / 3, "precision": 0.6, "recall": 0.75})
    assert box_f1_conf(GT, PRED, iou_thr=0.65)["f1"] == pytest.approx(4 / 9)
    # two hits then three misses: the peak is at the second box's score
    g = [_rec("D.png", [[0, 0, 10, 10], [20, 20, 30, 30]], ["crack", "crack"])]
    p = [_rec("D.png", [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [40, 0, 50, 10], [0, 40, 10, 50]],
              ["crack"] * 5, [0.9, 0.8, 0.3, 0.2, 0.1])]
    assert box_f1_conf(g, p) == pytest.approx({"conf": 0.8, "f1": 1.0, "precision": 1.0, "recall": 1.0})
    # a wrong class misses when class-aware, hits when not
    p_hole = [_rec("D.png", [[0, 0, 10, 10], [20, 20, 30, 30]], ["hole", "crack"], [0.9, 0.8])]
    assert box_f1_conf(g, p_hole)["f1"] == pytest.approx(0.5)
    assert box_f1_conf(g, p_hole, class_aware=False)["f1"] == pytest.approx(1.0)
    # boxes tied at a score are kept or dropped together: a hit and a miss at .8 -> precision .5
    tie = [_rec("D.png", [[0, 0, 10, 10], [40, 40, 50, 50]], ["crack"] * 2, [0.8, 0.8])]
    assert box_f1_conf([_rec("D.png", [[0, 0, 10, 10]], ["crack"])], tie) == pytest.approx(
        {"conf": 0.8, "f1": 2 / 3, "precision": 0.5, "recall": 1.0})
    assert box_f1_conf(g, []) is None
