"""SAM pieces for fine-tuning: model building, the image-embedding cache, prompts, losses, prediction.

``Sam.forward`` runs under ``torch.no_grad()``, so training calls the prompt encoder and the mask
decoder directly on cached image embeddings; the image encoder runs once per image.
"""

from __future__ import annotations

import hashlib
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from defectkit.core.atomic import atomic_torch_save
from defectkit.core.errors import MissingFileError

CHECKPOINTS = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth",
               "vit_tiny": "sam_vit_tiny.pth"}
#: ``tiny``: built in memory, random (tests, offline demo); ``vit_tiny``: the same 2-block ViT read from
#: a checkpoint file in segment-anything's format, through the same loading code as vit_b/l/h
MODEL_NAMES = (*CHECKPOINTS, "tiny")
TINY_CHECKPOINT_SIZE = 256


def build_sam_vit_tiny(checkpoint: str | None = None):
    """A ``sam_model_registry``-style builder for the 2-block ViT: ``checkpoint`` is a state dict
    saved with ``torch.save(sam.state_dict(), "sam_vit_tiny.pth")``, read with weights_only=True."""
    sam = build_tiny_sam(TINY_CHECKPOINT_SIZE)
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam


def build_tiny_sam(img_size: int = 256, seed: int = 0, dim: int = 64):
    """A SAM built from ``segment_anything.modeling`` classes: a 2-block ViT at ``img_size``,
    ``dim``-wide prompt encoder and decoder.  Randomly initialised (seeded): for tests and the
    offline demo only."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(seed)
    emb = img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=16,
            embed_dim=dim,
            depth=2,
            num_heads=2,
            mlp_ratio=4,
            out_chans=dim,
            qkv_bias=True,
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(emb, emb), input_image_size=(img_size, img_size), mask_in_chans=8
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=4 * dim, num_heads=4),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def load_sam(model: str, checkpoint: Path | None, tiny_size: int = 256, seed: int = 0):
    """``(sam, key)``: the model and a string naming its weights (for caches and checkpoints).

    Raises ``FileNotFoundError`` for a missing checkpoint, saying where SAM weights come from.
    """
    if model == "tiny":
        return build_tiny_sam(tiny_size, seed), f"tiny-{tiny_size}-s{seed}"
    from segment_anything import sam_model_registry

    if checkpoint is None or not Path(checkpoint).is_file():
        raise MissingFileError(
            f"SAM checkpoint {checkpoint or CHECKPOINTS[model]} not found. Download {CHECKPOINTS[model]} from the "
            "segment-anything repository's model links on a machine with internet, copy it here and pass "
            "--checkpoint PATH (nothing is downloaded at run time); or use --model tiny for an offline smoke test."
        )
    registry = {**sam_model_registry, "vit_tiny": build_sam_vit_tiny}
    sam = registry[model](checkpoint=str(checkpoint))
    return sam.eval(), f"{model}-{file_sha256(Path(checkpoint))[:12]}"


class EmbeddingCache:
    """Image embeddings on disk, keyed by image content and model key (float16 ``.pt`` files).

    The ViT-B encoder takes ~20 s per 1024 px image on a 2-core CPU; decoder epochs then read
    the cache.  ``hits`` / ``misses`` count what happened.  With ``root=None`` embeddings are kept in
    memory only (deployment: new images are not worth a file).
    """

    def __init__(self, sam, root: Path | None, model_key: str, device: str = "cpu"):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.sam, self.device = sam, device
        self.dir = Path(root) / model_key if root is not None else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0
        self.live = False  # True while the encoder trains: every get() encodes anew, nothing is stored

    def key(self, rgb: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(rgb).tobytes() + str(rgb.shape).encode()).hexdigest()[:32]

    def input_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        return self.transform.get_preprocess_shape(hw[0], hw[1], self.sam.image_encoder.img_size)

    @torch.no_grad()
    def get(self, rgb: np.ndarray) -> torch.Tensor:
        """``(1, C, h, w)`` embedding of an ``(H, W, 3)`` uint8 RGB image."""
        if self.live:
            return self.encode(rgb)
        k = self.key(rgb)
        if k in self.memory:
            self.hits += 1
            return self.memory[k]
        path = self.dir / f"{k}.pt" if self.dir is not None else None
        if path is not None and path.is_file():
            self.hits += 1
            emb = torch.load(path, map_location=self.device, weights_only=True).float()
        else:
            self.misses += 1
            # stored as float16; a miss returns the same rounded values a later hit will read,
            # so a run gives the same result with a cold or a warm cache
            half = self.encode(rgb).half()
            if path is not None:
                atomic_torch_save(half.cpu(), path)
            emb = half.float()
        self.memory[k] = emb
        return emb

    def encode(self, rgb: np.ndarray, grad: bool = False) -> torch.Tensor:
        """The encoder's ``(1, C, h, w)`` embedding, without gradients unless ``grad`` (encoder training)."""
        x = torch.as_tensor(self.transform.apply_image(rgb), device=self.device).permute(2, 0, 1)[None].float()
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.sam.image_encoder(self.sam.preprocess(x))


def jitter_boxes(
    boxes: np.ndarray, hw: tuple[int, int], rng: np.random.Generator, frac: float = 0.1, max_px: float = 20.0
) -> np.ndarray:
    """Move each box edge by up to ``frac`` of the box side (at most ``max_px``), inside the image."""
    b = np.asarray(boxes, float).copy()
    if not len(b) or frac <= 0:
        return b
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    dx = np.minimum(frac * w, max_px)[:, None] * rng.uniform(-1, 1, (len(b), 2))
    dy = np.minimum(frac * h, max_px)[:, None] * rng.uniform(-1, 1, (len(b), 2))
    b[:, [0, 2]] += dx
    b[:, [1, 3]] += dy
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, hw[1])
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, hw[0])
    b[:, 2] = np.maximum(b[:, 2], b[:, 0] + 1)
    b[:, 3] = np.maximum(b[:, 3], b[:, 1] + 1)
    return b


def sample_points(masks: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(N, n, 2)`` xy points (pixel centres) drawn inside each mask."""
    out = np.zeros((len(masks), n, 2))
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        k = rng.integers(0, len(ys), n)
        out[i] = np.stack([xs[k] + 0.5, ys[k] + 0.5], 1)
    return out


def decode(
    sam,
    emb: torch.Tensor,
    boxes: np.ndarray,
    hw: tuple[int, int],
    cache: EmbeddingCache,
    points: np.ndarray | None = None,
    train_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution mask logits ``(N, 1, 4h, 4w)`` and IoU predictions ``(N, 1)`` for box prompts."""
    dev = emb.device
    box_t = torch.as_tensor(cache.transform.apply_boxes(np.asarray(boxes, float), hw), dtype=torch.float, device=dev)
    pts = None
    if points is not None:
        coords = torch.as_tensor(cache.transform.apply_coords(points, hw), dtype=torch.float, device=dev)
        pts = (coords, torch.ones(coords.shape[:2], dtype=torch.int, device=dev))
    with torch.set_grad_enabled(train_prompt and torch.is_grad_enabled()):
        sparse, dense = sam.prompt_encoder(points=pts, boxes=box_t, masks=None)
    logits, iou = sam.mask_decoder(
        image_embeddings=emb,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    strength = float(getattr(sam, "box_prior", 0.0))
    if strength:
        logits = logits + strength * (2 * box_occupancy(box_t, sam.image_encoder.img_size, logits.shape[-1]) - 1)
    return logits, iou


def box_occupancy(boxes_xyxy: torch.Tensor, size: int, low: int) -> torch.Tensor:
    """``(N, 1, low, low)``: the fraction of each low-resolution mask cell that lies inside each box (boxes in
    the encoder's ``size`` x ``size`` input frame): the box-as-mask answer on the decoder's grid.

    With ``sam.box_prior = S`` the decoder's logits are a residual on ``S * (2 * occupancy - 1)``: before
    training the mask *is* the prompt box, and training learns where a defect departs from its box (round
    blowholes, thin cracks). A decoder trained from scratch otherwise has to learn the box itself first,
    and on real parts it stayed below the box it was given."""
    edges = torch.arange(low + 1, dtype=boxes_xyxy.dtype, device=boxes_xyxy.device) * (size / low)
    lo, hi = edges[:-1], edges[1:]

    def overlap(a, b):  # (N, low): the part of each cell [lo, hi) inside [a, b), as a fraction of the cell
        return ((torch.minimum(hi, b[:, None]) - torch.maximum(lo, a[:, None])).clamp(min=0) / (size / low))

    ox, oy = overlap(boxes_xyxy[:, 0], boxes_xyxy[:, 2]), overlap(boxes_xyxy[:, 1], boxes_xyxy[:, 3])
    return (oy[:, :, None] * ox[:, None, :])[:, None]


def low_res_targets(masks: np.ndarray, hw: tuple[int, int], cache: EmbeddingCache, low: int) -> torch.Tensor:
    """GT masks in the decoder's low-resolution frame (resized longest side, padded), soft."""
    size = cache.sam.image_encoder.img_size
    ih, iw = cache.input_size(hw)
    t = torch.as_tensor(np.asarray(masks, np.float32))[:, None]
    t = F.interpolate(t, (ih, iw), mode="bilinear", align_corners=False)
    t = F.pad(t, (0, size - iw, 0, size - ih))
    return F.interpolate(t, (low, low), mode="area")


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, max_pos_weight: float = 100.0
                  ) -> torch.Tensor:
    """Soft Dice + class-balanced binary cross-entropy, averaged over masks.

    Defects cover a few pixels of the low-resolution mask (a contamination spot: 2-13 of 64x64), so a
    plain BCE drives every logit negative within an epoch, where the sigmoid saturates and Dice's
    gradient vanishes: the decoder then predicts empty masks for ever.  Each mask's positives are
    weighted by its negative/positive ratio (capped)."""
    p = torch.sigmoid(logits)
    inter = (p * target).flatten(1).sum(1)
    dice = 1 - (2 * inter + eps) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + eps)
    pos = target.flatten(1).sum(1).clamp(min=1.0)
    ratio = ((target.flatten(1).shape[1] - pos) / pos).clamp(1.0, max_pos_weight)
    weight = 1 + (ratio.view(-1, *[1] * (target.dim() - 1)) - 1) * target
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
    return dice.mean() + (bce.flatten(1).sum(1) / weight.flatten(1).sum(1)).mean()


def full_res(sam, low_logits: torch.Tensor, hw: tuple[int, int], cache: EmbeddingCache) -> torch.Tensor:
    """Probabilities ``(N, H, W)`` at the original image size."""
    return torch.sigmoid(sam.postprocess_masks(low_logits, cache.input_size(hw), hw)[:, 0])


# ---------------------------------------------------------------------------------- prompts on crops
# A defect is often a few pixels of a large image: 2-13 of the 64x64 low-resolution mask the decoder
# predicts for a 256 px input.  Cropping a window around each prompt box and resizing it to the
# encoder's input (``crop`` = the window's side in box sides) gives the decoder the defect at
# many times the resolution, at one encoder pass per prompt instead of per image.  SAM's own
# automatic mask generator crops for the same reason (``crop_n_layers``).


def prompt_window(box_xyxy, hw: tuple[int, int], crop: float, min_side: int = 24) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: a square window ``crop`` times the box's longer side (at least
    ``min_side`` px), centred on the box and shifted to lie inside the image (cut to the image where
    the image is smaller).  ``crop <= 0``: the whole image."""
    h, w = int(hw[0]), int(hw[1])
    if crop <= 0:
        return 0, h, 0, w
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    side = int(math.ceil(max(crop * max(x1 - x0, y1 - y0), min_side)))
    sh, sw = min(side, h), min(side, w)
    top = int(min(max(round((y0 + y1) / 2 - sh / 2), 0), h - sh))
    left = int(min(max(round((x0 + x1) / 2 - sw / 2), 0), w - sw))
    return top, top + sh, left, left + sw


Window = tuple[int, int, int, int]  # (y0, y1, x0, x1), half-open


def prompt_groups(boxes: np.ndarray, hw: tuple[int, int], crop: float) -> list[tuple[Window, list[int]]]:
    """The encoder passes a set of box prompts needs: ``[(window, indices of its boxes)]``; one pass
    over the whole image for every box when ``crop <= 0``, else one crop per box."""
    if crop <= 0:
        return [(prompt_window(None, hw, 0), list(range(len(boxes))))] if len(boxes) else []
    return [(prompt_window(b, hw, crop), [i]) for i, b in enumerate(np.asarray(boxes, float))]


def in_window(boxes: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
    """Boxes moved into the window's frame and cut to it (at least 1 px wide)."""
    y0, y1, x0, x1 = window
    b = np.asarray(boxes, float) - [x0, y0, x0, y0]
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, x1 - x0)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, y1 - y0)
    b[:, 2] = np.maximum(b[:, 2], b[:, 0] + 1)
    b[:, 3] = np.maximum(b[:, 3], b[:, 1] + 1)
    return b


def segment_boxes(sam, rgb: np.ndarray, boxes: np.ndarray, cache: EmbeddingCache, crop: float = 0.0,
                  encode=None) -> np.ndarray:
    """Mask probabilities ``(N, H, W)`` float32 for ``N`` box prompts on an ``(H, W, 3)`` uint8 image:
    each window of :func:`prompt_groups` is encoded (``encode(rgb)``, default the cache), decoded and
    pasted back; zero outside a box's window."""
    hw = rgb.shape[:2]
    out = np.zeros((len(boxes), *hw), np.float32)
    encode = encode or cache.get
    for (y0, y1, x0, x1), idx in prompt_groups(boxes, hw, crop):
        view = np.ascontiguousarray(rgb[y0:y1, x0:x1])
        emb = encode(view)
        logits, _ = decode(sam, emb, in_window(np.asarray(boxes, float)[idx], (y0, y1, x0, x1)), view.shape[:2], cache)
        out[idx, y0:y1, x0:x1] = full_res(sam, logits, view.shape[:2], cache).cpu().numpy()
    return out
