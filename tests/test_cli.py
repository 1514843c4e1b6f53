"""The CLI edge: a user-caused error ends the command with one line on stderr that names the file,
key or argument at fault, and a non-zero exit status; never a traceback."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from segpipe.cli import main


def fails(capsys, argv: list[str], code: int = 1) -> str:
    """Run ``segpipe ARGV`` in-process; assert the exit status and return its one stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    # the pointer to the command's log is printed when a library writes something (here: also a
    # message a Ray left running by an earlier test of this process forwards late); not an error line
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(LOG_POINTER)]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"segpipe {argv[0]}: ")
    return lines[0]


LOG_POINTER = "(messages of Ray and other libraries: "


def test_params_section_that_is_not_a_mapping(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("convert:\n  workers: 1\ntrain: 5\n")
    line = fails(capsys, ["params", "--params", str(params)], code=2)
    assert f"{params}: section 'train' is 5; it must be a mapping of keys" in line


def test_stats_on_missing_or_corrupt_shards(tiny_shards, tmp_path, capsys):
    import shutil

    line = fails(capsys, ["stats", str(tmp_path / "nowhere")])
    assert f"{tmp_path / 'nowhere'}" in line and "manifest not found" in line

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    part = sorted(shards.rglob("*.parquet"))[0]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    line = fails(capsys, ["stats", str(shards)])
    assert f"{part}: checksum does not match the manifest" in line
    part.write_bytes(bytes(data[: len(data) // 2]))  # truncated: no footer
    line = fails(capsys, ["stats", str(shards), "--no-verify"])
    assert f"{part}: cannot read shard" in line
    part.unlink()
    line = fails(capsys, ["stats", str(shards)])
    assert f"{part}: shard listed in the manifest is missing" in line


def test_stats_in_a_subprocess_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "segpipe", "stats", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"segpipe stats: error: {tmp_path / 'nowhere' / 'manifest.json'}: manifest not found "
        f"(is {tmp_path / 'nowhere'} a segpipe shard set?)"]


def test_convert_on_a_full_disk_names_the_output_and_leaves_nothing(tiny_raw, tmp_path, capsys, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    out = tmp_path / "shards"
    line = fails(capsys, ["convert", "--format", "coco", "--input", str(tiny_raw), "--out", str(out),
                          "--no-progress", "--set", "convert.workers=1"])
    assert line == (f"segpipe convert: error: {out}: No space left on device "
                    "(the disk is full: free space there and rerun)")
    assert os.listdir(tmp_path) == []  # no shard set, no temporary folder


def test_predict_with_a_model_path_that_is_no_model(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "site.png").write_bytes(b"")
    line = fails(capsys, ["predict", "--model", "../../etc", "--input", "site.png", "--out", "out"])
    assert "model '../../etc' (--model) is neither an alias" in line


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    from segpipe.commands import params as params_check

    def bug(argv):
        raise TypeError("a bug, not the user's fault")

    monkeypatch.setattr(params_check, "main", bug)
    with pytest.raises(TypeError, match="a bug"):
        main(["params"])


def test_every_error_class_is_a_user_error_or_says_why_not():
    """One base class (segpipe.errors.UserError) marks the errors that are the user's to fix: the CLI
    prints those as one line. Every exception class defined in the package derives from it, except
    the few listed here with the reason they are not the user's to fix."""
    import ast
    import importlib
    from pathlib import Path

    from segpipe.errors import UserError

    not_user = {
        "CommandTimeout": "a tool ran past its time limit: the flow reports it as a failed task",
    }
    root = Path(__file__).resolve().parents[1]
    found = {}
    for path in [*sorted((root / "segpipe").rglob("*.py")), *sorted((root / "pipelines").glob("*.py"))]:
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                cls = getattr(importlib.import_module(module), node.name, None)
                if isinstance(cls, type) and issubclass(cls, BaseException):
                    found[node.name] = cls
    assert "ShardError" in found and "PromoteError" in found  # the scan sees the package
    wrong = sorted(n for n, cls in found.items() if not issubclass(cls, UserError) and n not in not_user)
    assert not wrong, f"exception classes that are not UserError: {wrong}"
