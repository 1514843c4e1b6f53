"""Where data lives: local paths and object-store URIs, through one resolver over pyarrow's filesystems.

Every argument and param that names data (``--out``, ``--shards``, ``--input``,
``train.storage_path``) goes through :func:`resolve`, which accepts a local path or a
``file://`` URI, ``s3://bucket/prefix`` (AWS S3 or any S3-compatible server) and
``gs://bucket/prefix`` (Google Cloud Storage). Configuration is the ecosystem's own, read by
pyarrow's AWS and Google clients; segpipe has no setting of its own:

- S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
  ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` (an S3-compatible server), ``AWS_PROFILE`` with
  ``~/.aws/config`` and ``~/.aws/credentials``, or the instance's role;
- GCS: ``GOOGLE_APPLICATION_CREDENTIALS`` or the metadata server.

Object stores have no rename. A folder written there (:func:`output_dir`) is committed by
writing one file last (a shard set's ``manifest.json``); until then a reader finds no such file
and uses nothing. Local folders are still replaced whole by rename (``segpipe.files.atomic_dir``).

A URI is never turned into a local path: ``Path("s3://b/k")`` is ``s3:/b/k``, and writing there
would create a local folder named ``s3:``. Such a value is refused wherever it appears
(``segpipe.files.check_local``), and :func:`require_local` refuses any URI where only a local
path works, naming the argument.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from segpipe.errors import UserError
from segpipe.files import LocalPathError, atomic_dir, atomic_write_bytes, check_local, sha256_file, uri_scheme

OBJECT_STORES = ("s3", "gs")
VALID = "s3://, gs://, file:// or a local path"
# Environment variables that configure pyarrow's object-store clients: a filesystem made under
# one configuration is never reused under another.
_CONFIG_PREFIXES = ("AWS_", "GOOGLE_", "GCE_", "STORAGE_EMULATOR_HOST")
CHUNK = 8 << 20
WRITING = ".segpipe-writing"  # marks an object-store folder that output_dir is writing or left unfinished


class StorageError(UserError, ValueError):
    """A path or URI that cannot be used, naming the argument or param it came from."""


@dataclass(frozen=True)
class Location:
    """A file or folder on a filesystem: an absolute local path, or an object-store URI.

    ``uri`` is what is shown and passed on (``s3://bucket/key`` or ``/abs/path``); ``fs`` and
    ``path`` are pyarrow's filesystem and the path on it (``bucket/key`` for object stores).
    """

    uri: str
    path: str
    fs: Any = field(compare=False, repr=False)

    @property
    def local(self) -> bool:
        return uri_scheme(self.uri) is None

    def child(self, *parts: str) -> Location:
        rel = "/".join(p.strip("/") for p in parts if p.strip("/"))
        if not rel:
            return self
        if self.local:
            return Location(str(Path(self.uri, rel)), str(Path(self.path, rel)), self.fs)
        return Location(f"{self.uri.rstrip('/')}/{rel}", f"{self.path.rstrip('/')}/{rel}", self.fs)

    @property
    def parent(self) -> Location:
        if self.local:
            return Location(str(Path(self.uri).parent), str(Path(self.path).parent), self.fs)
        if "/" not in self.path.strip("/"):
            return self  # a bucket is its own parent
        return Location(self.uri.rstrip("/").rsplit("/", 1)[0], self.path.rstrip("/").rsplit("/", 1)[0], self.fs)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def local_path(self) -> Path:
        if not self.local:
            raise StorageError(f"{self.uri}: a local path is needed here")
        return Path(self.path)

    def __str__(self) -> str:
        return self.uri


# --------------------------------------------------------------------------------------
# Resolving
# --------------------------------------------------------------------------------------


def resolve(value: str | os.PathLike[str] | Location, arg: str) -> Location:
    """The Location ``value`` names; StorageError naming ``arg`` when it cannot be used.

    A local path becomes absolute; ``file://`` URIs are local paths too. An unknown scheme, a
    URI without a bucket, with options in a query string (configure the store with its own
    environment variables instead), or a URI that lost a slash by going through ``Path`` is an error.
    """
    if isinstance(value, Location):
        return value
    parsed = _parse(value, arg)
    if isinstance(parsed, Path):
        return _local(parsed)
    scheme, bucket, key = parsed
    try:
        fs = _filesystem(scheme, bucket, _config())
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise StorageError(f"{arg}: {scheme}://{bucket}: cannot open the {scheme}:// filesystem: {e}") from None
    path = f"{bucket}/{key}" if key else bucket
    return Location(f"{scheme}://{path}", path, fs)


def require_local(value: str | os.PathLike[str], arg: str) -> Path:
    """``value`` as an absolute local path; StorageError naming ``arg`` for an object-store URI
    (or a bad one). Nothing is contacted."""
    parsed = _parse(value, arg)
    if not isinstance(parsed, Path):
        scheme, bucket, key = parsed
        raise StorageError(f"{arg}: {scheme}://{bucket}/{key} is an object-store URI; only a local path "
                           "(or file://) works here")
    return Path(_local(parsed).path)


def _parse(value: str | os.PathLike[str], arg: str) -> Path | tuple[str, str, str]:
    """A local path, or (scheme, bucket, key) of an object-store URI; checked, nothing contacted."""
    text = os.fspath(value)
    if not text:
        raise StorageError(f"{arg}: an empty path; expected {VALID}")
    scheme = uri_scheme(text)
    if scheme is None:
        return _checked_local(text, arg)
    name = scheme.lower()
    if name not in (*OBJECT_STORES, "file"):
        raise StorageError(f"{arg}: unsupported scheme {scheme!r} in {text!r}; valid: {VALID}")
    if not text.startswith(f"{scheme}://"):
        raise StorageError(f"{arg}: {text!r} is not a URI (a '/' is missing after '{scheme}:', as when a URI "
                           f"goes through a local path); write {name}://...")
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise StorageError(f"{arg}: {text!r}: options in a URI are not read; configure the store with its own "
                           "environment variables or profile (AWS_*, GOOGLE_APPLICATION_CREDENTIALS)")
    if name == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"{arg}: {text!r}: a file:// URI names a path on this machine, not on host "
                               f"{parts.netloc!r}")
        return _checked_local(unquote(parts.path), arg)
    if not parts.netloc:
        raise StorageError(f"{arg}: {text!r} names no bucket; expected {name}://BUCKET/PREFIX")
    return name, parts.netloc, parts.path.strip("/")


def _checked_local(text: str, arg: str) -> Path:
    try:
        return check_local(text)
    except LocalPathError as e:
        raise StorageError(f"{arg}: {e}") from None


def _local(path: Path) -> Location:
    import pyarrow.fs

    absolute = str(path.expanduser().absolute())
    return Location(absolute, absolute, pyarrow.fs.LocalFileSystem())


def _config() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_CONFIG_PREFIXES)))


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, bucket: str, config: tuple[tuple[str, str], ...]) -> Any:
    """pyarrow's filesystem for a bucket (S3 resolves the bucket's region once, here)."""
    import pyarrow.fs

    if not _release_at_exit:  # after pyarrow.fs registered its own handler: ours runs first
        atexit.register(_release_filesystems)
        _release_at_exit.append(True)
    return pyarrow.fs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


_release_at_exit: list[bool] = []


def _release_filesystems() -> None:
    """At exit, the cached filesystems dropped before pyarrow finalises S3 (``atexit`` runs the
    last registered handler first). An S3 filesystem still alive after the finalisation aborts the
    interpreter as it tears down ("terminate called without an active exception", exit 134) after
    the command had succeeded: seen in 3 of 40 runs of ``segpipe stats s3://...`` on a loaded
    host, none of 60 with this handler."""
    _filesystem.cache_clear()
    gc.collect()  # what still holds one in a reference cycle (a dataset, a traceback)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def info(location: Location) -> Any:
    """pyarrow's FileInfo (``type``, ``size``); ``type`` is NotFound when nothing is there."""
    return location.fs.get_file_info(location.path)


def exists(location: Location) -> bool:
    """A file, or a folder with something in it (object stores have no empty folders)."""
    import pyarrow.fs

    return info(location).type != pyarrow.fs.FileType.NotFound


def read_bytes(location: Location) -> bytes:
    """The whole file; FileNotFoundError when it is not there."""
    if location.local:
        return location.local_path().read_bytes()
    with location.fs.open_input_stream(location.path) as f:
        return f.read()


def sha256(location: Location) -> str:
    """sha256 of a file, read in chunks."""
    if location.local:
        return sha256_file(location.local_path())
    h = hashlib.sha256()
    with location.fs.open_input_stream(location.path) as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def write_bytes(location: Location, data: bytes) -> None:
    """Write a whole file: locally by temporary file and rename, on an object store by one upload
    (an object appears complete or not at all)."""
    if location.local:
        atomic_write_bytes(location.local_path(), data)
        return
    with location.fs.open_output_stream(location.path) as f:
        f.write(data)


def upload(source: Path, location: Location) -> None:
    """Copy the local file ``source`` to ``location`` (atomically, as :func:`write_bytes`)."""
    if location.local:
        from segpipe.files import atomic_path

        with atomic_path(location.local_path()) as tmp:
            shutil.copyfile(source, tmp)
        return
    with open(source, "rb") as src, location.fs.open_output_stream(location.path) as dst:
        while block := src.read(CHUNK):
            dst.write(block)


def list_files(location: Location) -> list[str]:
    """Paths (relative, ``/``-separated, sorted) of every file under the folder ``location``;
    empty when there is none."""
    import pyarrow.fs

    selector = pyarrow.fs.FileSelector(location.path, allow_not_found=True, recursive=True)
    base = location.path.rstrip("/") + "/"
    return sorted(i.path[len(base):] for i in location.fs.get_file_info(selector)
                  if i.type == pyarrow.fs.FileType.File and i.path.startswith(base))


def delete(location: Location) -> None:
    """Delete a file or a folder and everything in it; nothing happens when nothing is there.
    A whole bucket is never deleted."""
    import pyarrow.fs

    kind = info(location).type
    if kind == pyarrow.fs.FileType.NotFound:
        return
    if kind == pyarrow.fs.FileType.File:
        location.fs.delete_file(location.path)
        return
    if location.local:
        shutil.rmtree(location.path, ignore_errors=True)
        return
    _not_a_bucket(location, "delete")
    location.fs.delete_dir(location.path)


def _not_a_bucket(location: Location, what: str) -> None:
    if not location.local and "/" not in location.path.strip("/"):
        raise StorageError(f"{location.uri}: will not {what} a whole bucket; name a folder inside it")


# --------------------------------------------------------------------------------------
# Writing a folder
# --------------------------------------------------------------------------------------


@dataclass
class Staging:
    """The local folder in which an output folder is written (see :func:`output_dir`)."""

    path: Path
    dest: Location
    commit: str
    sent: set[str] = field(default_factory=set)

    def send(self, file: Path) -> None:
        """Upload a finished file of the folder now and drop its local copy, so that a large
        output never needs its whole size on local disk. A no-op for a local destination."""
        if self.dest.local:
            return
        rel = Path(file).relative_to(self.path).as_posix()
        if rel == self.commit:
            raise ValueError(f"{rel} is the commit file: it is uploaded last, by output_dir")
        upload(Path(file), self.dest.child(rel))
        Path(file).unlink()
        self.sent.add(rel)


@contextlib.contextmanager
def output_dir(dest: Location, commit: str) -> Iterator[Staging]:
    """Write a folder that replaces ``dest`` whole, or not at all; the body writes its files under
    ``Staging.path`` and must write the file named ``commit``.

    Local: a temporary folder beside ``dest``, renamed into place on success (``atomic_dir``).
    Object store (no rename): the old ``commit`` file is deleted first, so no reader takes the
    folder for a complete one while it is rewritten; every other file is uploaded (early, through
    ``Staging.send``, or at the end), files of the old content that the new one lacks are deleted,
    and ``commit`` is uploaded last. A folder that holds files but neither ``commit`` nor the
    marker of an unfinished write is not replaced (it is not an output of this kind).
    """
    if dest.local:
        with atomic_dir(dest.local_path()) as tmp:
            yield Staging(tmp, dest, commit)
        return
    _not_a_bucket(dest, "write into")
    marker = dest.child(WRITING)
    present = list_files(dest)
    if present and commit not in present and WRITING not in present:
        raise StorageError(f"{dest.uri} holds {len(present)} file(s) but no {commit}: not an output of this kind, "
                           "so it is not replaced; name an empty or new folder")
    write_bytes(marker, f"written by pid {os.getpid()} on {socket.gethostname()}\n".encode())
    delete(dest.child(commit))
    with tempfile.TemporaryDirectory(prefix="segpipe-upload-") as tmp:
        staging = Staging(Path(tmp), dest, commit)
        try:
            yield staging
            if not (staging.path / commit).is_file():
                raise ValueError(f"{dest.uri}: the folder was written without its {commit}")
            for f in sorted(p for p in staging.path.rglob("*") if p.is_file()):
                if f.relative_to(staging.path).as_posix() != commit:
                    staging.send(f)
            for rel in list_files(dest):
                if rel not in staging.sent and rel not in (commit, WRITING):
                    delete(dest.child(rel))
            upload(staging.path / commit, dest.child(commit))
            delete(marker)
        except BaseException:
            # Uncommitted: readers see no commit file. The marker stays, so the next write may replace it.
            for rel in staging.sent:
                with contextlib.suppress(OSError):
                    delete(dest.child(rel))
            raise
