"""A real two-node Ray cluster on loopback: `ray start` a head and a worker node, train with two
workers through RAY_ADDRESS, check that the workers ran on both nodes, and stop only those nodes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from segpipe.checkpoint import load_meta

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def our_processes(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker``, plus all their descendants (Ray's agents
    rename themselves, e.g. ``ray::DashboardAgent``, so only the tree finds them)."""
    import psutil

    pids: set[int] = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                pids.add(proc.pid)
                pids.update(c.pid for c in proc.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    pids.discard(os.getpid())
    return sorted(pids)


def stop(*markers: str) -> None:
    """Terminate only the processes of the cluster this test started (never `ray stop`)."""
    import psutil

    pids = sorted({p for m in markers for p in our_processes(m)})
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=15)
    for proc in alive:
        proc.kill()


@pytest.fixture
def two_node_cluster(tmp_path_factory):
    port = free_port()
    temp = Path(f"/tmp/sp{port}")  # short: Ray's socket paths must stay under ~107 characters
    base = [RAY, "start", "--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    # Token authentication stays on; the worker node must be told to use it too.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([*base, "--head", "--port", str(port), "--temp-dir", str(temp),
                        "--include-dashboard", "false", "--resources", '{"node_a": 1}'],
                       check=True, env=env, capture_output=True, timeout=180)
        subprocess.run([*base, "--address", address, "--resources", '{"node_b": 1}'],
                       check=True, env=env, capture_output=True, timeout=180)
        yield address
    finally:
        stop(str(temp), f"127.0.0.1:{port}")
        assert not our_processes(str(temp))


@pytest.mark.slow
def test_training_spreads_over_two_nodes(two_node_cluster, tiny_shards, tmp_path):
    # The driver runs as its own process, as `dvc repro` would run it, with only RAY_ADDRESS set.
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env["RAY_ADDRESS"] = two_node_cluster
    cmd = [sys.executable, "-m", "segpipe", "train", "--arch", "fcn32s", "--shards", str(tiny_shards),
           "--out", str(tmp_path / "out"), "--params", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text(
        "train:\n  epochs: 1\n  batch_size: 4\n  image_size: 48\n  workers: 2\n  cpus_per_worker: 1.0\n"
        "  threads: 1\n  placement_strategy: STRICT_SPREAD\n  num_to_keep: 1\n"
        f"  storage_path: {tmp_path / 'storage'}\n")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    meta = load_meta(tmp_path / "out" / "checkpoint")
    nodes = meta["worker_nodes"]
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # one worker on each node
    status = subprocess.run([RAY, "status", "--address", two_node_cluster], capture_output=True, text=True,
                            env={**env, "RAY_AUTH_MODE": "token"}, timeout=60)
    for node in nodes:
        assert node in status.stdout  # both are nodes of the cluster this test started


# A driver that runs one task on the cluster it connects to.
DRIVER = "import ray, sys; ray.init(address=sys.argv[1]); print('answer', ray.get(ray.remote(lambda: 41 + 1).remote()))"


@pytest.mark.slow
def test_ray_start_with_token_auth_refuses_a_driver_without_the_token(tmp_path):
    """What docs/production.md tells operators to do for a `ray start` cluster: RAY_AUTH_MODE=token
    on every node, the token in a file named by RAY_AUTH_TOKEN_PATH (or ~/.ray/auth_token, or
    RAY_AUTH_TOKEN). A driver without the token is refused; one with it connects and runs a task."""
    import secrets
    import shutil

    port = free_port()
    temp = Path(f"/tmp/sa{port}")  # short: Ray's socket paths must stay under ~107 characters
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    home = tmp_path / "home"  # no ~/.ray/auth_token: only the token this test hands out exists
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    with_token = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                        "--num-cpus", "1", "--temp-dir", str(temp), "--include-dashboard", "false",
                        "--disable-usage-stats"], check=True, env=with_token, capture_output=True, timeout=180)
        refused = subprocess.run([sys.executable, "-c", DRIVER, address], env=env, capture_output=True, text=True,
                                 timeout=300)
        assert refused.returncode != 0 and "answer" not in refused.stdout
        assert "Unauthenticated" in refused.stderr and "Authentication token is missing or incorrect" in refused.stderr
        connected = subprocess.run([sys.executable, "-c", DRIVER, address], env=with_token, capture_output=True,
                                   text=True, timeout=300)
        assert connected.returncode == 0, connected.stderr[-3000:]
        assert "answer 42" in connected.stdout
    finally:
        stop(str(temp), address)
        assert not our_processes(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
