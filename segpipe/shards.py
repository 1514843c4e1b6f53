"""The shard format: Parquet schema, row encoding, the shard writer and the public reader.

A shard set is ``OUT/<split>/part-NNNNN.parquet`` plus ``OUT/manifest.json``; the schema is
documented in ``docs/shards.md``. ``OUT`` is a local folder or an object-store URI
(``s3://bucket/shards``, see ``segpipe.storage``). Every later stage reads shards through this
module only::

    for sample in iter_samples("data/shards", split="train"):   # or "s3://bucket/shards"
        sample["image"]      # H x W x 3 uint8
        sample["semantic"]   # H x W uint8/uint16, ignore_index where unlabelled
        sample["instances"]  # [{"category_id", "iscrowd", "bbox", "segmentation": RLE}]
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from segpipe import storage
from segpipe.errors import UserError
from segpipe.files import atomic_path, escape_reason, sha256_file
from segpipe.storage import Location, Staging

SCHEMA_VERSION = 2  # 2: the collection column
UNNAMED_COLLECTION = "all"
MANIFEST = "manifest.json"

# Measured by benchmarks/convert.py (512 x 512 label maps, read back from Parquet): raw bytes
# + zstd decode in ~0.4 ms and take ~3.3 kB, PNG decodes in ~1.0 ms and takes ~4.4 kB (and
# costs ~4.5 ms to encode). So label maps are stored as raw little-endian C-order bytes,
# zstd-compressed by the converter's workers (the Parquet column itself is uncompressed, so the
# single writer process does no compression work).
SEMANTIC_ENCODINGS = ("zstd-uint8", "zstd-uint16", "raw-uint8", "raw-uint16", "png")
ZSTD = pa.Codec("zstd", compression_level=1)

INSTANCE_TYPE = pa.struct(
    [
        ("id", pa.int64()),
        ("category_id", pa.int32()),
        ("iscrowd", pa.uint8()),
        ("bbox", pa.list_(pa.float64(), 4)),
        ("area", pa.int64()),
        ("counts", pa.string()),  # COCO compressed RLE (column-major, pycocotools' string form)
        ("size", pa.list_(pa.int32(), 2)),  # [h, w]
    ]
)

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("split", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.binary()),  # the original encoded file (or a lossless PNG for a tile)
        ("image_format", pa.string()),  # PIL format name: JPEG, PNG, ...
        ("semantic", pa.binary()),
        ("semantic_encoding", pa.string()),  # one of SEMANTIC_ENCODINGS
        ("instances", pa.list_(INSTANCE_TYPE)),
        ("source_image_id", pa.string()),  # == image_id unless the row is a tile
        ("tile_x", pa.int32()),  # tile origin in the source image (0, 0 when not tiled)
        ("tile_y", pa.int32()),
        ("collection", pa.string()),  # the source collection (data/raw/<name>, or the input folder's name)
    ]
)

# Encoded images and zstd label maps do not compress further: spend no CPU on them.
COMPRESSION = {name: ("none" if name in ("image", "semantic") else "zstd") for name in SCHEMA.names}


class ShardError(UserError, ValueError):
    """A shard set is missing, inconsistent with its manifest, or corrupt; names the file."""


# --------------------------------------------------------------------------------------
# Pure encoding / decoding
# --------------------------------------------------------------------------------------


def semantic_dtype(max_label: int) -> np.dtype:
    """The smallest unsigned dtype that holds every class id and the ignore index."""
    if max_label < 256:
        return np.dtype(np.uint8)
    if max_label < 65536:
        return np.dtype(np.uint16)
    raise ValueError(f"label value {max_label} does not fit in uint16")


def encode_semantic(semantic: np.ndarray, dtype: np.dtype) -> tuple[bytes, str]:
    """H x W label map -> (bytes, encoding name): zstd of the raw little-endian C-order bytes."""
    dtype = np.dtype(dtype)
    arr = np.ascontiguousarray(semantic, dtype=dtype.newbyteorder("<"))
    return ZSTD.compress(arr.tobytes(), asbytes=True), f"zstd-{dtype.name}"


def decode_semantic(data: bytes, height: int, width: int, encoding: str) -> np.ndarray:
    """The inverse of :func:`encode_semantic`; also reads ``raw-*`` and ``png`` label maps."""
    kind, _, dtype_name = encoding.partition("-")
    if kind in ("zstd", "raw") and dtype_name in ("uint8", "uint16"):
        dtype = np.dtype(dtype_name).newbyteorder("<")
        if kind == "zstd":
            try:
                data = ZSTD.decompress(data, decompressed_size=height * width * dtype.itemsize, asbytes=True)
            except (OSError, pa.ArrowException) as e:
                raise ShardError(f"semantic map does not decompress as {height} x {width} {dtype_name}: {e}") from None
        arr = np.frombuffer(data, dtype=dtype)
        if arr.size != height * width:
            raise ShardError(f"semantic map has {arr.size} values, expected {height} x {width}")
        return arr.reshape(height, width).astype(dtype.newbyteorder("="), copy=False)
    if encoding == "png":
        arr = np.asarray(Image.open(io.BytesIO(data)))
        if arr.shape != (height, width):
            raise ShardError(f"semantic PNG is {arr.shape}, expected {(height, width)}")
        return arr
    raise ShardError(f"unknown semantic encoding {encoding!r}; valid: {', '.join(SEMANTIC_ENCODINGS)}")


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> H x W x 3 uint8 (grey, palette and alpha images become RGB)."""
    with warnings.catch_warnings():
        # Size was checked against max_image_pixels at conversion; do not re-warn on read.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return list(value)
    return list(value)


def decode_instance(inst: dict[str, Any]) -> dict[str, Any]:
    """One stored instance struct -> the public instance dict (COCO RLE ``segmentation``)."""
    counts = inst["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {
        "id": int(inst["id"]),
        "category_id": int(inst["category_id"]),
        "iscrowd": int(inst["iscrowd"]),
        "bbox": [float(v) for v in _as_list(inst["bbox"])],
        "area": int(inst["area"]),
        "segmentation": {"size": [int(v) for v in _as_list(inst["size"])], "counts": counts},
    }


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """One raw Parquet row (a dict of column values, e.g. from Ray Data) -> a sample dict.

    Works on plain Python values as well as the numpy values Ray Data hands out.
    """
    height, width = int(row["height"]), int(row["width"])
    image = decode_image(bytes(row["image"]))
    if image.shape[:2] != (height, width):
        raise ShardError(f"image {row['image_id']}: decoded {image.shape[:2]}, row says {(height, width)}")
    semantic = decode_semantic(bytes(row["semantic"]), height, width, str(row["semantic_encoding"]))
    return {
        "image_id": str(row["image_id"]),
        "split": str(row["split"]),
        "height": height,
        "width": width,
        "image": image,
        "semantic": semantic,
        "instances": [decode_instance(dict(i)) for i in _as_list(row["instances"])],
        "source_image_id": str(row.get("source_image_id") or row["image_id"]),
        "tile_x": int(row.get("tile_x") or 0),
        "tile_y": int(row.get("tile_y") or 0),
        # shards of schema 1 have no collection column: all their rows are one collection
        "collection": str(row.get("collection") or UNNAMED_COLLECTION),
    }


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def new_set(out: Location) -> AbstractContextManager[Staging]:
    """Where to write a shard set that replaces ``out`` whole or not at all: write the shards
    (``ShardWriter(staging.path, ..., send=staging.send)``), then the manifest into
    ``staging.path``. The manifest is the commit: on an object store it is uploaded last, after
    every shard, and the old one is deleted before the first (see ``segpipe.storage.output_dir``)."""
    return storage.output_dir(out, MANIFEST)


def record_batch(rows: Sequence[dict[str, Any]]) -> pa.RecordBatch:
    """Rows (dicts keyed by the shard schema's columns) -> one RecordBatch in :data:`SCHEMA`.

    Built column by column from buffers; equal to ``pa.RecordBatch.from_pylist(rows,
    schema=SCHEMA)`` (tests/test_shards.py pins it): a missing key or a None is a null. Two
    reasons not to use ``from_pylist`` or ``pa.array``: they infer the nested instance structs
    value by value (most of the converter's Parquet writing time), and their first call in a
    process imports pandas to ask whether the input is a pandas object, about 1 s of CPU in the
    converter and again in each of its forked workers.
    """
    columns = [_instances_array(rows) if name == "instances" else
               _flat_array([row.get(name) for row in rows], SCHEMA.field(name).type) for name in SCHEMA.names]
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


_NUMPY_TYPES = {pa.int32(): np.int32, pa.int64(): np.int64, pa.uint8(): np.uint8, pa.float64(): np.float64}


def _flat_array(values: Sequence[Any], type_: pa.DataType) -> pa.Array:
    """An Arrow array of strings, bytes or numbers (None is null), built from its buffers."""
    n = len(values)
    valid = np.fromiter((v is not None for v in values), bool, n)
    nulls = n - int(valid.sum())
    validity = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    if type_ in (pa.string(), pa.binary()):
        blobs = [b"" if v is None else v.encode() if isinstance(v, str) else bytes(v) for v in values]
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum([len(b) for b in blobs], out=offsets[1:])
        if offsets[-1] >= 2**31:
            raise ValueError(f"{offsets[-1]} bytes of {type_} in one batch; at most 2 GiB fit")
        return pa.Array.from_buffers(type_, n, [validity, pa.py_buffer(offsets.astype(np.int32)),
                                                pa.py_buffer(b"".join(blobs))], null_count=nulls)
    data = np.array([0 if v is None else v for v in values], dtype=_NUMPY_TYPES[type_])
    return pa.Array.from_buffers(type_, n, [validity, pa.py_buffer(data)], null_count=nulls)


def _instances_array(rows: Sequence[dict[str, Any]]) -> pa.Array:
    """The ``instances`` column: one list of instance structs per row, built from flat columns."""
    offsets = [0]
    ids, categories, crowds, bboxes, areas, counts, sizes = [], [], [], [], [], [], []
    lists = [row.get("instances") for row in rows]
    for k, insts in enumerate(lists):
        for inst in insts or ():
            bbox, size = inst["bbox"], inst["size"]
            if len(bbox) != 4 or len(size) != 2:
                raise ValueError(f"row {k} (image {rows[k].get('image_id')}): an instance needs a bbox of 4 "
                                 f"numbers and a size of 2, got {list(bbox)} and {list(size)}")
            ids.append(inst["id"])
            categories.append(inst["category_id"])
            crowds.append(inst["iscrowd"])
            bboxes.extend(bbox)
            areas.append(inst["area"])
            counts.append(inst["counts"])
            sizes.extend(size)
        offsets.append(len(ids))
    types = {f.name: f.type for f in INSTANCE_TYPE}
    structs = pa.StructArray.from_arrays(
        [_flat_array(ids, types["id"]), _flat_array(categories, types["category_id"]),
         _flat_array(crowds, types["iscrowd"]),
         pa.FixedSizeListArray.from_arrays(_flat_array(bboxes, pa.float64()), 4),
         _flat_array(areas, types["area"]), _flat_array(counts, types["counts"]),
         pa.FixedSizeListArray.from_arrays(_flat_array(sizes, pa.int32()), 2)],
        fields=list(INSTANCE_TYPE))
    valid = np.fromiter((insts is not None for insts in lists), bool, len(lists))
    nulls = len(lists) - int(valid.sum())
    validity = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(SCHEMA.field("instances").type, len(rows),
                                 [validity, pa.py_buffer(np.array(offsets, np.int32))], null_count=nulls,
                                 children=[structs])


class _HashingFile(io.RawIOBase):
    """A binary file opened for writing that hashes what goes through it (sha256), so a shard's
    checksum needs no second read of the shard."""

    def __init__(self, path: Path):
        super().__init__()
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._sha256 = hashlib.sha256()
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sha256.update(data)
        written = self._file.write(data)
        self._written += written
        return written

    def tell(self) -> int:
        return self._written

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()


class ShardWriter:
    """Writes rows of one split to ``OUT/<split>/part-NNNNN.parquet``, ``rows_per_shard`` each.

    Each shard is written under a temporary name (hashed as it is written) and renamed when
    complete, then handed to ``send`` (``Staging.send`` uploads it to an object store). Rows are buffered into row groups
    of ``row_group_rows`` so memory stays bounded by one row group (plus the batch being added).
    Row groups and shards are cut by row count alone and each row group is written as one
    contiguous chunk, so the bytes written do not depend on how the rows were batched.
    """

    def __init__(self, out: Path, split: str, rows_per_shard: int, row_group_rows: int = 64,
                 send: Callable[[Path], None] | None = None):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.out, self.split, self.send = Path(out), split, send
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = max(1, min(row_group_rows, rows_per_shard))
        self.shards: list[dict[str, Any]] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._ctx: Any = None
        self._file: _HashingFile | None = None
        self._rows_in_shard = 0

    def write(self, rows: pa.RecordBatch | pa.Table) -> None:
        """Append rows in :data:`SCHEMA` (see :func:`record_batch`)."""
        if not rows.schema.equals(SCHEMA):
            raise ValueError(f"rows for {self.split} are not in the shard schema: {rows.schema}")
        if rows.num_rows == 0:
            return
        self._pending.append(rows if isinstance(rows, pa.Table) else pa.Table.from_batches([rows]))
        self._pending_rows += rows.num_rows
        while self._pending_rows and self._pending_rows >= self._group_rows():
            self._flush(self._group_rows())

    def close(self) -> list[dict[str, Any]]:
        """Flush and finish the open shard; returns [{path, split, rows, bytes, sha256}]."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._finish_shard()
        return self.shards

    def abort(self) -> None:
        if self._ctx is not None:
            try:
                try:
                    self._writer.close()  # type: ignore[union-attr]
                finally:
                    self._file.close()  # type: ignore[union-attr]
            finally:
                self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._ctx = self._writer = self._file = None

    def _group_rows(self) -> int:
        """Rows of the next row group: a full group, or what the open shard has room for."""
        return min(self.row_group_rows, self.rows_per_shard - self._rows_in_shard)

    def _flush(self, n: int) -> None:
        if self._writer is None:
            path = self._path(len(self.shards))
            self._ctx = atomic_path(path)
            self._file = _HashingFile(self._ctx.__enter__())
            self._writer = pq.ParquetWriter(
                self._file, SCHEMA, compression=COMPRESSION, write_page_checksum=True,
                use_dictionary=["split", "semantic_encoding", "image_format"], write_statistics=False,
            )
        pending = self._pending[0] if len(self._pending) == 1 else pa.concat_tables(self._pending)
        rest = pending.slice(n)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        # One chunk per column: Parquet pages are cut per written chunk, so batching must not show.
        self._writer.write_table(pending.slice(0, n).combine_chunks(), row_group_size=n)
        self._rows_in_shard += n
        if self._rows_in_shard >= self.rows_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()  # type: ignore[union-attr]
        path = self._path(len(self.shards))
        self._ctx.__exit__(None, None, None)  # fsync + rename into place
        self.shards.append(
            {
                "path": path.relative_to(self.out).as_posix(),
                "split": self.split,
                "rows": self._rows_in_shard,
                "bytes": path.stat().st_size,
                "sha256": self._file.hexdigest(),  # type: ignore[union-attr]
            }
        )
        self._writer = self._ctx = self._file = None
        self._rows_in_shard = 0
        if self.send is not None:
            self.send(path)

    def _path(self, index: int) -> Path:
        return self.out / self.split / f"part-{index:05d}.parquet"


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardFile:
    """One shard as the manifest lists it; ``path`` is relative to the set's root."""

    path: str
    split: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardSet:
    """A shard set as its manifest describes it: read once (:func:`open_shards`) and handed down
    to every stage and Ray worker that reads it, instead of re-parsing ``manifest.json``.

    ``to_dict``/``from_dict`` carry it across process boundaries (Ray's train loop config) as
    plain JSON values; nothing is unpickled. ``root`` is an absolute local path or an
    object-store URI; each process resolves it with its own configuration (``AWS_*``).
    """

    root: str
    manifest_sha256: str
    classes: tuple[dict[str, Any], ...]
    ignore_index: int
    splits: dict[str, int]
    files: tuple[ShardFile, ...]
    class_pixels: dict[str, tuple[int, ...]]
    collections: dict[str, dict[str, int]] = field(default_factory=dict)  # rows per collection and split

    @property
    def num_classes(self) -> int:
        """Logits per pixel: the largest class id + 1 (ids need not be contiguous)."""
        return max(int(c["id"]) for c in self.classes) + 1

    @property
    def thing_ids(self) -> list[int]:
        return sorted(int(c["id"]) for c in self.classes if c.get("isthing"))

    def files_of(self, split: str) -> list[ShardFile]:
        """The shards of ``split`` in manifest order; ShardError naming the splits there are."""
        if split not in self.splits:
            raise ShardError(f"{self.root}: no split {split!r}; splits: {', '.join(self.splits) or '(none)'}")
        return [f for f in self.files if f.split == split]

    def rows(self, split: str) -> int:
        return int(self.splits.get(split, 0))

    def location_of(self, file: ShardFile) -> Location:
        return storage.resolve(self.root, "shards").child(file.path)

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "manifest_sha256": self.manifest_sha256, "classes": list(self.classes),
                "ignore_index": self.ignore_index, "splits": dict(self.splits),
                "files": [vars(f) for f in self.files],
                "class_pixels": {k: list(v) for k, v in self.class_pixels.items()},
                "collections": {k: dict(v) for k, v in self.collections.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardSet:
        return cls(root=d["root"], manifest_sha256=d["manifest_sha256"], classes=tuple(d["classes"]),
                   ignore_index=int(d["ignore_index"]), splits=dict(d["splits"]),
                   files=tuple(ShardFile(**f) for f in d["files"]),
                   class_pixels={k: tuple(v) for k, v in d.get("class_pixels", {}).items()},
                   collections={k: dict(v) for k, v in d.get("collections", {}).items()})


def open_shards(path: Path | str | Location) -> ShardSet:
    """Read and check a shard set's manifest once; the sha256 of its bytes identifies the set.

    ``path`` is the set's folder (a local path or an object-store URI) or, locally, one of its
    shard files. Without a valid manifest there is no set: a folder whose shards are still being
    written, or whose write failed, has none (the manifest is written last)."""
    root = _set_location(path)
    data = _manifest_bytes(root, path)
    manifest = _parse_manifest(data, root.child(MANIFEST))
    return ShardSet(
        root=root.uri, manifest_sha256=hashlib.sha256(data).hexdigest(), classes=tuple(manifest["classes"]),
        ignore_index=int(manifest["ignore_index"]), splits={k: int(v) for k, v in manifest["splits"].items()},
        files=tuple(ShardFile(path=e["path"], split=e["split"], rows=int(e["rows"]), bytes=int(e["bytes"]),
                              sha256=e["sha256"]) for e in manifest["shards"]),
        class_pixels={k: tuple(int(x) for x in v) for k, v in (manifest.get("class_pixels") or {}).items()},
        collections={str(k): {str(s): int(n) for s, n in v.items()} for k, v in (manifest.get("collections") or {}).items()},
    )


def verify_split(shards: ShardSet, split: str) -> None:
    """Check every shard of ``split`` against the manifest (size and sha256) without parsing it."""
    import pyarrow.fs

    for f in shards.files_of(split):
        where = shards.location_of(f)
        try:
            found = storage.info(where)
            if found.type == pyarrow.fs.FileType.NotFound:
                raise ShardError(f"{where}: shard listed in the manifest is missing")
            size = found.size
            if size != f.bytes or storage.sha256(where) != f.sha256:
                raise ShardError(f"{where}: checksum does not match the manifest (corrupt or modified shard; "
                                 f"{size} bytes, manifest says {f.bytes})")
        except FileNotFoundError:
            raise ShardError(f"{where}: shard listed in the manifest is missing") from None
        except OSError as e:
            raise ShardError(f"{where}: cannot read shard: {e}") from None


def read_shard(shards: ShardSet, file: ShardFile, columns: list[str] | None = None) -> pa.Table:
    """One shard as a Table, verified first: present, of the recorded size and sha256, and with
    valid Parquet page checksums. Every failure is a ShardError naming the file."""
    where = shards.location_of(file)
    try:
        data = storage.read_bytes(where)
    except FileNotFoundError:
        raise ShardError(f"{where}: shard listed in the manifest is missing") from None
    except OSError as e:
        raise ShardError(f"{where}: cannot read shard: {e}") from None
    if len(data) != file.bytes or hashlib.sha256(data).hexdigest() != file.sha256:
        raise ShardError(f"{where}: checksum does not match the manifest (corrupt or modified shard; "
                         f"{len(data)} bytes, manifest says {file.bytes})")
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{where}: cannot read shard: {e}") from None


def read_manifest(path: Path | str | Location) -> dict[str, Any]:
    """The manifest of a shard set (its folder, local or a URI, or locally one of its shard files)."""
    root = _set_location(path)
    return _parse_manifest(_manifest_bytes(root, path), root.child(MANIFEST))


def _manifest_bytes(root: Location, given: Any) -> bytes:
    where = root.child(MANIFEST)
    try:
        return storage.read_bytes(where)
    except FileNotFoundError:
        unfinished = not root.local and storage.exists(root.child(storage.WRITING))
        why = "a write to it is unfinished or still running" if unfinished else f"is {given} a segpipe shard set?"
        raise ShardError(f"{where}: manifest not found ({why})") from None
    except OSError as e:
        raise ShardError(f"{where}: cannot read the manifest: {e}") from None


def _parse_manifest(data: bytes, where: Location) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{where}: manifest is not valid JSON: {e}") from None
    check_manifest(manifest, where)
    return manifest


def check_manifest(manifest: Any, where: Path | str | Location) -> None:
    """Raise ShardError naming the key when ``manifest`` lacks what readers rely on, or lists a
    shard outside its folder (a manifest is data: it must not make a reader open other files)."""
    if not isinstance(manifest, dict):
        raise ShardError(f"{where}: expected a JSON object (see docs/shards.md)")
    for key, kind in (("classes", list), ("ignore_index", int), ("splits", dict), ("shards", list)):
        if not isinstance(manifest.get(key), kind):
            raise ShardError(f"{where}: key {key!r} missing or not a {kind.__name__} (see docs/shards.md)")
    for i, c in enumerate(manifest["classes"]):
        if not (isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)):
            raise ShardError(f"{where}: classes[{i}] needs an integer 'id' and a string 'name'")
    for i, entry in enumerate(manifest["shards"]):
        if not (isinstance(entry, dict) and all(k in entry for k in ("path", "split", "rows", "bytes", "sha256"))):
            raise ShardError(f"{where}: shards[{i}] needs path, split, rows, bytes and sha256")
        if not isinstance(entry["path"], str) or (reason := escape_reason(entry["path"])) is not None:
            raise ShardError(f"{where}: shards[{i}]: path {entry['path']!r} {reason or 'is not a string'}; "
                             "a path inside the shard folder is expected")


def manifest_hash(path: Path | str | Location) -> str:
    """sha256 of ``manifest.json``: identifies the exact shard set a model was trained on."""
    root = _set_location(path)
    return hashlib.sha256(_manifest_bytes(root, path)).hexdigest()


def shard_files(path: Path | str, split: str | None = None) -> list[Path]:
    """The shard files of a local set (of one split, or all), in manifest order."""
    root = _root(storage.require_local(path, "shard_files"))
    manifest = read_manifest(root)
    if split is not None and split not in manifest["splits"]:
        raise ShardError(f"{root}: no split {split!r}; splits: {', '.join(manifest['splits']) or '(none)'}")
    return [root / s["path"] for s in manifest["shards"] if split is None or s["split"] == split]


def verify_shard(path: Path, manifest: dict[str, Any], root: Path) -> None:
    """Check a shard's sha256 (and size) against the manifest; raise ShardError naming it."""
    rel = Path(path).resolve().relative_to(root.resolve()).as_posix()
    entry = next((s for s in manifest["shards"] if s["path"] == rel), None)
    if entry is None:
        raise ShardError(f"{path}: not listed in {root / MANIFEST}")
    if not path.is_file():
        raise ShardError(f"{path}: shard listed in the manifest is missing")
    size = path.stat().st_size
    if size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        raise ShardError(f"{path}: checksum does not match the manifest (corrupt or modified shard)")


def iter_rows(path: Path | str | Location | ShardSet, verify: bool = True, split: str | None = None,
              columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Raw rows (column dicts) of a shard set (a ShardSet, its folder or its URI) or of one local
    shard file.

    ``verify`` checks each shard's size and sha256 against the manifest before reading it (see
    :func:`read_shard`); Parquet page checksums are verified regardless.
    """
    if not isinstance(path, ShardSet):
        where = storage.resolve(path, "shards")
        if where.local and where.local_path().is_file():
            yield from _file_rows(where.local_path(), verify, split, columns)
            return
    shards = path if isinstance(path, ShardSet) else open_shards(where)
    files = shards.files_of(split) if split is not None else list(shards.files)
    for f in files:
        if verify:
            table = read_shard(shards, f, columns)
        else:
            where = shards.location_of(f)
            try:
                table = pq.read_table(where.path, filesystem=where.fs, columns=columns,
                                      page_checksum_verification=True)
            except FileNotFoundError:
                raise ShardError(f"{where}: shard listed in the manifest is missing") from None
            except (OSError, pa.ArrowException) as e:
                raise ShardError(f"{where}: cannot read shard: {e}") from None
        yield from table.to_pylist()


def _file_rows(path: Path, verify: bool, split: str | None, columns: list[str] | None) -> Iterator[dict[str, Any]]:
    """Rows of one shard file, one row group in memory at a time."""
    root = _root(path)
    if verify:
        verify_shard(path, read_manifest(root), root)
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        for g in range(pf.num_row_groups):
            for row in pf.read_row_group(g, columns=columns).to_pylist():
                if split is None or row.get("split", split) == split:
                    yield row
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{path}: cannot read shard: {e}") from None


def iter_samples(path: Path | str | Location | ShardSet, verify: bool = True,
                 split: str | None = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of a shard file or directory (see the module docstring).

    ``verify`` checks each shard's sha256 against the manifest before reading it; Parquet
    page checksums are verified regardless.
    """
    for row in iter_rows(path, verify=verify, split=split):
        yield decode_row(row)


def _root(path: Path) -> Path:
    """The shard-set directory of a directory or shard file (``ROOT/<split>/part-N.parquet``)."""
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent.parent
    raise ShardError(f"{path}: no such shard file or directory")


def _set_location(path: Path | str | Location) -> Location:
    """The folder of the shard set ``path`` names: its folder (local or a URI), its local
    ``manifest.json``, or one of its local shard files."""
    where = storage.resolve(path, "shards")
    if not where.local:
        return where
    local = where.local_path()
    if local.is_file():
        return storage.resolve(local.parent if local.name == MANIFEST else _root(local), "shards")
    return where


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically, with stable key order and no timestamps (into a set's
    ``Staging.path``: on an object store it is uploaded last, see :func:`new_set`)."""
    with atomic_path(Path(out) / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")


def table_rows(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows -> a Table in the shard schema (for tests and tools that build rows by hand)."""
    return pa.Table.from_batches([record_batch(list(rows))])
