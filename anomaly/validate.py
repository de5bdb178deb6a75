"""``defectkit val`` for anomaly runs (the command itself: ``deploy/validate.py``): re-score a trained anomaly
run, on its own fold, on the whole official test split, or on another dataset in MVTec layout, with the
run's own head and the threshold it chose on validation.

    defectkit val --run work/runs/anomaly/<run>/<category>                     # the manifest's test fold again
    defectkit val --run RUN --split all                                         # every image of test/ (as papers)
    defectkit val --run RUN --data /data/other_line --category bottle          # another dataset, same category

Writes ``metrics.json`` and ``results.md`` to ``--out`` (default ``<run>/val/<data>-<category>-<split>``):
the same image and pixel metrics a training run writes (``review.metrics``), and the operating point at the
run's image threshold.  Re-scoring a run on its own test fold reproduces the figures it was trained with.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from defectkit.anomaly.deploy import AnomalyRunner, prepare_batch
from defectkit.core.errors import ConfigError
from defectkit.review import metrics as M
from defectkit.review.summary import finish_run

SPLITS = ("test", "val", "all")  # the manifest's test fold, its val fold, every image of the official test/


def run_data(run: Path, data: Path | None = None, category: str | None = None, manifest: Path | None = None,
             seed: int = 0) -> tuple[Path, dict, str | None]:
    """``(data root, split manifest, category)`` a run is scored on: by default the data, manifest and category
    its ``predictions.jsonl`` names; ``data`` (another MVTec-layout root) gets its own manifest."""
    from defectkit.converters.canonical import read_records
    from defectkit.datasets.split import resolve_manifest

    header, recs = read_records(Path(run) / "predictions.jsonl")
    category = category or (recs[0].category if recs else None)
    if data is None:
        data, manifest = Path(header["data_root"]), manifest or header.get("manifest")
    root, m = resolve_manifest(data, manifest, seed, category)
    return Path(root), m, category


def split_entries(m: dict, category: str | None, split: str) -> list:
    """The manifest's scored images of ``split`` (:data:`SPLITS`) for ``category``."""
    from defectkit.datasets.split import entries

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    return [e for e in entries(m, category=category, source_split="test") if split == "all" or e.fold == split]


def rescore(run: Path, data: Path | None = None, category: str | None = None, split: str = "test",
            manifest: Path | None = None, seed: int = 0, backend: str = "torch", batch: int = 16) -> dict:
    """The run's metrics on ``split`` of ``data`` (default: the data and manifest it was trained on)."""
    from defectkit.anomaly.data import entry_masks
    from defectkit.datasets.image_files import read_image

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    root, m, category = run_data(run, data, category, manifest, seed)
    chosen = split_entries(m, category, split)
    if not chosen:
        raise ConfigError(f"no image of {category!r} in the {split} split of {root}")
    runner = AnomalyRunner(run, backend)
    x = prepare_batch([read_image(root / e.image) for e in chosen], runner.spec)
    outs = [runner(x[i : i + batch]) for i in range(0, len(x), batch)]
    maps, scores = np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
    masks = entry_masks(root, chosen)
    y = np.array([e.defect_type != "good" for e in chosen])
    types = [e.defect_type for e in chosen]
    thr = runner.spec.get("thresholds", {})
    out = {"model": runner.spec["model"]["model"], "category": category, "data": str(root), "split": split,
           "protocol": "paper" if split == "all" else "manifest", "test_images": len(chosen), "run": str(run),
           "image": M.image_metrics(scores, y, types),
           "pixel": M.pixel_metrics([M.resize_map(a, mk.shape) for a, mk in zip(maps, masks, strict=True)], masks,
                                    types=types)}
    if thr.get("image") is not None:
        out["image"]["at_threshold"] = M.confusion_at(scores, y, thr["image"])
    return out


def main(args: argparse.Namespace) -> dict:
    m = rescore(args.run, args.data, args.category, args.split, args.manifest, args.seed, args.backend)
    name = f"{Path(m['data']).name}-{m['category']}-{m['split']}"
    out = Path(args.out) if args.out else Path(args.run) / "val" / name
    out.mkdir(parents=True, exist_ok=True)
    m = finish_run(out, "anomaly", m)
    print(f"{m['model']} on {m['category']} ({m['split']} split of {m['data']}, {m['test_images']} images): "
          f"image AUROC {m['image']['auroc']:.3f}, pixel AUROC {m['pixel']['auroc']:.3f}, "
          f"AUPRO@30% {m['pixel']['aupro']:.3f}")
    print(f"-> {out / 'metrics.json'}")
    return m
