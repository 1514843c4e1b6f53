"""A folder of images and label PNGs matched by name: ``images/<path>.<ext>`` with
``masks/<path>.png`` (or ``labels/``, or ``annotations/`` as in ADE20K's scene-parsing release
ADEChallengeData2016). The mask value is the class id (255 = ignore); palette PNGs are read as
indices, not colours.

Class table: ``classes.json`` (``[{"id", "name", "isthing", "color"}]``, as ``segpipe synth``
writes it) if present, else ``labels.txt`` (one name per line, id = line number from 0), else the
values found in the masks, named ``class_<id>``. RGB masks are mapped through ``classes.json``'s
colours (or read as grey values when R == G == B). A first folder named ``train``, ``val`` or
``test`` (also ``training``, ``validation``) under ``images/`` gives the split.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from segpipe.formats.base import ClassInfo, Record, Source
from segpipe.formats.coco_files import parse_categories
from segpipe.formats.pngs import LabelPngError, class_colour, loaded, read_label_png

IGNORE_INDEX = 255
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SPLITS = {"train": "train", "val": "val", "test": "test", "training": "train", "validation": "val"}
LABEL_FOLDERS = ("masks", "labels", "annotations")  # the first one present holds the label PNGs


def parse_classes_json(path: Path) -> tuple[list[ClassInfo], list[str]]:
    """``classes.json`` rows (COCO category rows, ids 0..254), sorted by id; a malformed row or a
    duplicate id is a problem naming the file and row."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise TypeError(f"top level is {type(rows).__name__}, expected a list")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        return [], [f"{path}: cannot read class table ({type(exc).__name__}: {exc})"]
    classes, problems = parse_categories(rows, path, default_isthing=False, max_id=IGNORE_INDEX - 1, key=None)
    return sorted(classes, key=lambda c: c.id), problems


def parse_labels_txt(path: Path) -> tuple[list[ClassInfo], list[str]]:
    """``labels.txt``: one class name per line, id = line number from 0."""
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        return [], [f"{path}: cannot read ({type(exc).__name__}: {exc})"]
    while names and not names[-1]:
        names.pop()
    problems = [f"{path}:{i + 1}: empty class name" for i, n in enumerate(names) if not n]
    if len(names) > IGNORE_INDEX:
        problems.append(f"{path}: {len(names)} classes, at most {IGNORE_INDEX} fit beside ignore index {IGNORE_INDEX}")
    return [ClassInfo(id=i, name=n, isthing=False, color=class_colour(i)) for i, n in enumerate(names) if n], problems


def read_mask(path: Path, colours: dict[tuple[int, int, int], int] | None) -> np.ndarray:
    """A mask as class ids: palette indices / grey values as stored; RGB through ``colours`` (white
    is the ignore index), or grey RGB as its grey value when there are no colours."""
    if colours is not None:
        arr = read_label_png(path, {**colours, (255, 255, 255): IGNORE_INDEX})
    else:
        arr = read_label_png(path, grey_rgb=True)
    if arr.dtype != np.uint8 and arr.size and int(arr.max()) > IGNORE_INDEX:
        raise LabelPngError(f"{path}: value {int(arr.max())} exceeds the largest class id {IGNORE_INDEX - 1}")
    return arr.astype(np.uint8)


def _record(key: str, image: Path | None, mask: Path | None, colours, known: set[int]) -> Record:
    split = SPLITS.get(key.split("/", 1)[0]) if "/" in key else None
    record = Record(image_id=key, source=str(mask or image), image_path=image, split=split,
                    semantic_source=str(mask) if mask else None)
    if image is None:
        record.problems.append(f"{mask}: no image named {key}.* under images/")
    if mask is None:
        record.problems.append(f"{image}: no mask named {key}.png under {'/, '.join(LABEL_FOLDERS)}/")
        return record
    try:
        semantic = read_mask(mask, colours)
    except LabelPngError as exc:
        record.problems.append(str(exc))
        return record
    values = set(np.unique(semantic).tolist()) - {IGNORE_INDEX}
    if unknown := sorted(values - known):
        record.problems.append(f"{mask}: value(s) {unknown[:10]} are not in the class table")
        return record
    record.semantic = loaded(semantic)
    return record


def _files(folder: Path, suffixes: set[str]) -> tuple[dict[str, Path], list[str]]:
    found, problems = {}, []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in suffixes:
            key = p.relative_to(folder).with_suffix("").as_posix()
            if key in found:
                problems.append(f"{p}: same name as {found[key]}")
                continue
            found[key] = p
    return found, problems


def read(input_dir: Path) -> Source:
    """Parse a mask folder rooted at ``input_dir`` (holding ``images/`` and ``masks/``, ``labels/`` or
    ``annotations/``)."""
    root = Path(input_dir)
    problems: list[str] = []
    mask_root = next((root / n for n in LABEL_FOLDERS if (root / n).is_dir()), None)
    if not (root / "images").is_dir() or mask_root is None:
        problems.append(f"{root}: expected images/ and a label folder ({'/, '.join(LABEL_FOLDERS)}/)")
    images, image_problems = _files(root / "images", IMAGE_SUFFIXES) if (root / "images").is_dir() else ({}, [])
    masks, mask_problems = _files(mask_root, {".png"}) if mask_root else ({}, [])
    problems += image_problems + mask_problems
    keys = sorted({*images, *masks})

    colours = None
    table_files = []
    if (root / "classes.json").is_file():
        classes, table_problems = parse_classes_json(root / "classes.json")
        colours = {c.color: c.id for c in classes}
        table_files.append(root / "classes.json")
    elif (root / "labels.txt").is_file():
        classes, table_problems = parse_labels_txt(root / "labels.txt")
        table_files.append(root / "labels.txt")
    else:
        # No class table: the values in the masks are the classes (one pass over all masks).
        table_problems, values = [], set()
        for path in masks.values():
            try:
                values.update(np.unique(read_mask(path, None)).tolist())
            except LabelPngError:
                pass  # reported again, against its record, when the records are read
        classes = [ClassInfo(id=v, name=f"class_{v}", isthing=False, color=class_colour(v))
                   for v in sorted(values - {IGNORE_INDEX})]
    problems += table_problems
    known = {c.id for c in classes}

    def records() -> Iterator[Record]:
        for key in keys:
            yield _record(key, images.get(key), masks.get(key), colours, known)

    return Source(name="mask-dir", classes=classes, ignore_index=IGNORE_INDEX, records=records,
                  files=sorted([*table_files, *images.values(), *masks.values()]), problems=problems,
                  count=len(keys))
