"""COCO panoptic: ``annotations/panoptic_<split>.json`` + ``annotations/panoptic_<split>/*.png``.

Each PNG pixel holds a segment id as ``R + 256 G + 256^2 B`` (0 = unlabelled); the JSON's
``segments_info`` gives each segment's ``category_id`` and ``iscrowd``, its ``categories`` give
``isthing``. The semantic map is every segment's category (``ignore_index`` where unlabelled);
thing segments also become instances with their pixel mask. Stuff lives in the semantic map only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segpipe.files import escape_reason
from segpipe.formats import coco_files
from segpipe.formats.base import ClassInfo, Record, Source
from segpipe.formats.pngs import LabelPngError, label_dtype, mask_bbox, read_id_png

IGNORE_INDEX = 255
PREFIX = "panoptic_"


def decode_segments(
    ids: np.ndarray, segments: list[dict[str, Any]], classes: dict[int, ClassInfo], png: Path, ignore_index: int
) -> tuple[np.ndarray, list[dict[str, Any]], list[str]]:
    """Panoptic id map (H x W int) + its ``segments_info`` -> (semantic, thing instances, problems).

    A pixel id without a segment, a segment without pixels, a duplicate segment id or an
    undeclared category is a problem naming ``png`` and the segment id.
    """
    problems: list[str] = []
    by_id: dict[int, dict[str, Any]] = {}
    listed: set[int] = set()  # well-formed segment ids, declared category or not
    for i, seg in enumerate(segments):
        if not isinstance(seg, dict) or not coco_files.is_int(seg.get("id")) or not coco_files.is_int(seg.get("category_id")):
            problems.append(f"{png}: segments_info[{i}] needs integer 'id' and 'category_id', got {seg!r:.200}")
            continue
        if seg["id"] in listed:
            problems.append(f"{png}: duplicate segment id {seg['id']} in segments_info")
            continue
        listed.add(seg["id"])
        if seg["category_id"] not in classes:
            problems.append(f"{png}: segment id {seg['id']} has undeclared category_id {seg['category_id']}")
            continue
        by_id[seg["id"]] = seg
    uniq, inverse = np.unique(ids, return_inverse=True)
    inverse = inverse.reshape(ids.shape)
    present = set(uniq.tolist())
    unknown = sorted(present - listed - {0})
    if unknown:
        problems.append(f"{png}: segment id(s) {unknown[:10]} in the PNG have no segments_info entry")
    missing = sorted(listed - present)
    if missing:
        problems.append(f"{png}: segments_info id(s) {missing[:10]} have no pixels in the PNG")
    max_id = max([ignore_index, *classes])
    lut = np.full(len(uniq), ignore_index, dtype=label_dtype(max_id))
    instances = []
    for k, seg_id in enumerate(uniq.tolist()):
        seg = by_id.get(seg_id)
        if seg is None:
            continue
        lut[k] = seg["category_id"]
        if classes[seg["category_id"]].isthing:
            mask = inverse == k
            instances.append({
                "id": seg_id,
                "category_id": seg["category_id"],
                "iscrowd": int(bool(seg.get("iscrowd", 0))),
                "mask": mask,
                "bbox": mask_bbox(mask),
            })
    return lut[inverse], instances, problems


def _record(input_dir: Path, job: coco_files.Job, classes: dict[int, ClassInfo]) -> Record:
    json_path, iid, ann = job.file.path, job.iid, job.annotations
    if job.img is None:
        # An annotation for an image id the JSON does not list: keep it visible in the quarantine.
        name = ann.get("file_name") if ann and isinstance(ann.get("file_name"), str) else f"image_{iid}"
        return Record(
            image_id=coco_files.image_key(name), source=str(json_path), split=job.file.split,
            problems=[*job.problems, f"{json_path}: annotation for image id {iid!r}, which is not in 'images'"],
        )
    record, readable = coco_files.image_record(input_dir, job)
    if not readable:
        return record
    problems, file_name = record.problems, job.img["file_name"]
    if ann is None:
        problems.append(f"{json_path}: image id {iid!r} has no entry in 'annotations'")
        return record
    png_name = ann.get("file_name")
    if not isinstance(png_name, str) or not png_name:
        png_name = str(Path(file_name).with_suffix(".png"))
    if (reason := escape_reason(png_name)) is not None:
        problems.append(f"{json_path}: image id {iid!r}: annotation file_name {png_name!r} {reason}; a PNG inside "
                        f"{json_path.with_suffix('')} is expected (it was not read)")
        return record
    png = json_path.with_suffix("") / png_name
    record.source = f"{json_path} + {png}"
    record.semantic_source = str(png)
    segments = ann.get("segments_info")
    if not isinstance(segments, list):
        problems.append(f"{json_path}: image id {iid!r}: 'segments_info' missing or not a list")
        return record
    try:
        ids = read_id_png(png)
    except LabelPngError as exc:
        problems.append(str(exc))
        return record
    if (record.height, record.width) != ids.shape:
        problems.append(
            f"{png}: PNG is {ids.shape[1]} x {ids.shape[0]} but image id {iid!r} is declared "
            f"{record.width} x {record.height} in {json_path}"
        )
    return coco_files.labelled(record, *decode_segments(ids, segments, classes, png, IGNORE_INDEX))


def _jobs(f: coco_files.JsonFile, problems: list[str]) -> list[coco_files.Job]:
    """One job per image id of the file: its entry in ``images`` and in ``annotations`` (either may
    be missing: the record says so)."""
    anns: dict[Any, dict[str, Any]] = {}
    ann_problems: dict[Any, list[str]] = {}
    for i, ann in enumerate(f.annotations):
        iid = ann.get("image_id") if isinstance(ann, dict) else None
        if not (coco_files.is_int(iid) or isinstance(iid, str)):
            problems.append(f"{f.path}: annotations[{i}] has no integer or string 'image_id'")
        elif iid in anns:
            ann_problems.setdefault(iid, []).append(f"{f.path}: image id {iid!r} has two entries in 'annotations'")
        else:
            anns[iid] = ann
    images = f.images
    return [coco_files.Job(f, iid, images.by_id.get(iid), anns.get(iid),
                           images.problems.get(iid, []) + ann_problems.get(iid, []))
            for iid in [*images.by_id, *(a for a in anns if a not in images.by_id)]]


def _segment_png(job: coco_files.Job) -> Path | None:
    """The segment PNG a record reads, unless its name leaves the dataset (then it is never read)."""
    png = job.annotations.get("file_name") if job.annotations is not None else None
    if isinstance(png, str) and escape_reason(png) is None and (job.file.path.with_suffix("") / png).is_file():
        return job.file.path.with_suffix("") / png
    return None


def read(input_dir: Path) -> Source:
    """Parse a COCO panoptic dataset rooted at ``input_dir`` (holding ``annotations/``)."""
    return coco_files.read_source("coco-panoptic", Path(input_dir), PREFIX, IGNORE_INDEX, _jobs, _record, _segment_png)
