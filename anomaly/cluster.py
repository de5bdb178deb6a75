"""Several categories in one folder: K-Means regroups the images, then one model per cluster.

    python -m defectkit.anomaly.cluster --categories washer,weave --k 2 [--features pixels|resnet18]
        [--train -- <anomaly/train.py arguments>]

The dataset's ``train/good`` images of the given categories are pooled as if they came unsorted
in one folder.  Each image becomes a feature vector (``pixels``: a 32x32 grayscale thumbnail and a
colour histogram; ``resnet18``: pooled frozen ImageNet features, weights from disk), K-Means
(scikit-learn, ``k`` clusters, seeded) groups them, and the report gives each cluster's size and
make-up and the purity against the true categories.  With ``--train``, a manifest is written per
cluster, where the cluster plays the role of a category (its training images are the cluster's,
its test images those of the test fold that the fitted K-Means assigns to it), and
``anomaly/train.py`` trains and scores one model on each.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from defectkit.core.atomic import atomic_write_json
from defectkit.core.cli import Categories, HelpFormatter


def thumbnail_features(rgb: np.ndarray) -> np.ndarray:
    """A 32x32 grayscale thumbnail (zero-mean, unit-norm) and an 8-bin-per-channel histogram."""
    g = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    g = (g - g.mean()).ravel()
    g /= np.linalg.norm(g) + 1e-8
    hist = np.concatenate([np.histogram(rgb[..., c], bins=8, range=(0, 256))[0] for c in range(3)]).astype(np.float32)
    return np.concatenate([g, hist / hist.sum()])


def kmeans(features: np.ndarray, k: int, seed: int = 0):
    """A fitted scikit-learn K-Means on standardised features (the scaler is part of the model)."""
    from sklearn.cluster import KMeans
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), KMeans(n_clusters=k, n_init=10, random_state=seed)).fit(features)


def purity(clusters: np.ndarray, truth: np.ndarray) -> float:
    """Share of images whose cluster's majority category is their own."""
    clusters, truth = np.asarray(clusters), np.asarray(truth)
    hit = sum(Counter(truth[clusters == c]).most_common(1)[0][1] for c in np.unique(clusters))
    return hit / len(truth)


def _features(paths: list[Path], kind: str, weights: Path | None) -> np.ndarray:
    from defectkit.datasets.image_files import read_image

    if kind == "pixels":
        return np.stack([thumbnail_features(read_image(p)) for p in paths])
    import torch

    from defectkit.anomaly.data import prepare
    from defectkit.anomaly.features import MEAN, STD, load_backbone

    net = load_backbone(kind, weights)
    x = torch.from_numpy(np.stack([prepare(read_image(p), 224, "rgb") for p in paths]))
    with torch.no_grad():
        f = torch.nn.Sequential(*list(net.children())[:-1])((x - MEAN) / STD)
    return f.flatten(1).numpy()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m defectkit.anomaly.cluster", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--manifest", type=Path, default=None)
    p.add_argument("--categories", nargs="+", action=Categories, required=True,
                   help="the categories pooled into one folder (space- or comma-separated)")
    p.add_argument("--k", type=int, default=None, help="clusters (default: the number of categories)")
    p.add_argument("--features", choices=("pixels", "resnet18", "resnet50"), default="pixels")
    p.add_argument("--backbone-weights", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--train", action="store_true", help="train one anomaly model per cluster (arguments after --)")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def cluster_manifest(manifest: dict, name: str, train, train_clusters, held, held_clusters, c: int) -> dict:
    """A manifest where cluster ``c`` plays the role of one category called ``name``."""
    ents = [{**e.__dict__, "category": name} for e, cl in zip(train, train_clusters, strict=True) if cl == c]
    ents += [{**e.__dict__, "category": name} for e, cl in zip(held, held_clusters, strict=True) if cl == c]
    return {**{k: v for k, v in manifest.items() if k != "path"}, "categories": [name], "entries": ents}


def main(argv: list[str] | None = None) -> dict:
    """``argv``: this tool's flags, then ``--`` and the ``anomaly/train.py`` flags for --train."""
    from defectkit.core.cli import setup_logging
    from defectkit.core.paths import WORK
    from defectkit.datasets.split import entries, resolve_manifest

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    a = get_args_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    setup_logging(a.quiet)
    root, manifest = resolve_manifest(a.data, a.manifest, a.seed)
    cats = list(a.categories)
    k = a.k or len(cats)
    train = [e for c in cats for e in entries(manifest, category=c, source_split="train")]
    held = [e for c in cats for e in entries(manifest, category=c, source_split="test")]
    feats = _features([root / e.image for e in train], a.features, a.backbone_weights)
    model = kmeans(feats, k, a.seed)
    clusters = model.predict(feats)
    truth = np.array([e.category for e in train])
    report = {"categories": cats, "k": k, "features": a.features, "images": len(train),
              "purity": purity(clusters, truth),
              "clusters": {f"cluster{c}": dict(Counter(truth[clusters == c])) for c in range(k)}}
    out = a.out or WORK / "runs" / "anomaly" / f"clusters-{'-'.join(cats)}-k{k}"
    out.mkdir(parents=True, exist_ok=True)
    if a.train:
        report["runs"] = _train_clusters(root, manifest, model, a, extra, out, train, clusters, held, k)
    atomic_write_json(out / "clusters.json", report)
    print(f"K-Means (k={k}, {a.features}) over {len(train)} train/good images of {', '.join(cats)}: "
          f"purity {report['purity']:.3f}; " + "; ".join(f"{n}: {v}" for n, v in report["clusters"].items()))
    for n, r in report.get("runs", {}).items():
        print(f"  {n}: image AUROC {r['image_auroc']:.3f}, pixel AUROC {r['pixel_auroc'] or float('nan'):.3f}")
    return report


def _train_clusters(root, manifest, model, a, extra, out, train, clusters, held, k) -> dict:
    """One anomaly model per cluster, through the trainer's own config (no Namespace is faked)."""
    from defectkit.anomaly.config import DataConfig, RunConfig
    from defectkit.anomaly.train import get_args_parser as train_parser
    from defectkit.anomaly.train import run_category
    from defectkit.datasets.split import write_manifest

    base = RunConfig.from_args(train_parser().parse_args(extra))
    held_clusters = model.predict(_features([root / e.image for e in held], a.features, a.backbone_weights))
    runs = {}
    for c in range(k):
        name = f"cluster{c}"
        mpath = write_manifest(cluster_manifest(manifest, name, train, clusters, held, held_clusters, c),
                               out / name / "manifest.json")
        cfg = dataclasses.replace(base, out=out / name / "run",
                                  data=DataConfig(data=a.data, category=name, manifest=mpath, seed=a.seed,
                                                  holdout=base.data.holdout,
                                                  cutpaste_per_image=base.data.cutpaste_per_image,
                                                  val_fold=base.data.val_fold))
        m = run_category(cfg)
        runs[name] = {"image_auroc": m["image"]["auroc"], "pixel_auroc": m.get("pixel", {}).get("auroc"),
                      "test_images": m["test_images"]}
    return runs


if __name__ == "__main__":
    from defectkit.core.errors import DefectkitError

    try:
        main()
    except DefectkitError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
