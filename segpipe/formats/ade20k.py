"""ADE20K full dataset, both distributed layouts, under ``training/`` and ``validation/`` (any
depth of scene folders below them):

- 2017 (``ADE20K_2016_07_26``/2017): ``X.jpg``, ``X_seg.png``, ``X_parts_N.png``, ``X_atr.txt``.
  ``X_seg.png`` holds ADE's global class index in R/G (``R // 10 * 256 + G``) and the object
  instances in B (instance k = the k-th smallest B value, 0 = none, as ADE's own loader reads
  it). ``X_atr.txt`` has one row per instance: ``k # part level # occluded # class name # raw
  name # "attributes"``. The global index refers to ``index_ade20k.mat``, which is not part of
  the per-image files, so the class of a pixel is the atr name of its instance.
- 2021 (``ADE20K_2021_17_01``): ``X.jpg``, ``X_seg.png``, ``X.json`` (``annotation.object``:
  ``name``, ``name_ndx`` = the R/G class index, ``parts.part_level``, ``instance_mask``) and
  ``X/instance_NNN_*.png``. The semantic map is R/G mapped through the JSON's ``name_ndx``;
  instances are the visible pixels of the objects' instance PNGs. Those PNGs are amodal: 255
  where the object is visible, 128 where it is hidden behind another one. Only the visible
  pixels are kept (modal, as COCO's masks are, and in agreement with the semantic map); the
  hidden extent is not stored (the shard schema has no field for it). Binary 0/1 PNGs (as
  some exporters write) are read as visible where 1.

The split is the ``training``/``validation`` folder wherever it sits below ``--input``, so the
dataset's own root (``ADE20K_2021_17_01/`` with ``images/ADE/training/...``,
``ADE20K_2016_07_26/`` with ``images/training/...``) and its ``training``/``validation`` folders
themselves are all valid inputs. An image under neither gets the converter's hash split.

Only whole objects (part level 0) are used: parts have no place in the shard schema. The class
table is every object name in the dataset, sorted, ids from 0; ADE has no thing/stuff split and
annotates every object as an instance, so every class is a thing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segpipe.files import escape_reason
from segpipe.formats.base import ClassInfo, Record, Source
from segpipe.formats.pngs import (
    LabelPngError,
    class_colour,
    label_dtype,
    loaded,
    mask_bbox,
    read_label_png,
    read_rgb_png,
)

SPLITS = {"training": "train", "validation": "val"}
# 2021 instance PNG values: outside the object, its hidden (occluded) extent, its visible pixels.
OUTSIDE, OCCLUDED, VISIBLE = 0, 128, 255
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class AdeObject:
    """A whole object (part level 0) of one image."""

    instance: int  # 2017: instance index in the B channel; 2021: the JSON object's id
    name: str
    name_ndx: int | None = None  # 2021: ADE's class index, as in the R/G channels
    mask_path: Path | None = None  # 2021: instance PNG


@dataclass
class AdeImage:
    image: Path
    layout: str  # "2017" or "2021"
    annotation: Path
    objects: list[AdeObject] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def parse_atr(path: Path) -> tuple[list[AdeObject], list[str]]:
    """Whole objects of a 2017 ``*_atr.txt`` and problems naming the file and line."""
    objects, problems = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return [], [f"{path}: cannot read ({type(exc).__name__}: {exc})"]
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        cols = [c.strip() for c in line.split("#")]
        if len(cols) < 6 or not cols[0].isdigit() or not cols[1].isdigit() or not cols[3]:
            problems.append(f"{path}:{n}: expected 'instance # part level # occluded # name # raw name # \"attributes\"'")
            continue
        if int(cols[1]) == 0:
            objects.append(AdeObject(instance=int(cols[0]), name=cols[3]))
    seen: set[int] = set()
    for obj in objects:
        if obj.instance in seen:
            problems.append(f"{path}: instance {obj.instance} listed twice at part level 0")
        seen.add(obj.instance)
    return objects, problems


def parse_json(path: Path) -> tuple[list[AdeObject], list[str]]:
    """Whole objects of a 2021 per-image JSON and problems naming the file and object id."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        objs = doc["annotation"]["object"]
        if not isinstance(objs, list):
            raise TypeError("'annotation.object' is not a list")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        return [], [f"{path}: cannot read ADE20K annotation ({type(exc).__name__}: {exc})"]
    objects, problems = [], []
    for i, obj in enumerate(objs):
        try:
            level = obj["parts"]["part_level"]
            if level != 0:
                continue
            oid, name, ndx, mask = obj["id"], obj["name"], obj["name_ndx"], obj["instance_mask"]
            if not (isinstance(oid, int) and isinstance(name, str) and name and isinstance(ndx, int)
                    and ndx > 0 and isinstance(mask, str)):
                raise TypeError("needs integer 'id', string 'name', positive integer 'name_ndx', string 'instance_mask'")
        except (KeyError, TypeError) as exc:
            problems.append(f"{path}: object[{i}]: {type(exc).__name__}: {exc}")
            continue
        if (reason := escape_reason(mask)) is not None:
            problems.append(f"{path}: object[{i}] (id {oid}): instance_mask {mask!r} {reason}; a PNG inside "
                            f"{path.parent} is expected (it was not read)")
            continue
        objects.append(AdeObject(instance=oid, name=name, name_ndx=ndx, mask_path=path.parent / mask))
    return objects, problems


def split_of(rel: Path) -> str | None:
    """``images/ADE/training/street/1.jpg`` -> ``"train"``: the split folder nearest the image."""
    for part in reversed(rel.parts[:-1]):
        if part in SPLITS:
            return SPLITS[part]
    return None


def visible_pixels(values: np.ndarray, path: Path) -> np.ndarray:
    """H x W bool: the visible pixels of a 2021 instance PNG (255 of 0/128/255, or 1 of 0/1)."""
    present = set(np.unique(values).tolist())
    if present <= {0, 1}:
        return values == 1
    if present <= {OUTSIDE, OCCLUDED, VISIBLE}:
        return values == VISIBLE
    raise LabelPngError(f"{path}: value(s) {sorted(present - {OUTSIDE, OCCLUDED, VISIBLE})[:10]}; an ADE20K "
                        f"instance mask holds {OUTSIDE} (outside), {OCCLUDED} (occluded) and {VISIBLE} (visible), or 0/1")


def _images(root: Path) -> list[Path]:
    """Every image file below ``root``; only those under a split folder when there are any (other
    folders, e.g. a copied toolkit with demo pictures, are not the dataset)."""
    found = []
    for image in sorted(p for d in root.iterdir() if d.is_dir() for p in d.rglob("*")):
        stem = image.stem
        if image.suffix.lower() not in IMAGE_SUFFIXES or stem.endswith("_seg") or "_parts_" in stem:
            continue
        if stem.startswith("instance_") or (image.parent.parent / f"{image.parent.name}.json").is_file():
            continue  # 2021 instance masks live in a folder named after their image
        found.append(image)
    split = [image for image in found if split_of(image.relative_to(root)) is not None]
    return split or found


def _index(root: Path) -> list[AdeImage]:
    items = []
    for image in _images(root):
        atr, js = image.with_name(f"{image.stem}_atr.txt"), image.with_suffix(".json")
        if js.is_file():
            objects, problems = parse_json(js)
            items.append(AdeImage(image, "2021", js, objects, problems))
        elif atr.is_file():
            objects, problems = parse_atr(atr)
            items.append(AdeImage(image, "2017", atr, objects, problems))
        else:
            items.append(AdeImage(image, "", image, [], [f"{image}: no {atr.name} (2017) or {js.name} (2021)"]))
    return items


def _class_of(rg: np.ndarray, mask: np.ndarray, where: str) -> int:
    values = np.unique(rg[mask])
    if len(values) != 1:
        raise LabelPngError(f"{where}: covers several R/G class indices {values[:10].tolist()}")
    return int(values[0])


def _record(root: Path, item: AdeImage, class_id: dict[str, int], ignore_index: int) -> Record:
    rel = item.image.relative_to(root)
    split = split_of(rel)
    seg_path = item.image.with_name(f"{item.image.stem}_seg.png")
    record = Record(image_id=rel.with_suffix("").as_posix(), source=f"{item.annotation} + {seg_path}",
                    image_path=item.image, split=split, problems=list(item.problems),
                    semantic_source=str(seg_path))
    if record.problems:
        return record
    dtype = label_dtype(max(ignore_index, len(class_id)))
    try:
        seg = read_rgb_png(seg_path, "an ADE20K _seg.png is RGB")
        rg = seg[..., 0].astype(np.int64) // 10 * 256 + seg[..., 1]
        semantic = np.full(rg.shape, ignore_index, dtype=dtype)
        instances = []
        if item.layout == "2017":
            _, inverse = np.unique(seg[..., 2], return_inverse=True)
            inst = inverse.reshape(rg.shape)
            listed = {o.instance for o in item.objects}
            unlisted = sorted(set(np.unique(inst).tolist()) - listed - {0})
            if unlisted:
                raise LabelPngError(f"{seg_path}: instance(s) {unlisted[:10]} in the B channel have no row in {item.annotation}")
            for obj in item.objects:
                mask = inst == obj.instance
                if not mask.any():
                    raise LabelPngError(f"{item.annotation}: instance {obj.instance} ({obj.name!r}) has no pixels in {seg_path}")
                _class_of(rg, mask, f"{seg_path}: instance {obj.instance}")
                semantic[mask] = class_id[obj.name]
                instances.append({"id": obj.instance, "category_id": class_id[obj.name], "iscrowd": 0,
                                  "mask": mask, "bbox": mask_bbox(mask)})
        else:
            lut = {0: ignore_index}
            for obj in item.objects:
                if lut.get(obj.name_ndx, class_id[obj.name]) != class_id[obj.name]:
                    raise LabelPngError(f"{item.annotation}: name_ndx {obj.name_ndx} names two classes")
                lut[obj.name_ndx] = class_id[obj.name]
            uniq, inverse = np.unique(rg, return_inverse=True)
            unknown = [v for v in uniq.tolist() if v not in lut]
            if unknown:
                raise LabelPngError(f"{seg_path}: R/G class index(es) {unknown[:10]} have no object in {item.annotation}")
            semantic = np.array([lut[v] for v in uniq.tolist()], dtype=dtype)[inverse.reshape(rg.shape)]
            for obj in item.objects:
                values = read_label_png(obj.mask_path, grey_rgb=True)
                if values.shape != rg.shape:
                    raise LabelPngError(f"{obj.mask_path}: {values.shape[1]} x {values.shape[0]}, {seg_path} is {rg.shape[1]} x {rg.shape[0]}")
                if not values.any():
                    raise LabelPngError(f"{obj.mask_path}: object {obj.instance} ({obj.name!r}) has an empty mask")
                mask = visible_pixels(values, obj.mask_path)
                if not mask.any():  # wholly hidden: nothing of it is in the picture or the semantic map
                    record.annotation_problems.append(
                        (obj.instance, f"{obj.mask_path}: object {obj.instance} ({obj.name!r}) has no visible pixel "
                                       f"(only occluded ones, value {OCCLUDED}); an instance is its visible pixels"))
                    continue
                instances.append({"id": obj.instance, "category_id": class_id[obj.name], "iscrowd": 0,
                                  "mask": mask, "bbox": mask_bbox(mask)})
    except LabelPngError as exc:
        record.problems.append(str(exc))
        return record
    record.semantic = loaded(semantic)
    record.instances = instances
    return record


def read(input_dir: Path) -> Source:
    """Parse an ADE20K dataset rooted at ``input_dir`` (holding ``training/`` and ``validation/``)."""
    root = Path(input_dir)
    if not root.is_dir():
        return Source(name="ade20k", classes=[], ignore_index=255, records=lambda: iter(()), files=[],
                      problems=[f"{root}: not a directory"])
    items = _index(root)
    problems = [] if items else [f"{root}: no ADE20K images (X.jpg with X_seg.png and X.json or X_atr.txt) below it"]
    names = sorted({o.name for item in items for o in item.objects})
    # ADE has no background class: ids start at a real object, coloured as id + 1 so that none is black.
    classes = [ClassInfo(id=i, name=name, isthing=True, color=class_colour(i + 1)) for i, name in enumerate(names)]
    # A full ADE20K class list (~3,600 names) runs past 255, where ignore_index would collide.
    ignore_index = 255 if len(classes) < 255 else 65535
    class_id = {c.name: c.id for c in classes}

    def records() -> Iterator[Record]:
        for item in items:
            yield _record(root, item, class_id, ignore_index)

    files = set()
    for item in items:
        files.update([item.image, item.annotation])
        seg = item.image.with_name(f"{item.image.stem}_seg.png")
        if seg.is_file():
            files.add(seg)
        files.update(o.mask_path for o in item.objects if o.mask_path is not None and o.mask_path.is_file())
    return Source(name="ade20k", classes=classes, ignore_index=ignore_index, records=records,
                  files=sorted(files), problems=problems, count=len(items))
