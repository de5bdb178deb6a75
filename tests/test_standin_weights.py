"""The real loading paths, exercised with stand-in weights saved under the real file names
(no weights can be downloaded here): torchvision's ResNet file, SAM's registry checkpoint format."""

from __future__ import annotations

import json

import pytest
import torch


def _resnet18_file(folder):
    import torchvision

    from defectkit.anomaly.features import WEIGHT_FILES

    torch.manual_seed(0)
    path = folder / WEIGHT_FILES["resnet18"]  # resnet18-f37072fd.pth, torchvision's own name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.mark.parametrize("how", ["--backbone-weights", "torch hub cache"])
def test_patchcore_loads_a_resnet_file_through_the_normal_path(synthetic_root, tmp_path, monkeypatch, how,
                                                              auroc_from_scores):
    from defectkit.anomaly import train as T

    if how == "--backbone-weights":
        extra = ["--backbone-weights", str(_resnet18_file(tmp_path / "w"))]
    else:  # where torchvision would have cached it: $TORCH_HOME/hub/checkpoints/<file>
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        _resnet18_file(tmp_path / "torch" / "hub" / "checkpoints")
        extra = []
    args = T.get_args_parser().parse_args(["--data", str(synthetic_root), "--manifest", str(tmp_path / "m.json"),
                                           "--out", str(tmp_path / "run"), "--imgsz", "64", "--category", "washer",
                                           "--model", "patchcore", "--coreset", "0.2", "--no-plots", "-q",
                                           "--device", "cpu", *extra])
    m = T.main(args)
    assert m["image"]["auroc"] == pytest.approx(auroc_from_scores(tmp_path / "run")) and "pixel" in m
    assert json.loads((tmp_path / "run" / "run_args.json").read_text())["features"]["random_init"] is False


def test_sam_checkpoint_in_registry_format_loads_through_the_checkpoint_path(tmp_path, synthetic_root):
    from defectkit.converters.convert import ConvertConfig, convert
    from defectkit.datasets.mvtec import index_category
    from defectkit.datasets.split import build_manifest
    from defectkit.finetune import sam as S
    from defectkit.finetune.sam_core import CHECKPOINTS, build_tiny_sam, load_sam

    ck = tmp_path / CHECKPOINTS["vit_tiny"]
    torch.save(build_tiny_sam(256, seed=5).state_dict(), ck)
    sam, key = load_sam("vit_tiny", ck)
    ref = build_tiny_sam(256, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(sam.state_dict().values(), ref.state_dict().values(), strict=True))
    assert key.startswith("vit_tiny-") and len(key) == len("vit_tiny-") + 12  # keyed by the file's hash
    conv = tmp_path / "conv"
    convert(synthetic_root, build_manifest([index_category(synthetic_root, "washer")]), conv,
            ConvertConfig(formats=("coco",)), progress=False)
    args = S.get_args_parser().parse_args(["--data", str(conv), "--model", "vit_tiny", "--checkpoint", str(ck),
                                           "--epochs", "1", "--cache", str(tmp_path / "cache"), "--out",
                                           str(tmp_path / "run"), "-q", "--device", "cpu"])
    m = S.main(args)
    assert m["base"] == key and m["epochs_run"] == 1 and "note" not in m


def test_a_missing_sam_checkpoint_names_the_file_to_fetch(tmp_path):
    from defectkit.core.errors import MissingFileError
    from defectkit.finetune.sam_core import load_sam

    with pytest.raises(MissingFileError, match="sam_vit_b_01ec64.pth"):
        load_sam("vit_b", None)
