"""The subprocess runner: output, failures with their output, and timeouts that stop the
whole process group (a stage's grandchildren included)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pipelines import commands


def test_run_returns_output_and_raises_with_the_tail(tmp_path):
    done = commands.run(["sh", "-c", "echo out; echo err >&2"], cwd=tmp_path, echo=False)
    assert done.returncode == 0 and sorted(done.output.split()) == ["err", "out"]
    with pytest.raises(commands.CommandError, match=r"exited with status 3:\nboom"):
        commands.run(["sh", "-c", "echo boom; exit 3"], cwd=tmp_path, echo=False)
    assert commands.run(["sh", "-c", "exit 4"], cwd=tmp_path, check=False, echo=False).returncode == 4


def test_timeout_stops_the_process_group(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "GRACE_S", 2.0)
    pid_file = tmp_path / "grandchild.pid"
    # The shell starts a background grandchild, like dvc -> sh -> segpipe train.
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    start = time.monotonic()
    with pytest.raises(commands.CommandTimeout, match="ran past its limit of 0.5 s"):
        commands.run(["sh", "-c", script], cwd=tmp_path, timeout_s=0.5, echo=False)
    assert time.monotonic() - start < 10
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # gone, or a zombie waiting for init to reap it
        stat = Path(f"/proc/{grandchild}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {grandchild} survived the timeout")


def test_tool_env_puts_this_python_first(monkeypatch):
    import sys

    monkeypatch.setenv("PATH", "/usr/bin")
    env = commands.tool_env({"X": "1"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent) and env["X"] == "1"
