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
import json
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np


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


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--manifest", type=Path, default=None)
    p.add_argument("--categories", required=True, help="comma-separated categories pooled into one folder")
    p.add_argument("--k", type=int, default=None, help="clusters (default: the number of categories)")
    p.add_argument("--features", choices=("pixels", "resnet18", "resnet50"), default="pixels")
    p.add_argument("--backbone-weights", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--train", action="store_true", help="train one anomaly model per cluster (arguments after --)")
    a = p.parse_args(own)

    from defectkit.anomaly.train import WORK, _manifest
    from defectkit.datasets.split import entries, write_manifest

    root, manifest = _manifest(argparse.Namespace(data=a.data, manifest=a.manifest, category=None, seed=a.seed))
    cats = a.categories.split(",")
    k = a.k or len(cats)
    train = [e for c in cats for e in entries(manifest, category=c, source_split="train")]
    held = [e for c in cats for e in entries(manifest, category=c, source_split="test")]
    model = kmeans(_features([root / e.image for e in train], a.features, a.backbone_weights), k, a.seed)
    clusters = model.predict(_features([root / e.image for e in train], a.features, a.backbone_weights))
    truth = np.array([e.category for e in train])
    report = {"categories": cats, "k": k, "features": a.features, "images": len(train),
              "purity": purity(clusters, truth),
              "clusters": {f"cluster{c}": dict(Counter(truth[clusters == c])) for c in range(k)}}
    out = a.out or WORK / "runs" / "anomaly" / f"clusters-{'-'.join(cats)}-k{k}"
    out.mkdir(parents=True, exist_ok=True)
    if a.train:
        from defectkit.anomaly import train as T

        held_clusters = model.predict(_features([root / e.image for e in held], a.features, a.backbone_weights))
        report["runs"] = {}
        for c in range(k):
            name = f"cluster{c}"
            ents = [{**e.__dict__, "category": name} for e, cl in zip(train, clusters, strict=True) if cl == c]
            ents += [{**e.__dict__, "category": name} for e, cl in zip(held, held_clusters, strict=True) if cl == c]
            sub = {**{k_: v for k_, v in manifest.items() if k_ != "path"}, "categories": [name], "entries": ents}
            mpath = write_manifest(sub, out / name / "manifest.json")
            args = T.get_args_parser().parse_args([*(["--data", str(root)] if a.data else []), "--category", name,
                                                   "--manifest", str(mpath), "--out", str(out / name / "run"), *extra])
            m = T.main(args)
            report["runs"][name] = {"image_auroc": m["image"]["auroc"], "pixel_auroc": m.get("pixel", {}).get("auroc"),
                                    "test_images": m["test_images"]}
    (out / "clusters.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"K-Means (k={k}, {a.features}) over {len(train)} train/good images of {', '.join(cats)}: "
          f"purity {report['purity']:.3f}; " + "; ".join(f"{n}: {v}" for n, v in report["clusters"].items()))
    for n, r in report.get("runs", {}).items():
        print(f"  {n}: image AUROC {r['image_auroc']:.3f}, pixel AUROC {r['pixel_auroc'] or float('nan'):.3f}")
    return report


if __name__ == "__main__":
    main()
