"""Pascal VOC segmentation: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (class
index, 255 = void), ``SegmentationObject/<id>.png`` (instance index, 0 = background, 255 =
void), ``ImageSets/Segmentation/<split>.txt``.

VOC's PNGs are palette PNGs, read as indices. Some tools save them as RGB in VOC's colours;
those are mapped back through the VOC colour map (an unknown colour is a problem). The class
of an instance is the ``SegmentationClass`` value under its pixels, which must be one class.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from segpipe.files import escape_reason
from segpipe.formats.base import ClassInfo, Record, Source
from segpipe.formats.pngs import LabelPngError, label_colormap, loaded, mask_bbox, read_label_png

IGNORE_INDEX = 255
NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
CLASSES = [
    ClassInfo(id=i, name=name, isthing=i != 0, color=label_colormap(256)[i]) for i, name in enumerate(NAMES)
]
VOC_COLOURS = {c: i for i, c in enumerate(label_colormap(256))}
# "trainval" is the union of train and val: listing it as a split would put images in two.
UNION_SPLITS = {"trainval"}


def read_index_map(path: Path) -> np.ndarray:
    """A VOC label PNG as indices: palette values as stored, RGB through the VOC colour map."""
    return read_label_png(path, VOC_COLOURS)


def decode_objects(
    classes: np.ndarray, objects: np.ndarray, where: str
) -> tuple[list[dict], list[str]]:
    """Instances from ``SegmentationObject`` indices, each with the one class under its pixels."""
    instances, problems = [], []
    for k in np.unique(objects).tolist():
        if k in (0, IGNORE_INDEX):
            continue
        mask = objects == k
        under = np.unique(classes[mask])
        under = under[under != IGNORE_INDEX]
        if len(under) != 1 or under[0] == 0 or under[0] >= len(NAMES):
            problems.append(
                f"{where}: object {k} covers SegmentationClass value(s) {under.tolist()}, expected one of classes 1..20"
            )
            continue
        instances.append({"id": k, "category_id": int(under[0]), "iscrowd": 0, "mask": mask, "bbox": mask_bbox(mask)})
    return instances, problems


def _record(root: Path, stem: str, split: str | None, problems: list[str]) -> Record:
    problems = list(problems)
    if (reason := escape_reason(stem)) is not None:
        listed_in = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        problems.append(f"{listed_in}: image id {stem!r} {reason}; an id names files inside JPEGImages/ and "
                        "SegmentationClass/ (nothing was read)")
        return Record(image_id=stem, source=str(listed_in), split=split, problems=problems)
    image_path = root / "JPEGImages" / f"{stem}.jpg"
    class_png = root / "SegmentationClass" / f"{stem}.png"
    object_png = root / "SegmentationObject" / f"{stem}.png"
    if not image_path.is_file():
        problems.append(f"{image_path}: image file not found")
    record = Record(image_id=stem, source=str(class_png), image_path=image_path if image_path.is_file() else None,
                    split=split, problems=problems, semantic_source=str(class_png))
    try:
        classes = read_index_map(class_png)
    except LabelPngError as exc:
        problems.append(str(exc))
        return record
    record.semantic = loaded(classes)
    if not object_png.is_file():
        return record  # class-only images are valid VOC: semantic without instances
    record.source = f"{class_png} + {object_png}"
    try:
        objects = read_index_map(object_png)
    except LabelPngError as exc:
        problems.append(str(exc))
        return record
    if objects.shape != classes.shape:
        problems.append(f"{object_png}: {objects.shape[1]} x {objects.shape[0]} but {class_png} is "
                        f"{classes.shape[1]} x {classes.shape[0]}")
        return record
    record.instances, object_problems = decode_objects(classes, objects, str(object_png))
    problems.extend(object_problems)
    return record


def read(input_dir: Path) -> Source:
    """Parse a VOC dataset rooted at ``input_dir`` (the folder holding ``JPEGImages/``)."""
    root = Path(input_dir)
    problems: list[str] = []
    split_of: dict[str, str] = {}
    split_problems: dict[str, list[str]] = {}
    listed_files = []
    for txt in sorted((root / "ImageSets" / "Segmentation").glob("*.txt")):
        if txt.stem in UNION_SPLITS:
            continue
        listed_files.append(txt)
        try:
            lines = txt.read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{txt}: cannot read ({type(exc).__name__}: {exc})")
            continue
        for stem in lines:
            if stem in split_of and split_of[stem] != txt.stem:
                split_problems.setdefault(stem, []).append(
                    f"{txt}: image {stem!r} is also listed in {split_of[stem]}.txt"
                )
            split_of.setdefault(stem, txt.stem)
    unlisted = sorted({p.stem for p in (root / "SegmentationClass").glob("*.png")} - set(split_of))
    stems = [*split_of, *unlisted]
    if not stems:
        problems.append(f"{root}: no ImageSets/Segmentation/*.txt and no SegmentationClass/*.png")

    def records() -> Iterator[Record]:
        for stem in stems:
            yield _record(root, stem, split_of.get(stem), split_problems.get(stem, []))

    files = list(listed_files)
    for stem in stems:
        if escape_reason(stem) is not None:
            continue  # quarantined by its record; never hashed or read
        for p in (root / "JPEGImages" / f"{stem}.jpg", root / "SegmentationClass" / f"{stem}.png",
                  root / "SegmentationObject" / f"{stem}.png"):
            if p.is_file():
                files.append(p)
    return Source(name="voc", classes=list(CLASSES), ignore_index=IGNORE_INDEX, records=records,
                  files=sorted(files), problems=problems, count=len(stems))
