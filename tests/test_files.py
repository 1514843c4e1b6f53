"""Atomic writes: temporaries of killed writers are cleaned, a full disk names the output, and
paths that come from data stay inside their root."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segpipe.files import (
    PathEscapeError,
    atomic_dir,
    atomic_write_bytes,
    confined,
    escape_reason,
    remove_stale_temporaries,
)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_stale_temporary_folders_of_dead_writers_are_cleaned_on_the_next_write(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("first")
    # What a killed writer leaves: its temporary folder, named after its (now dead) pid.
    host = _host_of_our_temporaries(tmp_path)
    stale = tmp_path / f".out.{dead_pid()}@{host}.k1ll3d.tmp"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "part-00000.parquet").write_bytes(b"half")
    live = tmp_path / f".out.{os.getpid()}@{host}.w0rk1n.tmp"  # a writer still running: kept
    live.mkdir()
    other_host = tmp_path / f".out.{dead_pid()}@elsewhere.n0tm1n.tmp"  # shared folder: not ours to judge
    other_host.mkdir()
    other_output = tmp_path / f".outer.{dead_pid()}@{host}.0th3r.tmp"  # another output's: untouched here
    other_output.mkdir()

    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("second")

    assert (tmp_path / "out" / "a").read_text() == "second"
    assert not stale.exists()
    assert temporaries(tmp_path) == sorted([live.name, other_host.name, other_output.name])


def _host_of_our_temporaries(folder: Path) -> str:
    """The host part of the temporaries this process makes (as atomic_dir names them)."""
    seen: list[str] = []
    try:
        with atomic_dir(folder / "probe") as tmp:
            seen.append(tmp.name)
            raise RuntimeError("abort on purpose: only the name is wanted")
    except RuntimeError:
        pass
    assert not (folder / "probe").exists() and not temporaries(folder)
    name = seen[0]  # .probe.<pid>@<host>.<random>.tmp
    assert name.startswith(f".probe.{os.getpid()}@")
    return name[len(f".probe.{os.getpid()}@"):].split(".")[0]


def test_remove_stale_temporaries_of_files(tmp_path):
    host = _host_of_our_temporaries(tmp_path)
    stale = tmp_path / f".index.json.{dead_pid()}@{host}.abcdefgh.tmp"
    stale.write_text("{")
    assert remove_stale_temporaries(tmp_path / "index.json") == [stale]
    assert not stale.exists()


def test_a_full_disk_names_the_output_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(tmp_path / "labels" / "site.png", b"png")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "labels" / "site.png")
    assert list((tmp_path / "labels").iterdir()) == []
    with pytest.raises(OSError) as e:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_bytes(b"data")
    assert e.value.filename == str(tmp_path / "out") and sorted(p.name for p in tmp_path.iterdir()) == ["labels"]


@pytest.mark.parametrize("name", ["a.jpg", "train/a.jpg", "./a.jpg", "train/../a.jpg", "a..b.jpg", "..a.jpg"])
def test_paths_inside_their_root_are_accepted(tmp_path, name):
    assert escape_reason(name) is None
    assert confined(tmp_path, name) == tmp_path / name


@pytest.mark.parametrize("name,why", [
    ("../secret/photo.jpg", "climbs out"), ("../../secret/photo.jpg", "climbs out"),
    ("train/../../x.jpg", "climbs out"), ("/etc/passwd", "absolute"), ("", "empty"), ("a\0.jpg", "NUL"),
])
def test_paths_leaving_their_root_are_refused_naming_them(tmp_path, name, why):
    assert why in escape_reason(name)
    with pytest.raises(PathEscapeError, match=why) as e:
        confined(tmp_path, name)
    assert repr(name) in str(e.value) and str(tmp_path) in str(e.value)
