"""Cityscapes: ``gtFine/<split>/<city>/<stem>_gtFine_{labelIds,instanceIds,labelTrainIds}.png`` and
``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png``.

The class table is the 19 evaluation classes (``trainId`` 0..18) of the official label table
below, ``ignore_index`` 255. The semantic map comes from the full label ids, mapped to trainIds:
``labelIds`` if present, else ``instanceIds`` (which hold the label id of every pixel: ``id`` for
pixels without an instance, ``id * 1000 + k`` for instance ``k``). ``labelTrainIds`` is used only
when neither exists: it is derived from the label ids, and tools disagree on what they write for
ignored pixels (255 officially, 19 in some exporters). When both exist, the label ids win; a
``labelTrainIds`` that disagrees with them on train-class pixels is derived data gone stale, so it
is a warning in the manifest (naming the file and the pixel count), and the image is kept.
``labelIds`` and ``instanceIds`` are the sources of truth: their disagreeing is a problem.

Instances come from ``instanceIds``: ``value >= 1000`` is instance ``value % 1000`` of label
``value // 1000``; a value below 1000 of a class with instances is a group region, kept as a
crowd instance (as cityscapesScripts' panoptic conversion does). Only classes with
``hasInstances`` and a trainId become instances.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segpipe.formats.base import ClassInfo, Record, Source
from segpipe.formats.pngs import LabelPngError, loaded, mask_bbox, read_label_png

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Label:
    """One row of the official Cityscapes label table (cityscapesScripts' ``labels.py``)."""

    name: str
    id: int
    train_id: int
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


LABELS = (
    Label("unlabeled", 0, 255, "void", 0, False, True, (0, 0, 0)),
    Label("ego vehicle", 1, 255, "void", 0, False, True, (0, 0, 0)),
    Label("rectification border", 2, 255, "void", 0, False, True, (0, 0, 0)),
    Label("out of roi", 3, 255, "void", 0, False, True, (0, 0, 0)),
    Label("static", 4, 255, "void", 0, False, True, (0, 0, 0)),
    Label("dynamic", 5, 255, "void", 0, False, True, (111, 74, 0)),
    Label("ground", 6, 255, "void", 0, False, True, (81, 0, 81)),
    Label("road", 7, 0, "flat", 1, False, False, (128, 64, 128)),
    Label("sidewalk", 8, 1, "flat", 1, False, False, (244, 35, 232)),
    Label("parking", 9, 255, "flat", 1, False, True, (250, 170, 160)),
    Label("rail track", 10, 255, "flat", 1, False, True, (230, 150, 140)),
    Label("building", 11, 2, "construction", 2, False, False, (70, 70, 70)),
    Label("wall", 12, 3, "construction", 2, False, False, (102, 102, 156)),
    Label("fence", 13, 4, "construction", 2, False, False, (190, 153, 153)),
    Label("guard rail", 14, 255, "construction", 2, False, True, (180, 165, 180)),
    Label("bridge", 15, 255, "construction", 2, False, True, (150, 100, 100)),
    Label("tunnel", 16, 255, "construction", 2, False, True, (150, 120, 90)),
    Label("pole", 17, 5, "object", 3, False, False, (153, 153, 153)),
    Label("polegroup", 18, 255, "object", 3, False, True, (153, 153, 153)),
    Label("traffic light", 19, 6, "object", 3, False, False, (250, 170, 30)),
    Label("traffic sign", 20, 7, "object", 3, False, False, (220, 220, 0)),
    Label("vegetation", 21, 8, "nature", 4, False, False, (107, 142, 35)),
    Label("terrain", 22, 9, "nature", 4, False, False, (152, 251, 152)),
    Label("sky", 23, 10, "sky", 5, False, False, (70, 130, 180)),
    Label("person", 24, 11, "human", 6, True, False, (220, 20, 60)),
    Label("rider", 25, 12, "human", 6, True, False, (255, 0, 0)),
    Label("car", 26, 13, "vehicle", 7, True, False, (0, 0, 142)),
    Label("truck", 27, 14, "vehicle", 7, True, False, (0, 0, 70)),
    Label("bus", 28, 15, "vehicle", 7, True, False, (0, 60, 100)),
    Label("caravan", 29, 255, "vehicle", 7, True, True, (0, 0, 90)),
    Label("trailer", 30, 255, "vehicle", 7, True, True, (0, 0, 110)),
    Label("train", 31, 16, "vehicle", 7, True, False, (0, 80, 100)),
    Label("motorcycle", 32, 17, "vehicle", 7, True, False, (0, 0, 230)),
    Label("bicycle", 33, 18, "vehicle", 7, True, False, (119, 11, 32)),
    Label("license plate", -1, -1, "vehicle", 7, False, True, (0, 0, 142)),
)
CLASSES = [
    ClassInfo(id=lab.train_id, name=lab.name, isthing=lab.has_instances, color=lab.color)
    for lab in sorted((lab for lab in LABELS if 0 <= lab.train_id < 255), key=lambda lab: lab.train_id)
]
# label id -> trainId for every id a uint8/uint16 PNG can hold; -1 marks ids not in the table.
_TRAIN_ID = np.full(65536, -1, dtype=np.int32)
for _lab in LABELS:
    if _lab.id >= 0:
        _TRAIN_ID[_lab.id] = _lab.train_id if 0 <= _lab.train_id < 255 else IGNORE_INDEX
_BY_ID = {lab.id: lab for lab in LABELS}

KINDS = ("labelIds", "instanceIds", "labelTrainIds")
_GT = re.compile(r"^(?P<stem>.+)_gtFine_(?P<kind>labelIds|instanceIds|labelTrainIds)\.png$")
_IMAGE = re.compile(r"^(?P<stem>.+)_leftImg8bit\.png$")


def train_ids(label_ids: np.ndarray, where: Path) -> np.ndarray:
    """Label ids (H x W) -> trainIds (H x W uint8, 255 = ignore); an id not in the table raises."""
    mapped = _TRAIN_ID[label_ids.astype(np.int64).clip(0, 65535)]
    bad = np.unique(label_ids[mapped < 0])
    if bad.size:
        raise LabelPngError(f"{where}: label id(s) {bad[:10].tolist()} are not in the Cityscapes label table")
    return mapped.astype(np.uint8)


def decode_instances(instance_ids: np.ndarray, where: Path) -> list[dict]:
    """Instances of an ``instanceIds`` map (see the module docstring for the encoding)."""
    instances = []
    for value in np.unique(instance_ids).tolist():
        label = _BY_ID.get(value // 1000 if value >= 1000 else value)
        if label is None or not label.has_instances or not 0 <= label.train_id < 255:
            continue
        mask = instance_ids == value
        instances.append({"id": int(value), "category_id": label.train_id, "iscrowd": int(value < 1000),
                          "mask": mask, "bbox": mask_bbox(mask)})
    return instances


def _record(image_id: str, split: str, image: Path, gt: dict[str, Path], problems: list[str]) -> Record:
    problems = list(problems)
    if not image.is_file():
        problems.append(f"{image}: image file not found")
    record = Record(image_id=image_id, source=" + ".join(str(p) for p in gt.values()) or str(image),
                    image_path=image if image.is_file() else None, split=split, problems=problems)
    if not gt:
        problems.append(f"{image}: no gtFine *_labelIds, *_instanceIds or *_labelTrainIds PNG for this image")
        return record
    try:
        maps = {kind: read_label_png(path, grey_rgb=True) for kind, path in gt.items()}
        shapes = {kind: m.shape for kind, m in maps.items()}
        if len(set(shapes.values())) > 1:
            raise LabelPngError(f"{image_id}: gtFine PNGs differ in size: {shapes}")
        if "instanceIds" in maps:
            inst = maps["instanceIds"].astype(np.int64)
            label_of_inst = np.where(inst >= 1000, inst // 1000, inst)
        if "labelIds" in maps:
            semantic = train_ids(maps["labelIds"], gt["labelIds"])
            if "instanceIds" in maps and not np.array_equal(maps["labelIds"], label_of_inst):
                raise LabelPngError(f"{gt['instanceIds']}: label ids disagree with {gt['labelIds']}")
        elif "instanceIds" in maps:
            semantic = train_ids(label_of_inst, gt["instanceIds"])
        else:
            semantic = maps["labelTrainIds"].astype(np.uint8)
            bad = np.unique(semantic[(semantic >= len(CLASSES)) & (semantic != IGNORE_INDEX)])
            if bad.size:
                raise LabelPngError(f"{gt['labelTrainIds']}: value(s) {bad.tolist()} are not Cityscapes trainIds (0..18, 255)")
        if "labelTrainIds" in maps and len(maps) > 1:
            given = maps["labelTrainIds"]
            trained = semantic != IGNORE_INDEX
            if not np.array_equal(given[trained], semantic[trained]):
                n = int((given[trained] != semantic[trained]).sum())
                source = gt["labelIds"] if "labelIds" in gt else gt["instanceIds"]
                record.warnings.append(f"{gt['labelTrainIds']}: {n} pixel(s) disagree with the trainIds derived from "
                                       f"{source.name}; the train ids were derived from {source.name}")
    except LabelPngError as exc:
        problems.append(str(exc))
        return record
    record.semantic = loaded(semantic)
    if "instanceIds" in maps:
        record.instances = decode_instances(maps["instanceIds"], gt["instanceIds"])
    return record


def read(input_dir: Path) -> Source:
    """Parse a Cityscapes dataset rooted at ``input_dir`` (holding ``gtFine/`` and ``leftImg8bit/``)."""
    root = Path(input_dir)
    problems: list[str] = []
    gts: dict[tuple[str, str], dict[str, Path]] = {}
    images: dict[tuple[str, str], Path] = {}
    for path in sorted((root / "gtFine").glob("*/*/*.png")):
        m = _GT.match(path.name)
        if m:
            gts.setdefault((path.parts[-3], f"{path.parts[-2]}/{m['stem']}"), {})[m["kind"]] = path
    for path in sorted((root / "leftImg8bit").glob("*/*/*.png")):
        m = _IMAGE.match(path.name)
        if m:
            images[(path.parts[-3], f"{path.parts[-2]}/{m['stem']}")] = path
    keys = sorted({*gts, *images})
    if not keys:
        problems.append(f"{root}: no gtFine/<split>/<city>/*_gtFine_*.png and no leftImg8bit/<split>/<city>/*.png")

    def records() -> Iterator[Record]:
        seen: dict[str, str] = {}
        for split, key in keys:
            city, stem = key.split("/", 1)
            gt = {kind: gts[(split, key)][kind] for kind in KINDS if kind in gts.get((split, key), {})}
            image = images.get((split, key), root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            duplicate = [f"{image}: image id {stem!r} is also in split {seen[stem]!r}"] if stem in seen else []
            seen.setdefault(stem, split)
            yield _record(stem, split, image, gt, duplicate)

    files = sorted([*images.values(), *(p for g in gts.values() for p in g.values())])
    return Source(name="cityscapes", classes=list(CLASSES), ignore_index=IGNORE_INDEX, records=records,
                  files=files, problems=problems, count=len(keys))
