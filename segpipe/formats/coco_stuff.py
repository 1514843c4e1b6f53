"""COCO-Stuff JSON: ``annotations/stuff_<split>.json``, one RLE ``segmentation`` per (image,
category), images in ``images/<split>/`` (or COCO's ``<split>2017/``).

The semantic map paints each annotation's category over its RLE mask (``ignore_index`` where no
annotation covers a pixel). The RLEs are validated here (size equals the image's, runs sum to
height x width) and decoded in numpy, never by pycocotools. Stuff categories carry no
``isthing`` and are stuff; a category that declares ``isthing: 1`` also yields instances.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.files import escape_reason
from segpipe.formats import coco_files
from segpipe.formats.base import ClassInfo, Record, Source
from segpipe.formats.pngs import label_dtype, loaded, mask_bbox

IGNORE_INDEX = 255
PREFIX = "stuff_"


def paint_semantic(
    annotations: list[dict[str, Any]], height: int, width: int, classes: dict[int, ClassInfo], where: str,
    ignore_index: int,
) -> tuple[np.ndarray, list[dict[str, Any]], list[str]]:
    """Paint one image's stuff annotations: (H x W semantic, thing instances, problems).

    Bad RLE, undeclared categories and overlapping annotations are problems naming ``where`` and
    the annotation id; nothing reaches pycocotools.
    """
    problems: list[str] = []
    semantic = np.full((height, width), ignore_index, dtype=label_dtype(max([ignore_index, *classes])))
    owner = np.full((height, width), -1, dtype=np.int64)  # index of the annotation painting a pixel
    instances = []
    for k, ann in enumerate(annotations):
        aid = ann.get("id")
        at = f"{where}: annotation id {aid!r}"
        cid = ann.get("category_id")
        if cid not in classes:
            problems.append(f"{at}: undeclared category_id {cid!r}")
            continue
        try:
            counts = coco_files.rle_counts(ann.get("segmentation"), height, width, at)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        mask = coco_files.rle_to_mask(counts, height, width)
        overlap = owner[mask]
        overlap = overlap[overlap >= 0]
        if overlap.size:
            other = annotations[int(overlap[0])].get("id")
            problems.append(f"{at}: overlaps annotation id {other!r} on {overlap.size} pixel(s)")
        owner[mask] = k
        semantic[mask] = cid
        if classes[cid].isthing and mask.any():
            instances.append({"id": aid, "category_id": cid, "iscrowd": int(bool(ann.get("iscrowd", 0))),
                              "mask": mask, "bbox": mask_bbox(mask)})
    return semantic, instances, problems


def _record(
    input_dir: Path, path: Path, split: str, folder: str, iid: Any, img: dict[str, Any],
    anns: list[dict[str, Any]], classes: dict[int, ClassInfo], problems: list[str],
) -> Record:
    problems = list(problems)
    if escaped := coco_files.image_path_problem(path, iid, img["file_name"]):
        return Record(image_id=coco_files.image_key(img["file_name"]), source=str(path), split=split,
                      problems=[*problems, escaped])
    image_path = coco_files.find_image(input_dir, folder, split, img["file_name"])
    if image_path is None:
        problems.append(
            f"{path}: image id {iid!r}: {img['file_name']} not found in images/{folder}/, images/{split}/, {folder}/ or images/"
        )
    record = Record(image_id=coco_files.image_key(img["file_name"]), source=str(path), image_path=image_path,
                    split=split, height=img.get("height"), width=img.get("width"), problems=problems)
    if not (isinstance(record.height, int) and isinstance(record.width, int) and record.height > 0 and record.width > 0):
        return record  # the size problem is already recorded by parse_images
    semantic, instances, paint_problems = paint_semantic(
        anns, record.height, record.width, classes, f"{path}: image id {iid!r}", IGNORE_INDEX
    )
    problems.extend(paint_problems)
    record.semantic = loaded(semantic)
    record.instances = instances
    return record


def read(input_dir: Path) -> Source:
    """Parse a COCO-Stuff dataset rooted at ``input_dir`` (holding ``annotations/stuff_*.json``)."""
    input_dir = Path(input_dir)
    json_paths = sorted((input_dir / "annotations").glob(f"{PREFIX}*.json"))
    problems: list[str] = []
    if not json_paths:
        problems.append(f"{input_dir / 'annotations'}: no {PREFIX}*.json file")
    tables = []
    jobs = []
    for path in json_paths:
        doc, problem = coco_files.load_json(path)
        if doc is None:
            problems.append(problem)
            continue
        table, cat_problems = coco_files.parse_categories(doc, path, default_isthing=False)
        problems.extend(cat_problems)
        tables.append((path, table))
        split, folder = coco_files.split_from_name(path.stem, PREFIX)
        images = coco_files.parse_images(doc, path)
        problems.extend(images.file_problems)
        per_image: dict[Any, list[dict[str, Any]]] = {iid: [] for iid in images.by_id}
        ann_ids: set[Any] = set()
        raw = doc.get("annotations")
        if not isinstance(raw, list):
            problems.append(f"{path}: 'annotations' missing or not a list")
            raw = []
        for i, ann in enumerate(raw):
            if not isinstance(ann, dict):
                problems.append(f"{path}: annotations[{i}] is not an object")
                continue
            aid, iid = ann.get("id"), ann.get("image_id")
            if iid not in per_image:
                problems.append(f"{path}: annotation id {aid!r} refers to image id {iid!r}, which is not in 'images'")
                continue
            if aid in ann_ids:
                images.problems.setdefault(iid, []).append(f"{path}: duplicate annotation id {aid!r}")
                continue
            ann_ids.add(aid)
            per_image[iid].append(ann)
        for iid, img in images.by_id.items():
            jobs.append((path, split, folder, iid, img, per_image[iid], images.problems.get(iid, [])))
    classes, merge_problems = coco_files.merge_classes(tables, IGNORE_INDEX)
    problems.extend(merge_problems)
    by_id = {c.id: c for c in classes}

    def records() -> Iterator[Record]:
        seen: dict[str, Path] = {}
        for path, split, folder, iid, img, anns, job_problems in jobs:
            record = _record(input_dir, path, split, folder, iid, img, anns, by_id, job_problems)
            if record.image_id in seen:
                record.problems.append(f"{path}: image id {record.image_id!r} also in {seen[record.image_id]}")
            seen.setdefault(record.image_id, path)
            yield record

    files = set(json_paths)
    for _, split, folder, _, img, _, _ in jobs:
        if escape_reason(img["file_name"]) is None and (  # an escaping path is never hashed or read
                found := coco_files.find_image(input_dir, folder, split, img["file_name"])):
            files.add(found)
    return Source(name="coco-stuff", classes=classes, ignore_index=IGNORE_INDEX, records=records,
                  files=sorted(files), problems=problems, count=len(jobs))
