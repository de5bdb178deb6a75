"""The canonical predictions format: round trip, and a validator that names file, line and field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from defectkit.converters.canonical import (
    ImageRecord,
    PredictionsFormatError,
    make_header,
    read_records,
    write_records,
)
from defectkit.converters.instances import encode_rle


def _rec(**kw):
    m = np.zeros((10, 20), bool)
    m[2:4, 5:9] = True
    base = dict(image="bottle/test/crack/000.png", height=10, width=20, boxes_xyxy=[[5, 2, 9, 4]],
                labels=["crack"], scores=[0.9], masks=[encode_rle(m)], anomaly_map="maps/a.npy",
                image_score=0.9, key="bottle/test/crack/000", category="bottle", defect_type="crack", fold="test")
    return ImageRecord(**{**base, **kw})


def test_round_trip(tmp_path):
    h = make_header("predictions", "yolo11n", ["crack", "hole"], tmp_path, run="r1")
    good = _rec(image="bottle/test/good/000.png", boxes_xyxy=np.zeros((0, 4)), labels=[], scores=[], masks=[],
                image_score=0.1, defect_type="good")
    path = write_records(tmp_path / "p.jsonl", h, [_rec(), good])
    header, recs = read_records(path)
    assert header == h
    assert len(recs) == 2 and len(recs[0]) == 1 and len(recs[1]) == 0
    assert np.array_equal(recs[0].boxes_xyxy, [[5, 2, 9, 4]]) and recs[0].scores.tolist() == [0.9]
    assert recs[0].decode_masks().sum() == 8 and recs[1].decode_masks().shape == (0, 10, 20)
    assert recs[0].anomaly_map == "maps/a.npy" and recs[1].image_score == 0.1


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(labels=[]), "1 boxes but 0 labels"),
        (dict(labels=["scratch"]), "not in the header's classes"),
        (dict(boxes_xyxy=[[9, 2, 5, 4]]), "x1 < x0"),
        (dict(boxes_xyxy=[[5, 2, 25, 4]]), "outside the 20x10 image"),
        (dict(scores=None), "predictions need scores"),
        (dict(scores=[0.1, 0.2]), "1 boxes but 2 scores"),
        (dict(masks=[]), "1 boxes but 0 masks"),
        (dict(masks=[encode_rle(np.zeros((4, 4), bool))]), "mask size"),
        (dict(image_score=float("nan")), "not finite"),
    ],
)
def test_validator(tmp_path, kw, msg):
    h = make_header("predictions", "m", ["crack"], tmp_path)
    with pytest.raises(PredictionsFormatError, match=msg):
        write_records(tmp_path / "p.jsonl", h, [_rec(**kw)])
    assert not (tmp_path / "p.jsonl").exists()


def test_reader_names_file_and_line(tmp_path):
    h = make_header("ground_truth", "gt", ["crack"], tmp_path)
    p = write_records(tmp_path / "gt.jsonl", h, [_rec(scores=None), _rec(scores=None)])
    lines = p.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["labels"] = ["hole"]
    p.write_text("\n".join([lines[0], lines[1], json.dumps(bad)]) + "\n")
    with pytest.raises(PredictionsFormatError, match=r"gt.jsonl:3: .*'hole'"):
        read_records(p)
    p.write_text(json.dumps({"format": "other"}) + "\n")
    with pytest.raises(PredictionsFormatError, match="gt.jsonl:1: not a defectkit.predictions/1 file"):
        read_records(p)
    p.write_text(lines[0] + '\n{"image": "x.png"}\n')
    with pytest.raises(PredictionsFormatError, match=r"gt.jsonl:2: missing fields \['boxes_xyxy', 'height'"):
        read_records(p)
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="kind must be"):
        make_header("guesses", "m", [], tmp_path)
