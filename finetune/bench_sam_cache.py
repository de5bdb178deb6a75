"""Benchmark: a SAM decoder epoch with and without the image-embedding cache (``make bench-sam``).

    python -m defectkit.finetune.bench_sam_cache [--data CONVERSION] [--model tiny|vit_b --checkpoint PATH]

Times, in one run on the same training images: one decoder epoch that recomputes every image
embedding (what calling SAM end to end per step costs), and one decoder epoch reading the cache,
and prints both with their ratio.  The tiny model's encoder is cheap, so the ratio is modest; with
ViT-B (about 20 s per 1024 px image on 2 CPU cores) the uncached epoch is dominated by the encoder.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from defectkit.core.cli import HelpFormatter


def main(argv: list[str] | None = None) -> dict:
    import torch

    from defectkit.converters.canonical import read_records
    from defectkit.finetune import sam as S
    from defectkit.finetune import sam_data, sam_train
    from defectkit.finetune.sam_core import EmbeddingCache, load_sam

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", type=Path, default=sam_data.default_data())
    p.add_argument("--model", default="tiny")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--images", type=int, default=16, help="training images used")
    a = p.parse_args(argv)
    header, gt = read_records(a.data / "ground_truth.jsonl")
    items = sam_data.load_items(gt, Path(header["data_root"]), "train", None)
    items = [it for it in items if len(it.boxes)][: a.images]
    sam, key = load_sam(a.model, a.checkpoint)
    args = S.get_args_parser().parse_args(["--batch", "8", "--model", a.model])
    rng = np.random.default_rng(0)
    for q in sam.image_encoder.parameters():
        q.requires_grad_(False)
    opt = torch.optim.AdamW(sam.mask_decoder.parameters(), lr=1e-4)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sam-"))
    try:
        class NoCache(EmbeddingCache):
            def get(self, rgb):  # recompute every time: no disk, no memory
                self.misses += 1
                return self.encode(rgb)

        low = sam.image_encoder.img_size // 4
        nc = NoCache(sam, tmp / "none", key)
        t = time.perf_counter()
        sam_train.train_one_epoch(sam_train.sam_loss_module(sam, items, nc, args, low, "cpu"), items, opt, args, rng)
        uncached = time.perf_counter() - t
        cache = EmbeddingCache(sam, tmp / "cache", key)
        t = time.perf_counter()
        for it in items:
            cache.get(it.rgb)
        fill = time.perf_counter() - t
        cache.memory.clear()  # read from disk, as a later run does
        t = time.perf_counter()
        sam_train.train_one_epoch(sam_train.sam_loss_module(sam, items, cache, args, low, "cpu"), items, opt, args, rng)
        cached = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(len(it.boxes) for it in items)
    print(f"{a.model}: {len(items)} images, {n} instances, one decoder epoch")
    print(f"  without cache (encoder every step): {uncached:7.2f} s   (reference)")
    print(f"  with cache (read from disk):        {cached:7.2f} s   x{cached / uncached:.2f}")
    print(f"  filling the cache once:             {fill:7.2f} s")
    return {"uncached_s": uncached, "cached_s": cached, "fill_s": fill, "ratio": cached / uncached}


if __name__ == "__main__":
    main()
