"""Atomic writes, checksums and path confinement.

Every file segpipe writes goes to a temporary name first and is renamed into place, so a killed
run never leaves a half-written file under the final name. Temporary names carry the writer's
pid and host (``.NAME.<pid>@<host>.<random>.tmp``): the next write to the same output removes
the leftovers of writers on this host that are no longer alive. An OSError without a file name
(a full disk reports none) is re-raised naming the output it was writing.

``confined(root, name)`` is the one rule for a path that comes from data (an annotation's
``file_name``, a registry entry's ``path``): relative, and never climbing out of its root.
``check_local(path)`` is the one rule for a local path that came from a URI: ``Path("s3://b/k")``
is ``s3:/b/k``, and nothing is ever written under a folder named like a URI scheme.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from segpipe.errors import UserError


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed to ``path``."""
    path = check_local(path)
    with _naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; finished files get the usual mode
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path | str, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole.

    Temporaries that killed writers of ``path`` left behind are removed first.
    """
    path = check_local(path)
    with _naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
        tmp.chmod(0o777 & ~_umask())
        try:
            yield tmp
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old.tmp", dir=path.parent))
                os.replace(path, old)  # an empty directory is replaced by rename
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# --------------------------------------------------------------------------------------
# Temporaries of dead writers, and naming the file at fault
# --------------------------------------------------------------------------------------


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}@{_host()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path: Path | str) -> list[Path]:
    """Remove the temporaries (``.NAME.<pid>@<host>.*.tmp``) that killed writers of ``path`` left.

    Only those of this host whose pid is no longer alive are removed: a writer on another host
    sharing the folder, or one still running here, is never disturbed. Returns what was removed.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)@{re.escape(_host())}\..+\.tmp$")
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or _alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Re-raise an OSError that names no file (ENOSPC, EIO from a write) naming ``path``."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the file, what went wrong, and for a full disk what to do."""
    where = f"{e.filename}: " if e.filename is not None else ""
    what = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        what += " (the disk is full: free space there and rerun)"
    return f"{where}{what}"


# --------------------------------------------------------------------------------------
# Paths that come from data
# --------------------------------------------------------------------------------------


class PathEscapeError(UserError, ValueError):
    """A path taken from data is absolute or climbs out of the folder it must stay in."""


def escape_reason(name: str) -> str | None:
    """Why the path ``name`` (read from a data file) would leave the folder it is relative to;
    None when it stays inside. Decided on the text alone, so a symlinked dataset (DVC's
    symlink cache) still works: absolute paths, ``..`` that climbs above the folder, NUL bytes
    and empty names are refused."""
    if not isinstance(name, str) or not name:
        return "is empty or not a string"
    if "\0" in name:
        return "contains a NUL byte"
    if os.path.isabs(name):
        return "is an absolute path"
    depth = 0
    for part in name.replace("\\", "/").split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return "climbs out of its folder with '..'"
        elif part not in ("", "."):
            depth += 1
    return None


def confined(root: Path | str, name: str) -> Path:
    """``root / name`` when ``name`` is a relative path that stays inside ``root``; otherwise
    PathEscapeError naming the path and ``root``."""
    reason = escape_reason(name)
    if reason is not None:
        raise PathEscapeError(f"{name!r} {reason}; a path relative to {root} and inside it is expected")
    return Path(root) / name


# --------------------------------------------------------------------------------------
# Local paths that were URIs
# --------------------------------------------------------------------------------------

# A scheme of two or more characters (one letter is a Windows drive), then ':' and a '/' or nothing.
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(?:/|$)")


class LocalPathError(UserError, ValueError):
    """A URI, or a URI turned into a local path, where a local path is needed."""


def uri_scheme(text: str) -> str | None:
    """The scheme of the URI ``text`` (``s3`` of ``s3://b/k``), also of one that went through
    ``Path`` (``s3:/b/k``); None for a local path."""
    m = _URI.match(text)
    return m.group(1) if m else None


def check_local(path: Path | str) -> Path:
    """``path`` as a Path, unless a part of it is named like a URI scheme (``s3:``, ``gs:``,
    ``file:``): what ``Path("s3://bucket/key")`` becomes. LocalPathError then, so that no local
    folder named after a scheme is ever created."""
    path = Path(path)
    for part in path.parts:
        if _URI.match(part) and part.endswith(":"):
            raise LocalPathError(f"{path}: a URI turned into a local path (folder {part!r}); this takes a local "
                                 "path, or a URI where the command accepts one (s3://..., gs://..., file://...)")
    return path
