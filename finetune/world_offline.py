"""An Ultralytics YOLO-World trainer that never calls CLIP.

``WorldTrainer`` reads class embeddings from its cache file when the file holds exactly the
dataset's names (we write it beforehand, see :mod:`defectkit.finetune.text_embeddings`), but its
``on_pretrain_routine_end`` callback still calls ``set_classes``, which loads CLIP.  This trainer
swaps that callback for one that sets the EMA model's class embeddings from the same cache file.
The class lives in an importable module (not ``__main__``) so that Ultralytics' DDP launcher,
which re-imports the trainer by module path in each worker, finds it, and needs no extra
arguments for the same reason: everything it reads is on disk next to the training images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from ultralytics.models.yolo.world.train import WorldTrainer
from ultralytics.models.yolo.world.train import on_pretrain_routine_end as _clip_callback
from ultralytics.utils import LOGGER
from ultralytics.utils.torch_utils import unwrap_model

from defectkit.finetune.text_embeddings import CACHE_NAME, read_cache


def set_world_classes(model, names: list[str], embeddings: torch.Tensor) -> None:
    """What ``WorldModel.set_classes`` does, with embeddings given instead of computed by CLIP."""
    model = unwrap_model(model)
    model.txt_feats = embeddings.reshape(1, len(names), -1).to(next(model.parameters()).device)
    model.model[-1].nc = len(names)
    model.names = dict(enumerate(names))


def _set_classes_from_cache(trainer) -> None:
    names = [n.split("/", 1)[0] for n in trainer.test_loader.dataset.data["names"].values()]
    cache = Path(trainer.data["train"]).parent / CACHE_NAME
    feats = torch.from_numpy(read_cache(cache, names)).float()
    set_world_classes(trainer.ema.ema, names, feats)
    LOGGER.info(f"class embeddings for {names} set from {cache} (no CLIP call)")


class OfflineWorldTrainer(WorldTrainer):
    """``WorldTrainer`` with class embeddings read from disk, never from CLIP."""

    def generate_text_embeddings(self, texts: list[str], batch: int, cache_dir: Path) -> dict[str, torch.Tensor]:
        """The cache we wrote (any provider: its file name is the one Ultralytics looks for), loaded with
        ``weights_only=True`` and without Ultralytics' "Reading existed cache ... clip" line, which
        misnamed hash embeddings as CLIP's; anything else falls back to Ultralytics (CLIP)."""
        cache = Path(cache_dir) / CACHE_NAME
        if cache.is_file():
            txt_map = torch.load(cache, map_location=self.device, weights_only=True)
            if sorted(txt_map) == sorted(texts):
                return txt_map
        return super().generate_text_embeddings(texts, batch, cache_dir)

    def get_model(self, cfg=None, weights=None, verbose=True):
        model = super().get_model(cfg, weights, verbose)
        hooks = self.callbacks["on_pretrain_routine_end"]
        if _clip_callback in hooks:
            hooks.remove(_clip_callback)
        if _set_classes_from_cache not in hooks:
            hooks.append(_set_classes_from_cache)
        return model
