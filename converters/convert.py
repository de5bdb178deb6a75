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
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from defectkit.converters import canonical, label_formats
from defectkit.converters.fidelity import fidelity_report, format_report, kept_iou, source_iou, verify_image
from defectkit.converters.instances import Instances, class_name, class_names, encode_rle, mask_to_instances, select
from defectkit.converters.job import FORMATS, LICENSES, ConversionError, ConvertConfig, ImageResult, flat_name
from defectkit.core.atomic import atomic_dir, atomic_write_text
from defectkit.core.progress import progress as bar
from defectkit.datasets.image_files import ImageReadError, check_complete, read_header, read_mask
from defectkit.datasets.split import FOLDS, ManifestEntry, entries

__all__ = ["FORMATS", "ConversionError", "ConvertConfig", "convert", "format_report"]  # the converters' API

log = logging.getLogger(__name__)


#: PNG rows unfiltered: a label map is long runs of one value, which zlib packs as well without the filters
#: OpenCV tries by default (1.66 against 2.16 ms for a 1024 px map, and smaller files)
LABEL_MAP_PNG = [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


@functools.lru_cache(maxsize=16)
def _empty_png(hw: tuple[int, int]) -> bytes:
    """Background images share one all-zero label map per size: encode it once."""
    return cv2.imencode(".png", np.zeros(hw, np.uint8), LABEL_MAP_PNG)[1].tobytes()


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
        lm = label_formats.label_map(inst, hw)
        out = Path(label_map_dir) / e.fold / f"{res.name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        png = _empty_png(hw) if not len(inst) else cv2.imencode(".png", lm, LABEL_MAP_PNG)[1].tobytes()
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
        fid["kept_vs_source_iou"] = kept_iou(res.crops, inst.boxes_xyxy.astype(int), source)
    res.fidelity = fid
    _write_image_files(Path(tmp), res, cfg)
    if cfg.verify:
        verify_image(Path(tmp), res, cfg, yaml_names)
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


def _class_ids(data_yaml: Path) -> dict[int, str]:
    import yaml

    return {int(k): v for k, v in yaml.safe_load(data_yaml.read_text())["names"].items()}


def _write_coco(tmp: Path, used: list[ImageResult], classes: list[str], folds: list[str], cfg: ConvertConfig,
                data_root: Path) -> dict[str, Path]:
    coco_files: dict[str, Path] = {}
    if "coco" in cfg.formats:
        (tmp / "coco").mkdir()
        lic = LICENSES.get(cfg.license, LICENSES["mvtec_ad"])
        for fold in folds:
            rs = [r for r in used if r.fold == fold]
            images = [{"file_name": r.entry["image"], "height": r.image_hw[0], "width": r.image_hw[1],
                       "license": lic["id"], "category": r.entry["category"], "defect_type": r.entry["defect_type"],
                       "fold": fold, "key": r.entry["key"]} for r in rs]
            info = {"description": "defectkit conversion of an MVTec-layout dataset",
                    "data_root": str(data_root.resolve()), "fold": fold, "version": "1.0"}
            doc = label_formats.coco_document(images, [r.coco for r in rs], classes, lic, info)
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
    report = fidelity_report(results, classes, cfg, coco_files, data_root)
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


