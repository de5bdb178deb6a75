"""Plots of an anomaly run: ROC curves, score histograms, best and worst cases, projections."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _img(x: np.ndarray) -> np.ndarray:
    return x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)


def write_plots(out: Path, inputs, recon, maps, masks, scores, labels, types, latents=None, *, pixel=True,
                title: str = "") -> list[Path]:
    """Write ``roc.png``, ``scores.png``, ``cases.png`` and ``projections.png`` into ``out``."""
    from sklearn.metrics import roc_curve

    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels, bool)
    written = []

    fig, ax = plt.subplots(1, 2 if pixel else 1, figsize=(9 if pixel else 4.5, 4), squeeze=False)
    if labels.any() and (~labels).any():
        fpr, tpr, _ = roc_curve(labels, scores)
        ax[0, 0].plot(fpr, tpr, label="all")
        t = np.asarray(types)
        for d in sorted(set(t[labels])):
            sel = (~labels) | (t == d)
            f, r, _ = roc_curve(labels[sel], np.asarray(scores)[sel])
            ax[0, 0].plot(f, r, lw=0.8, alpha=0.7, label=d)
    ax[0, 0].plot([0, 1], [0, 1], "k:", lw=0.5)
    ax[0, 0].set(title="image ROC", xlabel="false positive rate", ylabel="true positive rate")
    ax[0, 0].legend(fontsize=7)
    if pixel:
        sub = slice(None, None, max(1, maps.size // 2_000_000))
        m, g = np.asarray(maps).ravel()[sub], np.asarray(masks).ravel()[sub]
        if g.any():
            f, r, _ = roc_curve(g, m)
            ax[0, 1].plot(f, r)
        ax[0, 1].plot([0, 1], [0, 1], "k:", lw=0.5)
        ax[0, 1].set(title="pixel ROC", xlabel="false positive rate")
    fig.suptitle(title)
    fig.tight_layout()
    written.append(_save(fig, out / "roc.png", plt))

    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(np.min(scores), np.max(scores), 30)
    ax.hist(np.asarray(scores)[~labels], bins, alpha=0.6, label="good")
    ax.hist(np.asarray(scores)[labels], bins, alpha=0.6, label="defect")
    ax.set(title=f"image scores {title}", xlabel="score", ylabel="images")
    ax.legend()
    fig.tight_layout()
    written.append(_save(fig, out / "scores.png", plt))

    order = np.argsort(scores)
    picks = [("highest score", i) for i in order[::-1][:4]] + [("lowest score", i) for i in order[:4]]
    cols = 4 if recon is not None else 3
    fig, ax = plt.subplots(len(picks), cols, figsize=(2.2 * cols, 2.1 * len(picks)), squeeze=False)
    for r, (what, i) in enumerate(picks):
        panels = [("input", _img(inputs[i]))] + ([("reconstruction", _img(recon[i]))] if recon is not None else [])
        panels += [("anomaly map", maps[i]), ("ground truth", masks[i])]
        for c, (name, im) in enumerate(panels):
            ax[r, c].imshow(
                im,
                cmap="gray" if im.ndim == 2 and name != "anomaly map" else "jet" if name == "anomaly map" else None,
                vmin=0 if name != "anomaly map" else None,
                vmax=1 if name != "anomaly map" else None,
            )
            ax[r, c].set_xticks([]), ax[r, c].set_yticks([])
            if c == 0:
                ax[r, c].set_ylabel(f"{what}\n{types[i]} {scores[i]:.3g}", fontsize=7)
            if r == 0:
                ax[r, c].set_title(name, fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "cases.png", plt))

    written.append(projections(out / "projections.png", inputs, latents, types, plt))
    return written


def projections(path: Path, inputs, latents, types, plt=None) -> Path:
    """2-D PCA and t-SNE of the test images (downsampled pixels) and of encoder latents."""
    import cv2
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    plt = plt or _plt()
    pix = np.stack(
        [cv2.resize(_img(x).astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA).ravel() for x in inputs]
    )
    spaces = [("pixels", pix)] + ([("encoder latent", np.asarray(latents))] if latents is not None else [])
    fig, ax = plt.subplots(len(spaces), 2, figsize=(9, 4 * len(spaces)), squeeze=False)
    t = np.asarray(types)
    for r, (name, feats) in enumerate(spaces):
        emb = [("PCA", PCA(2).fit_transform(feats))]
        emb.append(
            (
                "t-SNE",
                TSNE(2, perplexity=min(30, max(2, len(feats) // 4)), init="pca", random_state=0).fit_transform(feats),
            )
        )
        for c, (method, e) in enumerate(emb):
            for d in sorted(set(t)):
                ax[r, c].scatter(*e[t == d].T, s=12, label=d, marker="o" if d == "good" else "^")
            ax[r, c].set_title(f"{method} of {name}", fontsize=9)
        ax[r, 0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
