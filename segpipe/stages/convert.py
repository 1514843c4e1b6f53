"""``segpipe convert``: annotations in any supported format -> validated, checksummed Parquet shards.

Records stream from a format reader (``segpipe.formats``) through a process pool that
validates and encodes a few images per task (ordered results, so the output is deterministic)
and hands back their rows as Arrow record batches, one per split, for per-split shard writers.
The workers also hash the source files they read (for the manifest's ``source_sha256``), so the
parent only hashes what no worker reads (the annotation files). Bad items are quarantined with
a reason naming the file and the image / annotation id, and listed in the manifest;
``--strict`` turns the first one into an error.

Granularity: a bad image, label map or record quarantines the image; a bad annotation
quarantines only that annotation and the image is kept with its other instances. The kept
image's semantic map stays correct either way: it comes from the label-map file when there is
one, and otherwise pixels no valid instance covers are ``ignore_index`` (never a wrong class).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import io
import os
import pickle
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from segpipe import shards, storage, validation
from segpipe.errors import UserError
from segpipe.files import sha256_bytes, sha256_file
from segpipe.formats import FORMATS, get_reader
from segpipe.formats.base import Record, Source
from segpipe.images import ImageError, open_image
from segpipe.lifetime import die_with_parent, pool_context
from segpipe.params import ConvertParams, add_params_arguments, as_dict, from_args

# Records per pool task. Fewer, larger tasks cost less IPC; the first results and the last
# worker's tail wait longer. benchmarks/convert.py (300 x 512 px, 2 workers): 1.21, 1.17 and
# 1.16 CPU s in all for batches of 4, 8 and 16.
BATCH = 8


class ConvertError(UserError, ValueError):
    """A bad item under ``--strict``, or input that cannot be converted at all."""


@dataclass(frozen=True)
class Context:
    """What a worker needs to process one record (picklable, sent once per task)."""

    class_ids: frozenset[int]
    ignore_index: int
    dtype: str  # numpy dtype name of stored label maps
    max_image_pixels: int
    val_fraction: float
    test_fraction: float
    tile_size: int = 0
    tile_overlap: int = 0
    tile_min_area: int = 0
    encode: bool = True  # False for `segpipe validate`: check only
    collection: str = ""  # the collection of records that name none (the input folder's name)


@dataclass
class Outcome:
    """A processed record: zero or more rows (several when tiled) and quarantine entries."""

    image_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, str]] = field(default_factory=list)
    image_quarantined: bool = False
    warnings: list[dict[str, str]] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)  # sha256 of the source files read, by path


@dataclass
class Chunk:
    """The outcomes of consecutive records, in order, with their rows batched: what one pool task
    hands back. The outcomes' own ``rows`` are empty; their rows are in ``rows``."""

    outcomes: list[Outcome]
    rows: dict[str, pa.RecordBatch] = field(default_factory=dict)  # per split, in record order
    class_pixels: dict[str, np.ndarray] = field(default_factory=dict)  # per split, as :func:`class_pixels`
    collections: dict[str, dict[str, int]] = field(default_factory=dict)  # rows per collection and split


# --------------------------------------------------------------------------------------
# Pure logic
# --------------------------------------------------------------------------------------


def hash_split(image_id: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from a hash of the image id: adding images never moves old ones."""
    u = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def tile_origins(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of overlapping tiles covering ``size`` pixels; the last one is flush."""
    if size <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def to_rle(inst: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """A validated instance's mask as one compressed COCO RLE (bytes counts, pycocotools form)."""
    from pycocotools import mask as mask_utils

    if inst.get("mask") is not None:
        return mask_utils.encode(np.asfortranarray(inst["mask"].astype(np.uint8)))
    seg = inst["segmentation"]
    if isinstance(seg, dict):
        counts = seg["counts"]
        if isinstance(counts, (str, bytes)):
            return {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
        return mask_utils.frPyObjects({"size": [height, width], "counts": [int(c) for c in counts]}, height, width)
    # Validated: each polygon is >= 6 finite numbers, so pycocotools reads them as polygons.
    polys = [p if isinstance(p, list) else list(p) for p in seg]
    rles = mask_utils.frPyObjects(polys, height, width)
    return rles[0] if len(rles) == 1 else mask_utils.merge(rles)  # merging one RLE would copy it


def instance_struct(inst_id: Any, category_id: int, iscrowd: int, rle: dict[str, Any]) -> dict[str, Any] | None:
    """Stored instance struct from an RLE; None when the mask is empty."""
    from pycocotools import mask as mask_utils

    area = int(mask_utils.area(rle))
    if area == 0:
        return None
    counts = rle["counts"]
    return {
        "id": int(inst_id) if isinstance(inst_id, (int, np.integer)) else _stable_int(inst_id),
        "category_id": int(category_id),
        "iscrowd": int(iscrowd),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": area,
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
        "size": [int(v) for v in rle["size"]],
    }


PIXELS_KEY = "_class_pixels"  # per-row class pixel counts, summed into the manifest, never stored


# Up to this many class ids, one compare-and-count pass per id beats a bincount, which widens
# every pixel to int64 first (benchmarks/convert.py's label maps: 12 ids, 0.3 vs 1.0 ms).
FEW_CLASSES = 32


def class_pixels(semantic: np.ndarray, class_ids: frozenset[int], ignore_index: int) -> list[int]:
    """Pixels of each class id ``0 .. max(class_ids)`` in a label map; the ignore index is not counted."""
    n = max(class_ids) + 1
    if n <= FEW_CLASSES:
        return [0 if v == ignore_index else int(np.count_nonzero(semantic == v)) for v in range(n)]
    flat = semantic.ravel()
    counts = np.bincount(flat[(flat < n) & (flat != ignore_index)].astype(np.int64), minlength=n)
    return counts[:n].tolist()


def _stable_int(value: Any) -> int:
    return int.from_bytes(hashlib.sha256(str(value).encode()).digest()[:7], "big")


def rasterise(instances: list[dict[str, Any]], height: int, width: int, ignore_index: int,
              dtype: np.dtype) -> np.ndarray:
    """A semantic map from instances (later ones on top); uncovered pixels are ``ignore_index``."""
    from pycocotools import mask as mask_utils

    sem = np.full((height, width), ignore_index, dtype=dtype)
    for inst in instances:
        m = mask_utils.decode({"size": inst["size"], "counts": inst["counts"].encode()})
        sem[m.astype(bool)] = inst["category_id"]
    return sem


def file_digest(path: str | Path) -> dict[str, str]:
    """``{str(Path(path)): sha256}`` of a file, or nothing when it cannot be read (then whoever
    needs the digest, :func:`source_hash`, reads the file itself and reports the error)."""
    try:
        return {str(Path(path)): sha256_file(path)}
    except OSError:
        return {}


def collect(outcomes: list[Outcome]) -> Chunk:
    """Outcomes -> a Chunk: their rows as one record batch per split, in order, and the rows'
    class pixels and collection counts summed per split."""
    by_split: dict[str, list[dict[str, Any]]] = {}
    chunk = Chunk([])
    for o in outcomes:
        for row in o.rows:
            split = row["split"]
            counts = np.asarray(row.pop(PIXELS_KEY), dtype=np.int64)
            chunk.class_pixels[split] = chunk.class_pixels[split] + counts if split in chunk.class_pixels else counts
            per_split = chunk.collections.setdefault(row["collection"], {})
            per_split[split] = per_split.get(split, 0) + 1
            by_split.setdefault(split, []).append(row)
        chunk.outcomes.append(dataclasses.replace(o, rows=[]))
    chunk.rows = {split: shards.record_batch(rows) for split, rows in by_split.items()}
    return chunk


def _entry(item: str, file: str, reason: str) -> dict[str, str]:
    return {"item": item, "file": file, "reason": reason}


def process_record(record: Record, ctx: Context) -> Outcome:
    """Validate one record and encode it into shard row(s). Runs in a worker process."""
    out = Outcome(image_id=record.image_id)
    item = f"image {record.image_id}"
    img_file = str(record.image_path) if record.image_path is not None else record.source

    def reject(file: str, reason: str) -> Outcome:
        out.quarantine.append(_entry(item, file, reason))
        out.image_quarantined = True
        out.rows = []
        return out

    out.warnings = [_entry(item, record.source, w) for w in record.warnings]
    if record.problems:
        for p in record.problems:
            out.quarantine.append(_entry(item, record.source, p))
        out.image_quarantined = True
        return out

    # Image: bytes, header (size check BEFORE decoding: a bomb is never decompressed), decode.
    data = record.image_bytes
    if data is None:
        if record.image_path is None:
            return reject(record.source, "record has neither an image file nor image bytes")
        try:
            data = Path(record.image_path).read_bytes()
        except FileNotFoundError:
            return reject(img_file, "image file missing")
        except OSError as e:
            return reject(img_file, f"image file unreadable: {e}")
        if ctx.encode:
            out.digests[str(Path(record.image_path))] = sha256_bytes(data)
    if not data:
        return reject(img_file, "image file is empty (0 bytes)")
    try:
        im = open_image(data, ctx.max_image_pixels)
    except ImageError as e:
        return reject(img_file, str(e))
    width, height = im.size
    if reason := validation.check_image_size(width, height, ctx.max_image_pixels, (record.height, record.width)):
        return reject(img_file, reason)
    tiled = ctx.tile_size > 0 and max(width, height) > ctx.tile_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if im.format == "JPEG" and not tiled:
                # Reduced-scale DCT decode still reads every entropy-coded byte, so truncation
                # and corruption are caught at a fraction of a full decode's cost.
                im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            im.load()
            pixels = np.asarray(im.convert("RGB")) if tiled else None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return reject(img_file, f"image is truncated or corrupt: {e}")
    image_format = im.format or "UNKNOWN"

    # Label map from the source, checked against the image and the class table.
    semantic = None
    sem_file = record.semantic_source or record.source
    if record.semantic is not None:
        try:
            semantic = np.asarray(record.semantic())
        except (OSError, ValueError, SyntaxError) as e:
            return reject(sem_file, f"label map unreadable: {e}")
        if ctx.encode and record.semantic_source:
            out.digests.update(file_digest(record.semantic_source))
        if reason := validation.check_label_map(semantic, height, width, ctx.class_ids, ctx.ignore_index):
            return reject(sem_file, reason)

    # Instances: checked in pure Python first; only valid ones reach pycocotools.
    for aid, reason in record.annotation_problems:
        out.quarantine.append(_entry(f"image {record.image_id} annotation {aid}", record.source, reason))
    structs = []
    seen_ids: set[Any] = set()
    for k, inst in enumerate(record.instances):
        aid = inst.get("id", k)
        a_item = f"image {record.image_id} annotation {aid}"
        if aid in seen_ids:
            out.quarantine.append(_entry(a_item, record.source, f"duplicate annotation id {aid} within the image"))
            continue
        seen_ids.add(aid)
        if reason := validation.check_annotation(inst, height, width, ctx.class_ids):
            out.quarantine.append(_entry(a_item, record.source, reason))
            continue
        s = instance_struct(aid, inst["category_id"], int(inst.get("iscrowd", 0)), to_rle(inst, height, width))
        if s is None:
            out.quarantine.append(_entry(a_item, record.source, "mask is empty (covers no pixel of the image)"))
            continue
        structs.append(s)

    if not ctx.encode:
        return out
    dtype = np.dtype(ctx.dtype)
    if semantic is None:
        semantic = rasterise(structs, height, width, ctx.ignore_index, dtype)
    split = record.split or hash_split(record.image_id, ctx.val_fraction, ctx.test_fraction)
    base = {"split": split, "source_image_id": record.image_id, "collection": record.collection or ctx.collection}
    if not tiled:
        sem_bytes, sem_enc = shards.encode_semantic(semantic, dtype)
        out.rows.append({**base, "image_id": record.image_id, "height": height, "width": width, "image": data,
                         "image_format": image_format, "semantic": sem_bytes, "semantic_encoding": sem_enc,
                         "instances": structs, "tile_x": 0, "tile_y": 0,
                         PIXELS_KEY: class_pixels(semantic, ctx.class_ids, ctx.ignore_index)})
        return out
    out.rows.extend(tile_rows(record.image_id, base, pixels, semantic, structs, ctx))
    return out


def tile_rows(image_id: str, base: dict[str, Any], pixels: np.ndarray, semantic: np.ndarray,
              structs: list[dict[str, Any]], ctx: Context) -> Iterator[dict[str, Any]]:
    """Overlapping tiles of one image: cut image and label map, clip instances, drop slivers."""
    from pycocotools import mask as mask_utils

    height, width = semantic.shape
    masks = [mask_utils.decode({"size": s["size"], "counts": s["counts"].encode()}) for s in structs]
    dtype = np.dtype(ctx.dtype)
    for y in tile_origins(height, ctx.tile_size, ctx.tile_overlap):
        for x in tile_origins(width, ctx.tile_size, ctx.tile_overlap):
            th, tw = min(ctx.tile_size, height - y), min(ctx.tile_size, width - x)
            buf = io.BytesIO()
            # Tiles must be re-encoded: PNG keeps them lossless.
            Image.fromarray(pixels[y:y + th, x:x + tw]).save(buf, "PNG", compress_level=1)
            sem_bytes, sem_enc = shards.encode_semantic(semantic[y:y + th, x:x + tw], dtype)
            tile_structs = []
            for s, m in zip(structs, masks):
                crop = np.asfortranarray(m[y:y + th, x:x + tw])
                if int(crop.sum()) < max(1, ctx.tile_min_area):
                    continue
                t = instance_struct(s["id"], s["category_id"], s["iscrowd"], mask_utils.encode(crop))
                if t is not None:
                    tile_structs.append(t)
            yield {**base, "image_id": f"{image_id}@{x},{y}", "height": th, "width": tw, "image": buf.getvalue(),
                   "image_format": "PNG", "semantic": sem_bytes, "semantic_encoding": sem_enc,
                   "instances": tile_structs, "tile_x": x, "tile_y": y,
                   PIXELS_KEY: class_pixels(semantic[y:y + th, x:x + tw], ctx.class_ids, ctx.ignore_index)}


# --------------------------------------------------------------------------------------
# Streaming through the pool
# --------------------------------------------------------------------------------------


def _init_worker(max_image_pixels: int, parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        die_with_parent(parent_pid)
    # Images are opened through segpipe.images.open_image, which checks the header first.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


class _Preloaded:
    """A label map already loaded in the parent (its reader's loader could not be pickled)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __call__(self) -> np.ndarray:
        return self.array


def _picklable(record: Record) -> Record:
    if record.semantic is not None:
        try:
            pickle.dumps(record.semantic)
        except (pickle.PicklingError, TypeError, AttributeError):
            try:
                record.semantic = _Preloaded(np.asarray(record.semantic()))
            except (OSError, ValueError) as e:
                record.problems = [*record.problems, f"label map unreadable: {e}"]
                record.semantic = None
    return record


def process_source(source: Source, ctx: Context, workers: int, progress: bool = True) -> Iterator[Outcome]:
    """Every record's Outcome, in order (rows left out: see :func:`process_chunks`)."""
    for chunk in process_chunks(source, ctx, workers, progress):
        yield from chunk.outcomes


def process_chunks(source: Source, ctx: Context, workers: int, progress: bool = True) -> Iterator[Chunk]:
    """Process every record of ``source`` in order, ``workers`` processes at a time, ``BATCH``
    records per task; yields each task's Chunk in record order.

    At most a few tasks per worker are in flight, so memory does not grow with the dataset.
    Duplicate image ids are caught here (first one wins, later ones are quarantined).
    """
    from segpipe.progress import Progress

    workers = workers or os.cpu_count() or 1
    seen: dict[str, str] = {}
    bar = Progress(f"convert {source.name}", total=source.count, enabled=progress)
    bar.start()

    def dedup(record: Record) -> Outcome | None:
        if record.image_id in seen:
            o = Outcome(record.image_id, image_quarantined=True)
            o.quarantine.append(_entry(f"image {record.image_id}", record.source,
                                       f"duplicate image id {record.image_id} (first seen in {seen[record.image_id]})"))
            return o
        seen[record.image_id] = record.source
        return None

    def done(chunk: Chunk) -> Chunk:
        bar.advance(len(chunk.outcomes))
        return chunk

    tasks = _tasks(source.records(), dedup)
    try:
        if workers == 1:
            _init_worker(ctx.max_image_pixels)
            for task in tasks:
                yield done(task if isinstance(task, Chunk) else process_batch(task, ctx))
            return
        window: collections.deque[Future | Chunk] = collections.deque()
        _preload()
        with ProcessPoolExecutor(workers, mp_context=pool_context(), initializer=_init_worker,
                                 initargs=(ctx.max_image_pixels, os.getpid())) as pool:
            for task in tasks:
                window.append(task if isinstance(task, Chunk) else
                              pool.submit(process_batch, [_picklable(r) for r in task], ctx))
                while len(window) > 3 * workers:
                    yield done(_result(window.popleft()))
            while window:
                yield done(_result(window.popleft()))
    finally:
        bar.close()


def _tasks(records: Iterator[Record], dedup: Callable[[Record], Outcome | None]) -> Iterator[list[Record] | Chunk]:
    """Records in batches of up to ``BATCH``, in order, and the duplicates ``dedup`` finds as
    finished Chunks. Batches, because one task per image costs more in IPC than a small image
    takes to check; one process batches the same way, so both run the same code."""
    batch: list[Record] = []
    for record in records:
        dup = dedup(record)
        if dup is not None:
            if batch:
                yield batch
                batch = []
            yield Chunk([dup])
            continue
        batch.append(record)
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def process_batch(records: list[Record], ctx: Context) -> Chunk:
    """:func:`process_record` over a batch, in order, collected into a Chunk (one pool task)."""
    return collect([process_record(r, ctx) for r in records])


def _preload() -> None:
    """Import what every task needs (Pillow's JPEG and PNG plugins, pycocotools) before the
    workers fork, so that each one does not import it again on its first task."""
    from PIL import Image
    from pycocotools import mask  # noqa: F401

    Image.preinit()


def _result(item: Future | Chunk) -> Chunk:
    return item.result() if isinstance(item, Future) else item


def make_context(source: Source, params: ConvertParams, encode: bool = True) -> Context:
    ids = [c.id for c in source.classes]
    return Context(
        class_ids=frozenset(ids), ignore_index=source.ignore_index,
        dtype=shards.semantic_dtype(max(ids + [source.ignore_index])).name,
        max_image_pixels=params.max_image_pixels, val_fraction=params.val_fraction,
        test_fraction=params.test_fraction, tile_size=params.tile_size, tile_overlap=params.tile_overlap,
        tile_min_area=params.tile_min_area, encode=encode, collection=source.collection or default_collection(source),
    )


def default_collection(source: Source) -> str:
    """The collection of records that name none: the folder holding all of the source's files
    (the dataset's root), or ``shards.UNNAMED_COLLECTION`` when there are none."""
    files = resolve_paths(source.files)
    if not files:
        return shards.UNNAMED_COLLECTION
    return Path(os.path.commonpath([os.path.dirname(f) for f in files])).name or shards.UNNAMED_COLLECTION


def dataset_entries(source: Source) -> list[dict[str, str]]:
    """Dataset-level reader problems as quarantine entries."""
    return [_entry("dataset", source.name, p) for p in source.problems]


def check_source(source: Source) -> None:
    """Errors in the source as a whole, before any image: raise ConvertError naming them."""
    if reason := validation.check_class_names((c.id, c.name) for c in source.classes):
        raise ConvertError(f"{source.name} class table: {reason}")


def nothing_converted(source: Source, images: int, quarantine: list[dict[str, str]]) -> str:
    """The error of a run in which no image survived: how many were read, and the first reason."""
    if not images:
        head = f"{source.name}: no image found in the input"
    else:
        head = f"{source.name}: no image converted: all {images} image(s) were quarantined"
    if quarantine:
        e = quarantine[0]
        head += f" (first: {e['file']}: {e['item']}: {e['reason']})"
    return head


def source_hash(files: list[Path], digests: dict[str, str] | None = None) -> str:
    """sha256 over the sorted (relative path, content sha256) of every source file.

    ``digests`` maps ``str(path)`` to the sha256 of files already hashed (the workers hash the
    image and label-map bytes they read); every other file is read and hashed here."""
    files = sorted({Path(f) for f in files})
    if not files:
        return hashlib.sha256(b"").hexdigest()
    digests = digests or {}
    resolved = resolve_paths(files)
    # every resolved path lies under root: its path relative to root is what follows root's "/"
    root = os.path.join(os.path.commonpath([os.path.dirname(f) for f in resolved]), "")
    h = hashlib.sha256()
    for f, real in zip(files, resolved):
        digest = digests.get(str(f)) or sha256_file(f)
        h.update(f"{real[len(root):].replace(os.sep, '/')}\0{digest}\n".encode())
    return h.hexdigest()


def resolve_paths(files: list[Path]) -> list[str]:
    """``[str(Path(f).resolve()) for f in files]``, resolving each folder once: a file that is not
    a symbolic link resolves to its resolved folder joined with its name, which is where
    ``Path.resolve`` ends up too (pathlib costs more than the hashing in ``source_hash``)."""
    folders: dict[str, str] = {}
    out = []
    for f in map(os.fspath, files):
        head, name = os.path.split(f)
        if name in ("", ".", "..") or os.path.islink(f):
            out.append(str(Path(f).resolve()))
            continue
        folder = folders.get(head)
        if folder is None:
            folder = folders[head] = str(Path(head).resolve())
        out.append(os.path.join(folder, name))
    return out


# --------------------------------------------------------------------------------------
# run / main
# --------------------------------------------------------------------------------------


def run(params: ConvertParams, source: Source, out: Path | str | storage.Location,
        progress: bool = True) -> dict[str, Any]:
    """Convert ``source`` into shards at ``out``, a local folder or an object-store URI, replaced
    whole or not at all (see ``shards.new_set``); returns the manifest."""
    check_source(source)
    out = storage.resolve(out, "--out")
    ctx = make_context(source, params)
    quarantine = dataset_entries(source)
    warnings_: list[dict[str, str]] = []
    if quarantine and params.strict:
        raise ConvertError(f"--strict: {quarantine[0]['reason']}")
    images = 0
    pixels: dict[str, np.ndarray] = {}
    collections: dict[str, dict[str, int]] = {}
    digests: dict[str, str] = {}
    with shards.new_set(out) as staging:
        writers: dict[str, shards.ShardWriter] = {}
        try:
            for chunk in process_chunks(source, ctx, params.workers, progress):
                for outcome in chunk.outcomes:
                    if outcome.quarantine and params.strict:
                        e = outcome.quarantine[0]
                        raise ConvertError(f"--strict: {e['file']}: {e['item']}: {e['reason']}")
                    images += 1
                    quarantine.extend(outcome.quarantine)
                    warnings_.extend(outcome.warnings)
                    digests.update(outcome.digests)
                for split, counts in chunk.class_pixels.items():
                    pixels[split] = pixels.get(split, 0) + counts
                for name, per_split in chunk.collections.items():
                    mine = collections.setdefault(name, {})
                    for split, n in per_split.items():
                        mine[split] = mine.get(split, 0) + n
                for split, rows in chunk.rows.items():
                    w = writers.get(split)
                    if w is None:
                        w = writers[split] = shards.ShardWriter(staging.path, split, params.rows_per_shard,
                                                                send=staging.send)
                    w.write(rows)
            shard_list = [s for split in sorted(writers) for s in writers[split].close()]
            if not shard_list:
                raise ConvertError(nothing_converted(source, images, quarantine)
                                   + "; nothing was written (segpipe validate lists every problem)")
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        manifest = {
            "schema_version": shards.SCHEMA_VERSION,
            "format": source.name,
            "classes": [{"id": c.id, "name": c.name, "isthing": c.isthing, "color": list(c.color)}
                        for c in source.classes],
            "ignore_index": source.ignore_index,
            "semantic_encoding": f"zstd-{ctx.dtype}",
            "splits": {split: sum(s["rows"] for s in shard_list if s["split"] == split) for split in sorted(writers)},
            # labelled pixels per class id, per split: class weights for training, stats at a glance
            "class_pixels": {split: pixels[split].tolist() for split in sorted(pixels)},
            # rows per source collection and split (evaluate scores each collection apart)
            "collections": {name: dict(sorted(collections[name].items())) for name in sorted(collections)},
            "shards": shard_list,
            "source_sha256": source_hash(source.files, digests),
            "quarantine": quarantine,
            "warnings": warnings_,
            # workers changes how fast, never what: leave it out so the manifest stays identical.
            "params": {k: v for k, v in as_dict(params).items() if k != "workers"},
        }
        shards.write_manifest(staging.path, manifest)
    return manifest


def read_source(args: argparse.Namespace) -> Source:
    """The Source named by the CLI arguments (``--format`` and its inputs, local paths: the
    format readers open files by path)."""
    reader = get_reader(args.format)
    local = storage.require_local
    if args.format == "coco" and args.input and not args.annotations:
        from segpipe.formats.coco import read_collections

        return read_collections(local(args.input, "--input"))
    if args.format == "coco":
        if not args.annotations or not args.images:
            raise SystemExit("segpipe: --format coco needs --input DIR (a collection, or a folder of them) "
                             "or --annotations FILE (repeatable) and --images DIR")
        return reader([local(a, "--annotations") for a in args.annotations], local(args.images, "--images"),
                      local(args.masks, "--masks") if args.masks else None)
    if not args.input:
        raise SystemExit(f"segpipe: --format {args.format} needs --input DIR (the dataset's root folder)")
    return reader(local(args.input, "--input"))


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=list(FORMATS), help="input annotation format")
    parser.add_argument("--annotations", action="append", default=[], metavar="FILE",
                        help="coco: instances JSON (repeatable; split from the name, e.g. instances_val2017.json)")
    parser.add_argument("--images", help="coco: image folder")
    parser.add_argument("--masks", help="coco: folder of semantic label PNGs named like the images")
    parser.add_argument("--input", help="the dataset's root folder; coco: a collection (annotations/, images/, "
                        "masks/) or a folder of collections, e.g. data/raw")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segpipe convert", description=__doc__.split("\n")[0])
    add_source_arguments(parser)
    parser.add_argument("--out", required=True,
                        help="output shard folder, or a URI (s3://bucket/shards, gs://..., file://...); replaced whole")
    parser.add_argument("--strict", action="store_true", help="any bad item is an error (default: params)")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    params = from_args(args, "convert")
    if args.strict:
        params = dataclasses.replace(params, strict=True)
    out = storage.resolve(args.out, "--out")  # errors the user can fix end as one line (segpipe.cli)
    source = read_source(args)
    manifest = run(params, source, out, progress=not args.no_progress)
    rows = ", ".join(f"{k} {v}" for k, v in manifest["splits"].items()) or "no rows"
    print(f"wrote {out}: {rows}; {len(manifest['shards'])} shard(s); "
          f"{len(manifest['quarantine'])} quarantined item(s); {len(manifest['warnings'])} warning(s)")
