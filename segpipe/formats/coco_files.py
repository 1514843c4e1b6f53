"""The parts that COCO-family JSON files (instances, panoptic, stuff) share: their splits from
the file names and their category tables (also read by ``segpipe metrics panoptic``); for
panoptic and stuff also finding and loading the JSON files without crashing on a bad one, their
image tables, where their images lie, and the image half of every record. Every problem is
returned as a message naming the file and the id at fault."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.files import confined, escape_reason
from segpipe.formats.base import ClassInfo, Record, Source
from segpipe.formats.pngs import class_colour, loaded
from segpipe.validation import check_class_names

# The words for a split in file names, as datasets write them, and the split each one means.
SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


def split_from_name(path: Path | str) -> tuple[str | None, str | None]:
    """The split a COCO-family annotation file holds, from its name, and the folder name the
    dataset uses for it: ``instances_val2017.json`` -> ``("val", "val2017")``,
    ``panoptic_train.json`` -> ``("train", "train")``, ``stuff_test-dev2017.json`` ->
    ``("test", "test-dev2017")``.

    The split is the first token of the stem (split at ``_``, ``-``, ``.``) that is a split word
    (``SPLIT_WORDS``), a year or other number after it allowed; None when there is none
    (``instances_trainval.json``, ``panoptic_minival2014.json``), and the converter's hash then
    assigns it. The folder is what follows the first ``_`` (images lie in ``images/<folder>/``
    or COCO's ``<folder>/``, panoptic PNGs in ``panoptic_<folder>/``); None without a ``_``.
    """
    stem = Path(path).stem
    split = None
    for token in re.split(r"[_\-.]", stem.lower()):
        if (word := token.rstrip("0123456789")) in SPLIT_WORDS:
            split = SPLIT_WORDS[word]
            break
    folder = stem.split("_", 1)[1] if "_" in stem else None
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
    split: str | None
    folder: str | None
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
        table, cat_problems = parse_categories(doc.get("categories"), path, default_isthing=False,
                                               max_id=MAX_CLASS_ID)
        problems.extend(cat_problems)
        tables.append((path, table))
        split, folder = split_from_name(path)
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
        *others, last = [f"{base.relative_to(input_dir).as_posix()}/" for base in image_folders(input_dir, folder, split)]
        places = f"{', '.join(others)} or {last}" if others else last
        problems.append(f"{json_path}: image id {iid!r}: {file_name} not found in {places}")
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


def is_int(v: Any) -> bool:
    """An integer of the JSON, not a bool (which Python counts as one)."""
    return isinstance(v, int) and not isinstance(v, bool)


# The largest class id a label map can hold beside the 16-bit ignore index 65535.
MAX_CLASS_ID = 65534


def parse_categories(
    rows: Any, source: Path | str, *, default_isthing: bool | None, max_id: int | None = None,
    key: str | None = "categories",
) -> tuple[list[ClassInfo], list[str]]:
    """A COCO ``categories`` list (or the top-level list of a ``classes.json``, ``key=None``: the
    same rows) as class-table rows in file order, and the problems found, each naming ``source``.

    Each row needs an integer ``id`` (in ``0..max_id`` when given) and a string ``name``.
    ``isthing`` is 0/1 (or true/false); a row without it takes ``default_isthing``, and with
    ``default_isthing=None`` it is required. ``color`` is ``[r, g, b]`` of integers in 0..255; a
    row without one gets ``class_colour`` of its id (the one colour policy of every reader). A
    malformed row, or a second row with an id already used, is left out; a name used by two ids
    is a problem and both rows are kept (the class table is then refused as a whole).
    """
    def at(i: int) -> str:
        return f"{key}[{i}]" if key else f"row {i}"

    if not isinstance(rows, list):
        return [], [f"{source}: {key or 'the class table'} must be a list of {{id, name, ...}} objects, "
                    f"got {type(rows).__name__}"]
    classes: list[ClassInfo] = []
    problems: list[str] = []
    first: dict[int, int] = {}  # id -> row of its first definition
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not is_int(row.get("id")) or not isinstance(row.get("name"), str):
            problems.append(f"{source}: {at(i)} needs an integer 'id' and a string 'name', got {row!r:.200}")
            continue
        cid, name = row["id"], row["name"]
        if max_id is not None and not 0 <= cid <= max_id:
            problems.append(f"{source}: category id {cid} ({name!r}) outside 0..{max_id}")
            continue
        if cid in first:
            problems.append(f"{source}: duplicate category id {cid} ({at(first[cid])} and {at(i)})")
            continue
        isthing = row.get("isthing", default_isthing)
        if isthing not in (0, 1):  # True and False equal 1 and 0; None (required, absent) does not
            problems.append(f"{source}: category id {cid} ({name!r}) has isthing={row.get('isthing')!r}, expected 0 or 1")
            continue
        color = row.get("color")
        if color is None:
            color = class_colour(cid)
        elif not (isinstance(color, list | tuple) and len(color) == 3 and all(is_int(c) and 0 <= c < 256 for c in color)):
            problems.append(f"{source}: category id {cid} ({name!r}) has color={color!r:.100}, "
                            "expected [r, g, b] of integers in 0..255")
            continue
        first[cid] = i
        classes.append(ClassInfo(id=cid, name=name, isthing=bool(isthing), color=tuple(color)))
    if reason := check_class_names((c.id, c.name) for c in classes):
        problems.append(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")
    return classes, problems


def merge_classes(tables: Iterable[tuple[Path, list[ClassInfo]]],
                  ignore_index: int | None = None) -> tuple[list[ClassInfo], list[str]]:
    """One class table, sorted by id, from the tables of several files of one dataset; the same
    id defined differently (name, isthing or colour), or an id equal to ``ignore_index``, is a
    problem (the first definition is kept), and so is a name that another file gives another id
    (both kept: the class table is then refused as a whole; ``parse_categories`` reports the
    names a file repeats itself)."""
    merged: dict[int, tuple[Path, ClassInfo]] = {}
    named: dict[str, tuple[Path, int]] = {}
    problems = []
    for path, table in tables:
        for c in table:
            if c.id == ignore_index:
                problems.append(f"{path}: category id {c.id} ({c.name!r}) equals the ignore index {ignore_index}")
                continue
            if c.id in merged and merged[c.id][1] != c:
                first_path, first = merged[c.id]
                problems.append(
                    f"{path}: category id {c.id} is {c.name!r} (isthing={c.isthing}, color={list(c.color)}) but "
                    f"{first_path} defines it as {first.name!r} (isthing={first.isthing}, color={list(first.color)})"
                )
                continue
            merged.setdefault(c.id, (path, c))
            first_path, first_id = named.setdefault(c.name, (path, c.id))
            if first_id != c.id and first_path != path:
                problems.append(f"{path}: categories: {check_class_names([(first_id, c.name), (c.id, c.name)])} "
                                f"(id {first_id} in {first_path})")
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
        if not isinstance(img, dict) or not (is_int(img.get("id")) or isinstance(img.get("id"), str)):
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
            if not (is_int(img.get(key)) and img[key] > 0):
                table.problems.setdefault(iid, []).append(
                    f"{path}: image id {iid!r} has {key}={img.get(key)!r}, expected a positive integer"
                )
        table.by_id[iid] = img
    return table


def image_folders(input_dir: Path, folder: str | None, split: str | None) -> list[Path]:
    """Where the images of a COCO JSON may lie, in the order they are looked up:
    ``images/<folder>/``, ``images/<split>/``, ``<folder>/`` (COCO's own ``train2017/``),
    ``images/`` (without a folder or split, the ones naming it are left out)."""
    bases = [input_dir / "images" / folder if folder is not None else None,
             input_dir / "images" / split if split is not None else None,
             input_dir / folder if folder is not None else None,
             input_dir / "images"]
    return [base for base in bases if base is not None]


def find_image(input_dir: Path, folder: str | None, split: str | None, file_name: str) -> Path | None:
    """Where an image of a COCO JSON lies, the first of ``image_folders`` holding it; None when
    in none of them.

    ``file_name`` comes from the JSON: PathEscapeError (naming it) when it is absolute or climbs
    out of the folder it is looked up in, so no file outside the dataset is ever read.
    """
    for base in image_folders(input_dir, folder, split):
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
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(is_int(v) for v in size)):
        raise ValueError(f"{where}: RLE size {size!r:.100} is not [height, width]")
    if list(size) != [height, width]:
        raise ValueError(f"{where}: RLE size {list(size)} differs from the image's [{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        counts = _counts_from_string(counts, where)
    elif not (isinstance(counts, list) and all(is_int(c) and c >= 0 for c in counts)):
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
