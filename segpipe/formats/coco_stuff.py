"""COCO-Stuff JSON: ``annotations/stuff_<split>.json``, one RLE ``segmentation`` per (image,
category), images in ``images/<split>/`` (or COCO's ``<split>2017/``).

The semantic map paints each annotation's category over its RLE mask (``ignore_index`` where no
annotation covers a pixel). The RLEs are validated here (size equals the image's, runs sum to
height x width) and decoded in numpy, never by pycocotools. Stuff categories carry no
``isthing`` and are stuff; a category that declares ``isthing: 1`` also yields instances.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segpipe.formats import coco_files
from segpipe.formats.base import ClassInfo, Record, Source
from segpipe.formats.pngs import label_dtype, mask_bbox

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


def _record(input_dir: Path, job: coco_files.Job, classes: dict[int, ClassInfo]) -> Record:
    record, readable = coco_files.image_record(input_dir, job)
    if not readable:
        return record
    if not (isinstance(record.height, int) and isinstance(record.width, int) and record.height > 0 and record.width > 0):
        return record  # the size problem is already recorded by parse_images
    return coco_files.labelled(record, *paint_semantic(
        job.annotations, record.height, record.width, classes, f"{job.file.path}: image id {job.iid!r}", IGNORE_INDEX))


def _jobs(f: coco_files.JsonFile, problems: list[str]) -> list[coco_files.Job]:
    """One job per image of the file, with its annotations (an annotation of an image the file
    does not list, or a duplicate annotation id, is a problem)."""
    per_image: dict[Any, list[dict[str, Any]]] = {iid: [] for iid in f.images.by_id}
    ann_ids: set[Any] = set()
    for i, ann in enumerate(f.annotations):
        if not isinstance(ann, dict):
            problems.append(f"{f.path}: annotations[{i}] is not an object")
            continue
        aid, iid = ann.get("id"), ann.get("image_id")
        if iid not in per_image:
            problems.append(f"{f.path}: annotation id {aid!r} refers to image id {iid!r}, which is not in 'images'")
            continue
        if aid in ann_ids:
            f.images.problems.setdefault(iid, []).append(f"{f.path}: duplicate annotation id {aid!r}")
            continue
        ann_ids.add(aid)
        per_image[iid].append(ann)
    return [coco_files.Job(f, iid, img, per_image[iid], f.images.problems.get(iid, []))
            for iid, img in f.images.by_id.items()]


def read(input_dir: Path) -> Source:
    """Parse a COCO-Stuff dataset rooted at ``input_dir`` (holding ``annotations/stuff_*.json``)."""
    return coco_files.read_source("coco-stuff", Path(input_dir), PREFIX, IGNORE_INDEX, _jobs, _record)
