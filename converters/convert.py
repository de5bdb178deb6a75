"""The file layer of the converters: manifest in, every label format out, with a fidelity report.

Output folder (written to a temporary folder beside it and renamed into place when complete)::

    <out>/yolo/images/<fold>/<name>.<ext>      links (or copies) of the dataset's images
    <out>/yolo/labels/<fold>/<name>.txt        one "class cx cy w h" line per region
    <out>/yolo/data.yaml                       Ultralytics dataset file (train / val / test)
    <out>/yolo_seg/{images,labels}/..., data.yaml   polygons, holes joined by zero-width cuts
    <out>/coco/<fold>.json                     file_name relative to the dataset root
    <out>/voc/Annotations/<name>.xml, voc/ImageSets/Main/<fold>.txt
    <out>/label_maps/<fold>/<name>.png, label_maps/classes.txt   0 = background, id + 1
    <out>/ground_truth.jsonl                   the canonical format (converters/canonical.py)
    <out>/classes.txt, fidelity.json, conversion.json

``<name>`` is ``<category>__<defect type>__<stem>`` (``train_good`` for the dataset's train
images), so names never collide across defect types, and labels are named after images, not
masks.  Good images get empty label files: they are the detectors' backgrounds.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from defectkit.converters import canonical, label_formats
from defectkit.converters.instances import (
    Instances,
    box_iou,
    class_name,
    class_names,
    decode_rle,
    encode_rle,
    mask_iou,
    mask_to_instances,
    polygon_to_mask,
    select,
)
from defectkit.core.atomic import atomic_dir, atomic_write_text
from defectkit.core.errors import ConfigError, DataError
from defectkit.datasets.image_files import ImageReadError, check_complete, read_header, read_mask
from defectkit.datasets.split import FOLDS, ManifestEntry, entries

log = logging.getLogger(__name__)

FORMATS = ("yolo", "yolo_seg", "coco", "voc", "label_maps")
LICENSES = {
    "mvtec_ad": {"id": 1, "name": "CC BY-NC-SA 4.0", "url": "https://creativecommons.org/licenses/by-nc-sa/4.0/"},
    "synthetic": {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"},
}


class ConversionError(DataError):
    """Bad input for a conversion; the message names the file."""


@dataclass(frozen=True)
class ConvertConfig:
    formats: tuple[str, ...] = FORMATS
    scheme: str = "defect"
    min_area: int = 0
    copy_images: bool = False
    train_good: int = 0  # how many of the dataset's train/good images to add as train backgrounds
    coco_polygons: bool = False
    workers: int = 1  # processes; with 1, ``threads`` threads share the per-image work
    threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    license: str = "mvtec_ad"
    verify: bool = True  # redraw what was written and compare with the source masks

    def __post_init__(self):
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise ConfigError(f"unknown formats {bad}; choose from {FORMATS}")


@dataclass
class ImageResult:
    """What one image contributes to every format, computed in a worker (picklable)."""

    name: str
    fold: str
    entry: dict
    image_abs: str
    image_hw: tuple[int, int]
    channels: int
    labels: list[str] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)
    areas: list[int] = field(default_factory=list)
    rles: list[dict] = field(default_factory=list)
    yolo: str = ""
    yolo_seg: str = ""
    voc: str = ""
    coco: list[dict] = field(default_factory=list)
    coco_kept_rle: int = 0
    fidelity: dict = field(default_factory=dict)
    skipped: str | None = None
    dropped_small: int = 0
    crops: list[np.ndarray] = field(default_factory=list)  # instance masks inside their boxes, for verification


@functools.lru_cache(maxsize=16)
def _empty_png(hw: tuple[int, int]) -> bytes:
    """Background images share one all-zero label map per size: encode it once."""
    import cv2

    return cv2.imencode(".png", np.zeros(hw, np.uint8))[1].tobytes()


def source_iou(drawn: np.ndarray, source: np.ndarray) -> float:
    """IoU of two same-size masks (non-zero = defect; 1.0 when both are empty), computed with
    OpenCV's SIMD pixel counts over the image and the intersection (``min`` of the two: non-zero
    where both are) inside the source's defect box only (outside it the source is empty, so nothing
    intersects there): exact, and cheap."""

    a = drawn if drawn.dtype == np.uint8 else (drawn != 0).astype(np.uint8)
    b = source if source.dtype == np.uint8 else (source != 0).astype(np.uint8)
    na, nb = cv2.countNonZero(a), cv2.countNonZero(b)
    x, y, w, h = cv2.boundingRect(b)
    inter = cv2.countNonZero(cv2.min(a[y : y + h, x : x + w], b[y : y + h, x : x + w])) if w and h else 0
    union = na + nb - inter
    return inter / union if union else 1.0


def _kept_iou(crops: list[np.ndarray], boxes: np.ndarray, source: np.ndarray) -> float:
    """:func:`source_iou` of the instances' union against the source, drawn inside the source's
    defect box only (instances lie inside it: they are its connected regions)."""
    if not crops:
        return 1.0 if not cv2.countNonZero(source) else 0.0
    x, y, w, h = cv2.boundingRect(source)
    win = np.zeros((h, w), np.uint8)
    for c, (x0, y0, x1, y1) in zip(crops, boxes, strict=True):
        win[y0 - y : y1 - y, x0 - x : x1 - x] |= c
    src = source[y : y + h, x : x + w]
    inter = cv2.countNonZero(cv2.min(win, src))
    union = cv2.countNonZero(win) + cv2.countNonZero(source) - inter
    return inter / union if union else 1.0


def flat_name(e: ManifestEntry) -> str:
    group = "train_good" if e.source_split == "train" else e.defect_type
    return f"{e.category}__{group}__{Path(e.image).stem}"


def _mask_instances(root: Path, e: ManifestEntry, img_path: Path, hw, class_to_id, cfg: ConvertConfig,
                    res: ImageResult):
    """The source mask and its instances; marks ``res.skipped`` for an all-zero defect mask."""
    mask_path = root / e.mask
    try:
        raw = read_mask(mask_path, binary=False)
    except ImageReadError as err:
        raise ConversionError(str(err)) from err
    if raw.shape != hw:
        raise ConversionError(
            f"{mask_path}: mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image {img_path} "
            f"is {hw[1]}x{hw[0]}"
        )
    source = raw if raw.dtype == np.uint8 else (raw > 0).astype(np.uint8)  # > 0 is defect; kept raw for speed
    if not cv2.countNonZero(source):
        res.skipped = "empty mask on a defect image (kept for image-level metrics only)"
        return source, None
    cid = class_to_id[class_name(e.category, e.defect_type, cfg.scheme)]
    inst = mask_to_instances(source, cid)
    if cfg.min_area > 0:
        n_all = len(inst)
        inst = select(inst, inst.areas >= cfg.min_area)
        res.dropped_small = n_all - len(inst)
    return source, inst


def _build_formats(res: ImageResult, inst, e: ManifestEntry, hw, ch: int, img_path: Path, source: np.ndarray,
                   cfg: ConvertConfig, label_map_dir) -> dict[str, dict]:
    """Every requested format of one image, in memory (label maps written).  The label files are
    checked after they are written, from the files themselves (:func:`_verify_image`)."""
    fid: dict[str, dict] = {}
    verify = cfg.verify

    if "yolo" in cfg.formats:
        res.yolo = "\n".join(label_formats.yolo_box_lines(inst.boxes_xyxy, inst.class_ids, hw))
    if "yolo_seg" in cfg.formats:
        polys = label_formats.instance_polygons(inst)
        res.yolo_seg = "\n".join(label_formats.yolo_seg_lines(polys, inst.class_ids, hw))
    if "coco" in cfg.formats:
        res.coco, res.coco_kept_rle = label_formats.coco_annotations(
            inst, [c + 1 for c in inst.class_ids], polygons=cfg.coco_polygons, rles=res.rles
        )
    if "voc" in cfg.formats:
        res.voc = label_formats.voc_xml(
            f"{res.name}{img_path.suffix}", hw, ch, inst.boxes_xyxy, res.labels, folder=e.category, path=res.image_abs
        )
    if "label_maps" in cfg.formats:
        import cv2

        lm = label_formats.label_map(inst, hw)
        out = Path(label_map_dir) / e.fold / f"{res.name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        png = _empty_png(hw) if not len(inst) else cv2.imencode(".png", lm)[1].tobytes()
        out.write_bytes(png)
        if verify:  # the PNG round trip itself is OpenCV's job (and tested in tests/test_convert.py)
            fid["label_maps"] = {"image_iou": source_iou(lm, source) if e.mask else None}
    return fid


def _convert_one(args: tuple) -> ImageResult:
    """One image, start to end: read its mask, build every format, write the image's own files into
    the output folder ``tmp`` and (``cfg.verify``) read them back and score them.  Each image writes
    only its own files, so images run in any order, on threads or processes, with the same bytes."""
    e_dict, data_root, class_to_id, cfg, tmp, yaml_names = args
    label_map_dir = Path(tmp) / "label_maps"
    e = ManifestEntry(**e_dict)
    root = Path(data_root)
    img_path = root / e.image
    try:
        hw, ch = read_header(img_path)
        check_complete(img_path)  # images are linked, never decoded here: catch truncation now
    except ImageReadError as err:
        raise ConversionError(str(err)) from err
    res = ImageResult(flat_name(e), e.fold, e_dict, str(img_path.resolve()), hw, ch)
    inst = Instances(np.zeros((0, *hw), bool), np.zeros((0, 4)), np.zeros(0, int), np.zeros(0, int))
    source = np.zeros(hw, bool)
    if e.mask is not None:
        source, inst = _mask_instances(root, e, img_path, hw, class_to_id, cfg, res)
        if res.skipped:
            return res
    names = sorted(class_to_id, key=class_to_id.get)
    res.labels = [names[c] for c in inst.class_ids]
    res.boxes = inst.boxes_xyxy.tolist()
    res.areas = inst.areas.tolist()
    res.rles = [encode_rle(m, b) for m, b in zip(inst.masks, inst.boxes_xyxy, strict=True)]
    fid = _build_formats(res, inst, e, hw, ch, img_path, source, cfg, label_map_dir)
    if cfg.verify and e.mask:
        res.crops = [m[y0:y1, x0:x1] for m, (x0, y0, x1, y1) in zip(inst.masks, inst.boxes_xyxy.astype(int),
                                                                    strict=True)]
        fid["kept_vs_source_iou"] = _kept_iou(res.crops, inst.boxes_xyxy.astype(int), source)
    res.fidelity = fid
    _write_image_files(Path(tmp), res, cfg)
    if cfg.verify:
        _verify_image(Path(tmp), res, cfg, yaml_names)
    res.crops = []  # only the check needed them
    return res


def _link_or_copy(src: str, dst: Path, copy: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(src, dst)
    else:
        os.symlink(src, dst)


def _data_yaml(root: Path, names: Sequence[str], folds: Sequence[str], final_root: Path, note: str) -> str:
    import yaml

    d = {
        "path": str(final_root.resolve()),
        **{("val" if f == "val" else f): f"images/{f}" for f in folds},
        "names": dict(enumerate(names)),
    }
    return f"# {note}\n" + yaml.safe_dump(d, sort_keys=False)


def _summ(values: list[float]) -> dict | None:
    if not values:
        return None
    a = np.asarray(values, float)
    return {"mean": float(a.mean()), "min": float(a.min()), "n": len(a)}


def convert(
    data_root: str | Path,
    manifest: dict,
    out: str | Path,
    cfg: ConvertConfig = ConvertConfig(),
    categories: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Convert the manifest's images under ``data_root`` into every format in ``cfg.formats``.

    Returns the conversion report (also written as ``fidelity.json``).  Raises
    :class:`ConversionError` naming the file for a corrupt or missing mask or image, or a mask
    whose size differs from its image; ``PermissionError`` / ``OSError`` naming the folder when
    ``out`` cannot be written.  Nothing is left half-written.
    """
    from defectkit.core.progress import progress as bar

    data_root, out = Path(data_root), Path(out)
    cats = list(categories or manifest["categories"])
    missing = [c for c in cats if c not in manifest["categories"]]
    if missing:
        raise ConversionError(
            f"categories {missing} are not in the split manifest (it has "
            f"{manifest['categories']}); rerun `make split` with CATEGORY=..."
        )
    chosen: list[ManifestEntry] = []
    for c in cats:
        chosen += entries(manifest, category=c, source_split="test")
        chosen += entries(manifest, category=c, source_split="train")[: cfg.train_good]
    classes = class_names([(e.category, e.defect_type) for e in chosen], cfg.scheme)
    class_to_id = {n: i for i, n in enumerate(classes)}
    folds = [f for f in FOLDS if any(e.fold == f for e in chosen)]

    with atomic_dir(out) as tmp:
        _prepare_folders(tmp, out, classes, folds, cfg)
        names = _class_ids(tmp / "yolo" / "data.yaml") if "yolo" in cfg.formats else {}
        jobs = [(asdict(e), str(data_root), class_to_id, cfg, str(tmp), names) for e in chosen]
        if cfg.workers > 1:
            with ProcessPoolExecutor(cfg.workers) as pool:
                it = pool.map(_convert_one, jobs, chunksize=8)
                results = list(bar(it, total=len(jobs), desc="convert", disable=not progress))
        else:  # threads: decoding, encoding and file calls release the GIL; results keep their order
            with ThreadPoolExecutor(cfg.threads) as pool:
                results = list(bar(pool.map(_convert_one, jobs), total=len(jobs), desc="convert",
                                   disable=not progress))
        report = _write_outputs(tmp, out, results, classes, folds, cfg, data_root, manifest)
    log.info("conversion written to %s", out)
    return report


def _prepare_folders(tmp: Path, final: Path, classes: list[str], folds: list[str], cfg: ConvertConfig) -> None:
    """Every folder the images write into, and the YOLO ``data.yaml`` files, before any image runs;
    each image's own files are written by :func:`_write_image_files`."""
    if "voc" in cfg.formats:
        (tmp / "voc" / "Annotations").mkdir(parents=True, exist_ok=True)
    if "label_maps" in cfg.formats:
        for fold in folds:
            (tmp / "label_maps" / fold).mkdir(parents=True, exist_ok=True)
    for fmt in ("yolo", "yolo_seg"):
        if fmt not in cfg.formats:
            continue
        for fold in folds:
            (tmp / fmt / "images" / fold).mkdir(parents=True, exist_ok=True)
            (tmp / fmt / "labels" / fold).mkdir(parents=True, exist_ok=True)
        note = (
            "YOLO detection labels by defectkit"
            if fmt == "yolo"
            else "YOLO-seg polygons by defectkit: holes joined to their outline by zero-width cuts"
        )
        (tmp / fmt / "data.yaml").write_text(_data_yaml(tmp / fmt, classes, folds, final / fmt, note))


def _write_image_files(tmp: Path, r: ImageResult, cfg: ConvertConfig) -> None:
    """One image's files in every per-image format (image links, YOLO / YOLO-seg labels, VOC XML)."""
    for fmt in ("yolo", "yolo_seg"):
        if fmt in cfg.formats:
            suffix = Path(r.image_abs).suffix
            _link_or_copy(r.image_abs, tmp / fmt / "images" / r.fold / f"{r.name}{suffix}", cfg.copy_images)
            text = getattr(r, fmt)
            (tmp / fmt / "labels" / r.fold / f"{r.name}.txt").write_text(text + "\n" if text else "")
    if "voc" in cfg.formats:
        (tmp / "voc" / "Annotations" / f"{r.name}.xml").write_text(r.voc)


def _verify_image(tmp: Path, r: ImageResult, cfg: ConvertConfig, names: dict[int, str]) -> None:
    """Fidelity of what is on disk for one image: its YOLO, YOLO-seg and VOC label files are read
    back, parsed and redrawn, and compared with the image's instances.  A fault in the writing (a
    shifted box, a lost vertex, labels under another image's name) shows here."""
    hw = r.image_hw
    boxes, cls_names = np.asarray(r.boxes, float).reshape(-1, 4), r.labels
    if "yolo" in cfg.formats:
        text = (tmp / "yolo" / "labels" / r.fold / f"{r.name}.txt").read_text()
        pb, pc = label_formats.parse_yolo_box_lines(text, hw)
        ok_n = len(pb) == len(boxes)
        ious = np.diag(box_iou(pb, boxes)).tolist() if ok_n and len(boxes) else ([] if ok_n else [0.0])
        r.fidelity["yolo"] = {"instance_iou": ious,
                              "classes_ok": ok_n and [names[int(c)] for c in pc] == list(cls_names)}
    if "yolo_seg" in cfg.formats:
        text = (tmp / "yolo_seg" / "labels" / r.fold / f"{r.name}.txt").read_text()
        r.fidelity["yolo_seg"] = _seg_fidelity(label_formats.parse_yolo_seg_lines(text, hw), r.crops, boxes, hw)
    if "voc" in cfg.formats:
        vb, vn = label_formats.parse_voc_xml((tmp / "voc" / "Annotations" / f"{r.name}.xml").read_text())
        ok = len(vb) == len(boxes) and np.allclose(vb, boxes) and vn == list(cls_names)
        r.fidelity["voc"] = {"exact": bool(ok)}


def _class_ids(data_yaml: Path) -> dict[int, str]:
    import yaml

    return {int(k): v for k, v in yaml.safe_load(data_yaml.read_text())["names"].items()}


def _seg_fidelity(parsed, crops: list[np.ndarray], boxes: np.ndarray, hw) -> dict:
    """Each polygon redrawn against its instance (inside the window holding both), and the union
    of the polygons against the union of the instances (inside the window holding them all).
    ``crops`` are the instances' masks inside their boxes (instances are empty outside them), so
    nothing here is image-sized: the cost follows the defects."""
    if len(parsed) != len(crops):
        return {"instance_iou": [0.0], "image_iou": 0.0}
    if not crops:
        return {"instance_iou": [], "image_iou": None}
    boxes = np.asarray(boxes, int).reshape(-1, 4)
    wins = []
    for (_, p), box in zip(parsed, boxes, strict=True):
        lo = np.maximum(np.minimum(np.floor(p.min(0)), box[:2]), 0).astype(int)
        hi = np.minimum(np.maximum(np.floor(p.max(0)) + 1, box[2:]), [hw[1], hw[0]]).astype(int)
        wins.append((lo, hi))
    glo = np.min([lo for lo, _ in wins], 0)
    ghi = np.max([hi for _, hi in wins], 0)
    union = np.zeros((ghi[1] - glo[1], ghi[0] - glo[0]), bool)
    truth = np.zeros_like(union)
    ious = []
    for (_, p), crop, box, (lo, hi) in zip(parsed, crops, boxes, wins, strict=True):
        r = polygon_to_mask(p - lo, (hi[1] - lo[1], hi[0] - lo[0]))
        m = np.zeros_like(r)
        m[box[1] - lo[1] : box[3] - lo[1], box[0] - lo[0] : box[2] - lo[0]] = crop
        ious.append(mask_iou(r, m, empty=1.0))
        union[lo[1] - glo[1] : hi[1] - glo[1], lo[0] - glo[0] : hi[0] - glo[0]] |= r
        truth[box[1] - glo[1] : box[3] - glo[1], box[0] - glo[0] : box[2] - glo[0]] |= crop
    return {"instance_iou": ious, "image_iou": mask_iou(union, truth, empty=1.0)}


def _write_coco(tmp: Path, used: list[ImageResult], classes: list[str], folds: list[str], cfg: ConvertConfig,
                data_root: Path) -> dict[str, Path]:
    coco_files: dict[str, Path] = {}
    if "coco" in cfg.formats:
        (tmp / "coco").mkdir()
        lic = LICENSES.get(cfg.license, LICENSES["mvtec_ad"])
        for fold in folds:
            images, anns = [], []
            for i, r in enumerate((r for r in used if r.fold == fold), start=1):
                images.append(
                    {
                        "id": i,
                        "file_name": r.entry["image"],
                        "height": r.image_hw[0],
                        "width": r.image_hw[1],
                        "license": lic["id"],
                        "category": r.entry["category"],
                        "defect_type": r.entry["defect_type"],
                        "fold": fold,
                        "key": r.entry["key"],
                    }
                )
                for a in r.coco:
                    anns.append({"id": len(anns) + 1, "image_id": i, **a})
            doc = {
                "info": {
                    "description": "defectkit conversion of an MVTec-layout dataset",
                    "data_root": str(data_root.resolve()),
                    "fold": fold,
                    "version": "1.0",
                },
                "licenses": [lic],
                "images": images,
                "annotations": anns,
                "categories": [{"id": k + 1, "name": n, "supercategory": "defect"} for k, n in enumerate(classes)],
            }
            coco_files[fold] = tmp / "coco" / f"{fold}.json"
            coco_files[fold].write_text(json.dumps(doc))
    return coco_files


def _write_voc(tmp: Path, used: list[ImageResult], folds: list[str]) -> None:
    """The VOC image sets; each image's XML is written by :func:`_write_image_files`."""
    (tmp / "voc" / "Annotations").mkdir(parents=True, exist_ok=True)
    (tmp / "voc" / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for fold in folds:
        (tmp / "voc" / "ImageSets" / "Main" / f"{fold}.txt").write_text(
            "".join(f"{r.name}\n" for r in used if r.fold == fold)
        )


def _write_ground_truth(tmp: Path, results: list[ImageResult], classes: list[str], cfg: ConvertConfig,
                        data_root: Path, manifest: dict) -> None:
    header = canonical.make_header(
        "ground_truth",
        "ground_truth",
        classes,
        data_root,
        manifest=manifest.get("path"),
        scheme=cfg.scheme,
        seed=manifest.get("seed"),
    )
    canonical.write_records(
        tmp / "ground_truth.jsonl",
        header,
        (
            canonical.ImageRecord(
                image=r.entry["image"],
                height=r.image_hw[0],
                width=r.image_hw[1],
                boxes_xyxy=np.asarray(r.boxes).reshape(-1, 4),
                labels=r.labels,
                masks=r.rles,
                key=r.entry["key"],
                category=r.entry["category"],
                defect_type=r.entry["defect_type"],
                fold=r.fold,
            )
            for r in results
        ),
    )


def _write_outputs(
    tmp: Path,
    final: Path,
    results: list[ImageResult],
    classes: list[str],
    folds: list[str],
    cfg: ConvertConfig,
    data_root: Path,
    manifest: dict,
) -> dict:
    used = [r for r in results if r.skipped is None]
    atomic_write_text(tmp / "classes.txt", "\n".join(classes) + "\n")
    coco_files = _write_coco(tmp, used, classes, folds, cfg, data_root) if "coco" in cfg.formats else {}
    if "voc" in cfg.formats:
        _write_voc(tmp, used, folds)
    if "label_maps" in cfg.formats:
        (tmp / "label_maps").mkdir(exist_ok=True)
        (tmp / "label_maps" / "classes.txt").write_text("\n".join(["background", *classes]) + "\n")
    _write_ground_truth(tmp, results, classes, cfg, data_root, manifest)
    report = _fidelity(results, classes, cfg, coco_files, data_root)
    atomic_write_text(tmp / "fidelity.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(
        tmp / "conversion.json",
        json.dumps(
            {
                "data_root": str(data_root.resolve()),
                "config": {k: v for k, v in asdict(cfg).items() if k not in ("workers", "threads")},
                "classes": classes,
                "folds": folds,
                "images": {f: sum(r.fold == f for r in used) for f in folds},
                "manifest_seed": manifest.get("seed"),
            },
            indent=1,
        )
        + "\n",
    )
    return report


def _coco_check(path: Path, results: list[ImageResult]) -> dict:
    """Load the written COCO file with pycocotools and rasterise every annotation its way.

    Compressed RLE strings are equal exactly when masks are, so a mask is decoded only when
    they differ; box and area are checked with pycocotools' ``toBbox`` and ``area``.
    """
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    by_key = {r.entry["key"]: r for r in results}
    ious, bbox_ok, area_ok = [], True, True
    for img in coco.dataset["images"]:
        r = by_key[img["key"]]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        for a, rle, box, area in zip(anns, r.rles, r.boxes, r.areas, strict=True):
            theirs = coco.annToRLE(a)
            counts = theirs["counts"].encode() if isinstance(theirs["counts"], str) else theirs["counts"]
            same = counts == rle["counts"].encode()
            ious.append(1.0 if same else mask_iou(mask_utils.decode(theirs).astype(bool), decode_rle(rle), empty=1.0))
            bbox_ok &= bool(np.allclose(a["bbox"], label_formats.xyxy_to_coco_bbox(box)))
            bbox_ok &= bool(np.allclose(mask_utils.toBbox({**theirs, "counts": counts}), a["bbox"])) or not same
            area_ok &= a["area"] == area and (int(mask_utils.area({**theirs, "counts": counts})) == area or not same)
    return {"instance_iou": ious, "bbox_matches_toBbox": bool(bbox_ok), "area_is_pixel_count": bool(area_ok)}


def _fidelity(
    results: list[ImageResult], classes: list[str], cfg: ConvertConfig, coco_files: dict, data_root: Path
) -> dict:
    used = [r for r in results if r.skipped is None]
    per_format: dict[str, dict] = {}
    for fmt in cfg.formats if cfg.verify else ():
        if fmt == "coco":
            checks = [_coco_check(p, used) for p in coco_files.values()]
            ious = [v for c in checks for v in c["instance_iou"]]
            per_format["coco"] = {
                "instance_iou": _summ(ious),
                "bbox_matches_toBbox": all(c["bbox_matches_toBbox"] for c in checks),
                "area_is_pixel_count": all(c["area_is_pixel_count"] for c in checks),
                "segmentation": "polygons (RLE for regions with holes)" if cfg.coco_polygons else "rle",
                "regions_kept_as_rle_for_holes": sum(r.coco_kept_rle for r in used),
            }
            continue
        f = [r.fidelity[fmt] for r in used if fmt in r.fidelity]
        entry: dict = {}
        inst = [v for x in f for v in x.get("instance_iou", [])]
        if inst or fmt in ("yolo", "yolo_seg"):
            entry["instance_iou"] = _summ(inst)
        img = [x["image_iou"] for x in f if x.get("image_iou") is not None]
        if img:
            entry["image_iou_vs_source"] = _summ(img)
        if f and "exact" in f[0]:
            entry["exact"] = all(x["exact"] for x in f)
        if fmt == "yolo":
            entry["classes_ok"] = all(x["classes_ok"] for x in f)
        per_format[fmt] = entry
    counts: Counter = Counter()
    per_fold: dict[str, Counter] = defaultdict(Counter)
    for r in used:
        for lab in r.labels:
            counts[lab] += 1
            per_fold[r.fold][lab] += 1
    skipped = [{"image": r.entry["image"], "reason": r.skipped} for r in results if r.skipped]
    dropped = sum(r.dropped_small for r in results)
    kept = [r.fidelity["kept_vs_source_iou"] for r in used if r.fidelity.get("kept_vs_source_iou") is not None]
    return {
        "data_root": str(data_root.resolve()),
        "scheme": cfg.scheme,
        "classes": classes,
        "images": len(used),
        "background_images": sum(1 for r in used if not r.labels),
        "instances_per_class": {c: counts[c] for c in classes},
        "instances_per_fold": {f: dict(sorted(c.items())) for f, c in sorted(per_fold.items())},
        "formats": per_format,
        "skipped_images": skipped,
        "regions_dropped_by_min_area": {"min_area": cfg.min_area, "count": dropped, "kept_vs_source_iou": _summ(kept)},
    }


def format_report(report: dict) -> str:
    from tabulate import tabulate

    rows = []
    for fmt, f in report["formats"].items():
        inst = f.get("instance_iou")
        img = f.get("image_iou_vs_source")
        rows.append(
            [
                fmt,
                inst and f"{inst['mean']:.4f}",
                inst and f"{inst['min']:.4f}",
                img and f"{img['mean']:.4f} / {img['min']:.4f}",
                ", ".join(f"{k}={v}" for k, v in f.items() if k not in ("instance_iou", "image_iou_vs_source")),
            ]
        )
    lines = [
        f"converted {report['images']} images ({report['background_images']} backgrounds), scheme "
        f"{report['scheme']}, {sum(report['instances_per_class'].values())} instances: "
        + ", ".join(f"{k} {v}" for k, v in report["instances_per_class"].items()),
        tabulate(
            rows,
            ["format", "instance IoU mean", "min", "image IoU mean / min", "checks"],
            tablefmt="github",
            missingval="-",
        ),
    ]
    if report["skipped_images"]:
        lines.append(
            f"skipped {len(report['skipped_images'])} image(s): "
            + "; ".join(f"{s['image']} ({s['reason']})" for s in report["skipped_images"][:5])
        )
    d = report["regions_dropped_by_min_area"]
    if d["count"]:
        lines.append(f"dropped {d['count']} region(s) smaller than {d['min_area']} px")
    return "\n".join(lines)
