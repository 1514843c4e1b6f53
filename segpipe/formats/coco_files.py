"""The parts that COCO-family JSON files (panoptic, stuff) share: finding and loading the JSON
files without crashing on a bad one, their splits from the file names, their category and image
tables, where their images lie, and the image half of every record. Every problem is returned as
a message naming the file and the id at fault."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.files import confined, escape_reason
from segpipe.formats.base import ClassInfo, Record, Source
from segpipe.formats.pngs import label_colormap, loaded

_YEAR = re.compile(r"(19|20)\d\d$")


def split_from_name(stem: str, prefix: str) -> tuple[str, str]:
    """``("panoptic_train2017", "panoptic_")`` -> ``("train", "train2017")``: the split, and the
    folder name the dataset uses for it (images and PNG folders are named after the latter)."""
    folder = stem[len(prefix):] if stem.startswith(prefix) else stem
    split = _YEAR.sub("", folder).rstrip("_-") or folder
    return split, folder


def load_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(document, None)`` or ``(None, problem)`` for an unreadable or non-object JSON file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path}: cannot read JSON ({type(exc).__name__}: {exc})"
    if not isinstance(doc, dict):
        return None, f"{path}: top level is {type(doc).__name__}, expected an object"
    return doc, None


@dataclass
class JsonFile:
    """One readable ``<prefix><split>.json``: its split, the folder name its images use, its image
    table and its ``annotations`` (empty, with a problem recorded, when missing or not a list)."""

    path: Path
    split: str
    folder: str
    images: ImageTable
    annotations: list[Any]


@dataclass
class JsonFiles:
    """The ``annotations/<prefix>*.json`` files of a dataset: every path found, the readable ones,
    their class tables merged into one, and every problem of the files and tables."""

    paths: list[Path]
    files: list[JsonFile]
    classes: list[ClassInfo]
    problems: list[str]

    @property
    def by_id(self) -> dict[int, ClassInfo]:
        return {c.id: c for c in self.classes}


def read_json_files(input_dir: Path, prefix: str, ignore_index: int) -> JsonFiles:
    """Load every ``annotations/<prefix>*.json`` of ``input_dir``, index its images and merge the
    category tables (stuff unless a category says ``isthing``); no file at all is a problem
    naming the folder."""
    paths = sorted((input_dir / "annotations").glob(f"{prefix}*.json"))
    problems = [] if paths else [f"{input_dir / 'annotations'}: no {prefix}*.json file"]
    files, tables = [], []
    for path in paths:
        doc, problem = load_json(path)
        if doc is None:
            problems.append(problem)
            continue
        table, cat_problems = parse_categories(doc, path, default_isthing=False)
        problems.extend(cat_problems)
        tables.append((path, table))
        split, folder = split_from_name(path.stem, prefix)
        images = parse_images(doc, path)
        problems.extend(images.file_problems)
        annotations = doc.get("annotations")
        if not isinstance(annotations, list):
            problems.append(f"{path}: 'annotations' missing or not a list")
            annotations = []
        files.append(JsonFile(path, split, folder, images, annotations))
    classes, merge_problems = merge_classes(tables, ignore_index)
    return JsonFiles(paths, files, classes, problems + merge_problems)


@dataclass
class Job:
    """One image id of a JSON file, indexed, to become a record: its ``images`` entry (None when
    only annotations name it), what the reader gathered for it, and the problems found so far."""

    file: JsonFile
    iid: Any
    img: dict[str, Any] | None
    annotations: Any
    problems: list[str]


def image_record(input_dir: Path, job: Job) -> tuple[Record, bool]:
    """The record of ``job``'s image with its image file found, and whether to go on reading its
    annotations: False when its ``file_name`` leaves the dataset (quarantined, never read)."""
    json_path, split, folder, iid, file_name = job.file.path, job.file.split, job.file.folder, job.iid, job.img["file_name"]
    key = image_key(file_name)
    if escaped := image_path_problem(json_path, iid, file_name):
        return Record(image_id=key, source=str(json_path), split=split, problems=[*job.problems, escaped]), False
    problems = list(job.problems)
    image_path = find_image(input_dir, folder, split, file_name)
    if image_path is None:
        problems.append(
            f"{json_path}: image id {iid!r}: {file_name} not found in images/{folder}/, images/{split}/, {folder}/ or images/"
        )
    return Record(image_id=key, source=str(json_path), image_path=image_path, split=split,
                  height=job.img.get("height"), width=job.img.get("width"), problems=problems), True


def records(jobs: list[Job], make: Callable[[Job], Record]) -> Iterator[Record]:
    """``make(job)`` of every job, an image id seen before getting a problem naming the file it was
    first seen in (image ids must be unique across all files)."""
    seen: dict[str, Path] = {}
    for job in jobs:
        record = make(job)
        if record.image_id in seen:
            record.problems.append(f"{job.file.path}: image id {record.image_id!r} also in {seen[record.image_id]}")
        seen.setdefault(record.image_id, job.file.path)
        yield record


def source_files(input_dir: Path, found: JsonFiles, jobs: list[Job]) -> set[Path]:
    """The JSON files and every image file a record reads, for the source hash. An image whose
    ``file_name`` leaves the dataset is quarantined by its record and never hashed or read."""
    files = set(found.paths)
    for job in jobs:
        if job.img is not None and escape_reason(job.img["file_name"]) is None and (
                image := find_image(input_dir, job.file.folder, job.file.split, job.img["file_name"])):
            files.add(image)
    return files


def read_source(name: str, input_dir: Path, prefix: str, ignore_index: int,
                jobs_of: Callable[[JsonFile, list[str]], list[Job]],
                make: Callable[[Path, Job, dict[int, ClassInfo]], Record],
                own_file: Callable[[Job], Path | None] = lambda job: None) -> Source:
    """A reader's Source: its JSON files indexed up front (cheap: JSON and stat only, so file-level
    problems are known before the first record and the source hash covers exactly the files the
    records use), ``jobs_of`` (the reader's grouping of a file's annotations per image, adding
    file-level problems), and ``make`` building each record lazily; ``own_file`` names a file of
    the reader's own a job's record reads (hashed too)."""
    found = read_json_files(input_dir, prefix, ignore_index)
    jobs = [job for f in found.files for job in jobs_of(f, found.problems)]
    by_id = found.by_id
    files = source_files(input_dir, found, jobs) | {p for job in jobs if (p := own_file(job)) is not None}
    return Source(name=name, classes=found.classes, ignore_index=ignore_index,
                  records=lambda: records(jobs, lambda job: make(input_dir, job, by_id)),
                  files=sorted(files), problems=found.problems, count=len(jobs))


def labelled(record: Record, semantic: np.ndarray, instances: list[dict[str, Any]], problems: list[str]) -> Record:
    """``record`` with its decoded label map, thing instances and the problems found decoding them."""
    record.problems.extend(problems)
    record.semantic = loaded(semantic)
    record.instances = instances
    return record


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_categories(doc: dict[str, Any], path: Path, *, default_isthing: bool) -> tuple[list[ClassInfo], list[str]]:
    """The file's ``categories`` as class-table rows; ``isthing`` from the category when present.
    A category without a colour gets the VOC colour map's colour of its id."""
    classes: list[ClassInfo] = []
    problems: list[str] = []
    cats = doc.get("categories")
    if not isinstance(cats, list):
        return [], [f"{path}: 'categories' missing or not a list"]
    for i, cat in enumerate(cats):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            problems.append(f"{path}: categories[{i}] needs an integer 'id' and a string 'name', got {cat!r:.200}")
            continue
        cid = cat["id"]
        if not 0 <= cid < 65535:
            problems.append(f"{path}: category id {cid} outside 0..65534")
            continue
        color = cat.get("color")
        if not (isinstance(color, list | tuple) and len(color) == 3 and all(_is_int(c) and 0 <= c < 256 for c in color)):
            color = label_colormap(256)[cid % 256]
        isthing = cat.get("isthing", default_isthing)
        classes.append(ClassInfo(id=cid, name=cat["name"], isthing=bool(isthing), color=tuple(color)))
    return classes, problems


def merge_classes(tables: list[tuple[Path, list[ClassInfo]]], ignore_index: int) -> tuple[list[ClassInfo], list[str]]:
    """One class table from several files; the same id defined differently, or an id equal to
    ``ignore_index``, is a problem (the first definition is kept)."""
    merged: dict[int, tuple[Path, ClassInfo]] = {}
    problems = []
    for path, table in tables:
        for c in table:
            if c.id == ignore_index:
                problems.append(f"{path}: category id {c.id} ({c.name!r}) equals the ignore index {ignore_index}")
                continue
            if c.id in merged and merged[c.id][1] != c:
                first_path, first = merged[c.id]
                problems.append(
                    f"{path}: category id {c.id} is {c.name!r} (isthing={c.isthing}) but {first_path} "
                    f"defines it as {first.name!r} (isthing={first.isthing})"
                )
                continue
            merged.setdefault(c.id, (path, c))
    return [c for _, (_, c) in sorted(merged.items())], problems


@dataclass
class ImageTable:
    """A file's ``images``: entries by COCO image id, and problems with ids it could not index."""

    by_id: dict[Any, dict[str, Any]] = field(default_factory=dict)
    problems: dict[Any, list[str]] = field(default_factory=dict)  # per image id
    file_problems: list[str] = field(default_factory=list)


def parse_images(doc: dict[str, Any], path: Path) -> ImageTable:
    """Index ``images`` by id. A duplicate id, or an entry without ``file_name``/size, is recorded
    against that image id (or against the file when it has no usable id)."""
    table = ImageTable()
    images = doc.get("images")
    if not isinstance(images, list):
        table.file_problems.append(f"{path}: 'images' missing or not a list")
        return table
    for i, img in enumerate(images):
        if not isinstance(img, dict) or not (_is_int(img.get("id")) or isinstance(img.get("id"), str)):
            table.file_problems.append(f"{path}: images[{i}] has no integer or string 'id'")
            continue
        iid = img["id"]
        if iid in table.by_id:
            table.problems.setdefault(iid, []).append(f"{path}: duplicate image id {iid!r}")
            continue
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            table.file_problems.append(f"{path}: image id {iid!r} has no 'file_name'")
            continue
        for key in ("height", "width"):
            if not (_is_int(img.get(key)) and img[key] > 0):
                table.problems.setdefault(iid, []).append(
                    f"{path}: image id {iid!r} has {key}={img.get(key)!r}, expected a positive integer"
                )
        table.by_id[iid] = img
    return table


def find_image(input_dir: Path, folder: str, split: str, file_name: str) -> Path | None:
    """Where an image of a COCO JSON lies: ``images/<folder>/``, ``images/<split>/``, ``<folder>/``
    (COCO's own ``train2017/``) or ``images/``; None when in none of them.

    ``file_name`` comes from the JSON: PathEscapeError (naming it) when it is absolute or climbs
    out of the folder it is looked up in, so no file outside the dataset is ever read.
    """
    bases = [input_dir / "images" / folder, input_dir / "images" / split, input_dir / folder, input_dir / "images"]
    for base in bases:
        if escape_reason(base.relative_to(input_dir).as_posix()) is not None:
            continue  # a JSON named e.g. panoptic_...json: no folder of its name outside the dataset
        candidate = confined(base, file_name)
        if candidate.is_file():
            return candidate
    return None


def image_path_problem(json_path: Path, iid: Any, file_name: str) -> str | None:
    """The problem of an image whose ``file_name`` leaves the dataset, naming the image id; or None."""
    if (reason := escape_reason(file_name)) is not None:
        return (f"{json_path}: image id {iid!r}: file_name {file_name!r} {reason}; a path inside the "
                "dataset's image folder is expected (the image was not read)")
    return None


def image_key(file_name: str) -> str:
    """The record's image id: the image's file name without extension (unique across COCO splits)."""
    return str(Path(file_name).with_suffix("").as_posix())


def rle_counts(segmentation: Any, height: int, width: int, where: str) -> list[int]:
    """Validated run lengths of a COCO RLE dict (list counts or COCO's compressed string).

    Raises ValueError naming ``where`` unless ``size`` is ``[height, width]``, every run is a
    non-negative integer and the runs sum to ``height * width``: only then is it safe to decode
    (pycocotools' C decoder reads out of bounds on such input).
    """
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ValueError(f"{where}: segmentation is not an RLE dict with 'counts' and 'size'")
    size = segmentation["size"]
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(_is_int(v) for v in size)):
        raise ValueError(f"{where}: RLE size {size!r:.100} is not [height, width]")
    if list(size) != [height, width]:
        raise ValueError(f"{where}: RLE size {list(size)} differs from the image's [{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        counts = _counts_from_string(counts, where)
    elif not (isinstance(counts, list) and all(_is_int(c) and c >= 0 for c in counts)):
        raise ValueError(f"{where}: RLE counts must be non-negative integers or a compressed string")
    total = sum(counts)
    if total != height * width:
        raise ValueError(f"{where}: RLE counts sum to {total}, expected height x width = {height * width}")
    return counts


def _counts_from_string(s: str, where: str) -> list[int]:
    # COCO's compressed counts: 5 bits per character (offset 48), 0x20 = more characters follow,
    # 0x10 in the last character = negative; runs after the second are deltas to the run two back.
    counts: list[int] = []
    p = 0
    while p < len(s):
        x = k = 0
        while True:
            if p >= len(s):
                raise ValueError(f"{where}: compressed RLE counts end in the middle of a number")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"{where}: compressed RLE counts hold invalid character {s[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            p += 1
            k += 1
            if not c & 0x20:
                if c & 0x10:
                    x |= -1 << (5 * k)
                break
            if k > 13:
                raise ValueError(f"{where}: compressed RLE counts hold a number too large to be a run")
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            raise ValueError(f"{where}: compressed RLE counts decode to a negative run {x}")
        counts.append(x)
    return counts


def rle_to_mask(counts: list[int], height: int, width: int) -> np.ndarray:
    """H x W bool mask from run lengths already checked by ``rle_counts`` (runs alternate 0, 1,
    starting with 0, in column-major order)."""
    values = np.arange(len(counts), dtype=np.int64) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape(width, height).T
