"""How segpipe's processes end: a `segpipe train` whose parent is killed (a killed `dvc repro`)
stops with the Ray it started, and `segpipe with-ray` stops its Ray whatever way the command ends."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from segpipe.lifetime import terminate_as_interrupt
from segpipe.progress import EVERY_ENV


def test_sigterm_becomes_keyboard_interrupt_so_finally_blocks_run():
    old = signal.getsignal(signal.SIGTERM)
    try:
        terminate_as_interrupt()
        ran = []
        with pytest.raises(KeyboardInterrupt):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                ran.append(True)
        assert ran == [True]
    finally:
        signal.signal(signal.SIGTERM, old)


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """The pids still alive (zombies count as gone) after waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = set()
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.add(pid)
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


PARAMS = textwrap.dedent("""\
    train:
      architectures: [fcn32s]
      epochs: 500
      budget_s: 0
      batch_size: 2
      image_size: 64
      overrides: {}
    """)


@pytest.mark.slow
def test_train_dies_with_its_parent_and_stops_the_ray_it_started(tiny_shards, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    log = tmp_path / "train.log"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, EVERY_ENV: "1"}
    # The parent stands for `dvc repro`: a shell that runs the stage and would go on afterwards.
    script = (f"{sys.executable} -m segpipe train --arch fcn32s --shards {tiny_shards} --out {tmp_path / 'out'} "
              f"--params {params} > {log} 2>&1; echo finished")
    parent = subprocess.Popen(["sh", "-c", script], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"train fcn32s: step [1-9]\d*\S*, .*epoch \d+", log.read_text() if log.exists() else ""):  # training
            assert parent.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        (train,) = psutil.Process(parent.pid).children()
        tree = {train.pid, *(c.pid for c in train.children(recursive=True))}
        names = " ".join(psutil.Process(p).name() for p in tree if psutil.pid_exists(p))
        assert "raylet" in names and "gcs_server" in names, names
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert not wait_gone(tree, 90), "segpipe train or its Ray outlived the killed parent"
        assert not (tmp_path / "out").exists()  # nothing written that DVC would not know about
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.slow
def test_with_ray_returns_the_command_status_and_stops_its_ray_on_exit_and_on_sigterm(tmp_path):
    show = "import os, sys, time; print(os.environ['RAY_ADDRESS'], flush=True); sys.exit(int(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-m", "segpipe", "with-ray", sys.executable, "-c", show, "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-3000:]
    port = int(done.stdout.strip().rsplit(":", 1)[1])
    assert not port_open(port)

    wait = "import os, time; print(os.environ['RAY_ADDRESS'], flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-m", "segpipe", "with-ray", sys.executable, "-c", wait],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().strip().rsplit(":", 1)[1])
        assert port_open(port)
        tree = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        proc.send_signal(signal.SIGTERM)  # what a scheduler sends to stop a job
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        assert not port_open(port)
        assert not wait_gone(tree, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
