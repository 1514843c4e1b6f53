"""COCO instances JSON (+ optional semantic label PNGs) -> ``Source``.

Reads one or more ``instances_*.json`` files: polygons, compressed-string and uncompressed-list
RLE, ``iscrowd``. The split comes from the file name (``instances_train.json`` -> train,
``instances_val2017.json`` -> val); without a split word it is left to the converter's hash.
``segpipe synth`` output is this format: its ``classes.json`` beside ``annotations/`` (or
categories carrying ``isthing``) gives the full class table, stuff classes included, and
``--masks`` holds ``<image stem>.png`` label maps. Annotations are only parsed here; every
check happens in ``segpipe.validation`` so all formats get the same ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from segpipe.errors import UserError
from segpipe.files import PathEscapeError, confined, escape_reason
from segpipe.formats.base import ClassInfo, Record, Source
from segpipe.formats.coco_files import merge_classes, parse_categories, split_from_name
from segpipe.formats.pngs import read_label_png


class CocoError(UserError, ValueError):
    """The COCO files cannot be read at all (not JSON, wrong structure, conflicting classes)."""


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CocoError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CocoError(f"{path}: top level must be an object with images, annotations, categories")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoError(f"{path}: key {key!r} must be a list")
    if not isinstance(data.get("annotations", []), list):
        raise CocoError(f"{path}: key 'annotations' must be a list")
    return data


def _read_classes_json(path: Path) -> list[ClassInfo]:
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CocoError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(rows, list):
        raise CocoError(f"{path}: expected a list of {{id, name, isthing, color}}")
    classes, problems = parse_categories(rows, path, default_isthing=True, key=None)
    if problems:
        raise CocoError(problems[0])
    return classes


def _classes_from_categories(files: list[Path], datas: list[dict[str, Any]]) -> list[ClassInfo]:
    tables = []
    for path, data in zip(files, datas):
        table, problems = parse_categories(data["categories"], path, default_isthing=True)
        if problems:
            raise CocoError(problems[0])
        tables.append((path, table))
    classes, problems = merge_classes(tables)
    if problems:
        raise CocoError(problems[0])
    return classes


def read(annotations: list[Path], images: Path, masks: Path | None = None) -> Source:
    """COCO instances files + image folder (+ label-map folder) -> Source."""
    files = [Path(a) for a in annotations]
    if not files:
        raise CocoError("no annotation file given (--annotations FILE)")
    images = Path(images)
    if not images.is_dir():
        raise CocoError(f"{images}: image folder not found")
    if masks is not None and not Path(masks).is_dir():
        raise CocoError(f"{masks}: mask folder not found")
    datas = [_load_json(f) for f in files]

    categories = _classes_from_categories(files, datas)
    classes_json = files[0].resolve().parent.parent / "classes.json"
    if classes_json.is_file():
        classes = _read_classes_json(classes_json)
        known = {c.id for c in classes}
        missing = [c.id for c in categories if c.id not in known]
        if missing:
            raise CocoError(f"{classes_json}: category id(s) {missing} of the annotations are not in the class table")
    else:
        classes = categories
    ignore_index = 255 if all(c.id < 255 for c in classes) else 65535
    if any(c.id == ignore_index for c in classes):
        raise CocoError(f"class id {ignore_index} collides with the ignore index")

    source_files = list(files) + ([classes_json] if classes_json.is_file() else [])
    problems: list[str] = []
    # Pass 1 (cheap, metadata only): which images exist, annotations grouped per image.
    entries: list[tuple[Path, dict[str, Any], str | None]] = []
    by_image: dict[tuple[int, Any], list[dict[str, Any]]] = {}
    dup_ann: dict[tuple[int, Any], list[tuple[Any, str]]] = {}
    for fi, (path, data) in enumerate(zip(files, datas)):
        split, _ = split_from_name(path)
        ids = set()
        # Annotation ids are unique per file (train and val files may both start at 1).
        ann_seen: dict[Any, Any] = {}
        for img in data["images"]:
            entries.append((path, img, split))
            if isinstance(img, dict):
                ids.add(_key(img.get("id")))
        for k, ann in enumerate(data.get("annotations", [])):
            if not isinstance(ann, dict):
                problems.append(f"{path}: annotations[{k}] is not an object")
                continue
            img_key = _key(ann.get("image_id"))
            if img_key not in ids:
                problems.append(f"{path}: annotation {ann.get('id')!r} refers to image {ann.get('image_id')!r}, "
                                "which this file does not declare")
                continue
            aid = ann.get("id")
            if aid in ann_seen:
                dup_ann.setdefault((fi, img_key), []).append(
                    (aid, f"duplicate annotation id {aid!r} (already used by image {ann_seen[aid]!r})"))
                continue
            ann_seen[aid] = ann.get("image_id")
            by_image.setdefault((fi, img_key), []).append(ann)

    def records() -> Iterator[Record]:
        for path, img, split in entries:
            fi = files.index(path)
            yield _record(path, fi, img, split, images, masks, by_image, dup_ann)

    for path, img, _ in entries:
        if isinstance(img, dict) and isinstance(img.get("file_name"), str):
            try:
                cands = _candidates(images, path, img["file_name"])
                mp = _mask_path(Path(masks), path, img["file_name"]) if masks is not None else None
            except PathEscapeError:
                continue  # quarantined by its record; never hashed, never read
            for p in cands:
                if p.is_file():
                    source_files.append(p)
                    break
            if mp is not None and mp.is_file():
                source_files.append(mp)
    return Source(name="coco", classes=classes, ignore_index=ignore_index, records=records,
                  files=source_files, problems=problems, count=len(entries))


def _key(v: Any) -> Any:
    return str(v) if v is not None else None


def _candidates(images: Path, ann_file: Path, file_name: str) -> list[Path]:
    """Where the image may lie; PathEscapeError when ``file_name`` leaves the image folder."""
    out = [confined(images, file_name)]
    _, folder = split_from_name(ann_file)
    if folder and escape_reason(folder) is None:
        out.append(images / folder / file_name)
    return out


def _mask_path(masks: Path, ann_file: Path, file_name: str) -> Path:
    stem = confined(masks, file_name).relative_to(masks).with_suffix(".png")
    direct = masks / stem
    _, folder = split_from_name(ann_file)
    if not direct.is_file() and folder and escape_reason(folder) is None and (masks / folder / stem).is_file():
        return masks / folder / stem
    return direct


def _record(path: Path, fi: int, img: Any, split: str | None, images: Path, masks: Path | None,
            by_image: dict, dup_ann: dict) -> Record:
    if not isinstance(img, dict) or img.get("id") is None:
        return Record(image_id=f"{path.name}:{img!r:.40}", source=str(path),
                      problems=[f"image entry {img!r:.80} has no 'id'"])
    image_id = str(img["id"])
    dropped = list(dup_ann.get((fi, image_id), []))
    file_name = img.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        return Record(image_id=image_id, source=str(path), split=split,
                      problems=[f"image {image_id} has no file_name"])
    try:
        cands = _candidates(images, path, file_name)
    except PathEscapeError as e:
        return Record(image_id=image_id, source=str(path), split=split,
                      problems=[f"image {image_id}: file_name {e}; the image was not read"])
    image_path = next((p for p in cands if p.is_file()), cands[0])
    h, w = img.get("height"), img.get("width")
    semantic = semantic_source = None
    if masks is not None:
        mp = _mask_path(Path(masks), path, file_name)
        semantic, semantic_source = partial(read_label_png, mp), str(mp)
    instances = []
    for ann in by_image.get((fi, image_id), []):
        inst = {"id": ann.get("id"), "category_id": ann.get("category_id"), "iscrowd": ann.get("iscrowd", 0),
                "segmentation": ann.get("segmentation")}
        if "bbox" in ann:
            inst["bbox"] = ann["bbox"]
        instances.append(inst)
    return Record(
        image_id=image_id, source=str(path), image_path=image_path, split=split,
        height=h if isinstance(h, int) else None, width=w if isinstance(w, int) else None,
        semantic=semantic, semantic_source=semantic_source, instances=instances, annotation_problems=dropped,
    )


def collection_dirs(root: Path) -> list[Path]:
    """The COCO collections under ``root``: ``root`` itself when it holds ``annotations/``, else
    every sub-folder that does (``data/raw/synth``, ``data/raw/<ingested drop>``, ...)."""
    root = Path(root)
    if not root.is_dir():
        raise CocoError(f"{root}: input folder not found")
    if (root / "annotations").is_dir():
        return [root]
    found = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / "annotations").is_dir())
    if not found:
        raise CocoError(f"{root}: no COCO collection (a folder with annotations/ and images/) found")
    return found


def read_collection(root: Path) -> Source:
    """One collection folder: ``annotations/*.json``, ``images/``, optional ``masks/``."""
    files = sorted((root / "annotations").glob("*.json"))
    if not files:
        raise CocoError(f"{root / 'annotations'}: no annotation JSON file")
    masks = root / "masks"
    return read(files, root / "images", masks if masks.is_dir() else None)


def read_collections(root: Path) -> Source:
    """Every collection under ``root`` as one Source, each record naming its collection. When
    ``root`` is a folder of collections (``data/raw``), image ids become ``<collection>/<id>``, even
    with one collection: ids stay unique, and adding a collection never changes the ids (nor the
    hash splits) of the images already there. All collections must share one class table."""
    dirs = collection_dirs(root)
    if dirs == [Path(root)]:
        source = read_collection(Path(root))
        source.collection = Path(root).resolve().name
        return source
    sources = [(d.name, read_collection(d)) for d in dirs]
    first_name, first = sources[0]
    table = [(c.id, c.name, c.isthing) for c in first.classes]
    for name, src in sources[1:]:
        other = [(c.id, c.name, c.isthing) for c in src.classes]
        if other != table or src.ignore_index != first.ignore_index:
            diff = sorted(set(other) ^ set(table))[:4]
            raise CocoError(f"{Path(root) / name}: class table differs from collection {first_name!r} "
                            f"(first differences (id, name, isthing): {diff})")

    def records() -> Iterator[Record]:
        for name, src in sources:
            for rec in src.records():
                rec.image_id = f"{name}/{rec.image_id}"
                rec.collection = name
                yield rec

    return Source(
        name="coco", classes=first.classes, ignore_index=first.ignore_index, records=records,
        files=[f for _, s in sources for f in s.files],
        problems=[f"{name}: {p}" for name, s in sources for p in s.problems],
        count=sum(s.count or 0 for _, s in sources),
    )
