"""A real Ray cluster on loopback whose nodes share no disk: `ray start` a head and a worker node,
each with its own --temp-dir and working directory, the driver in a third folder, and the shards,
checkpoints and trained model only on an S3 server (moto). A 2-worker job spreads over both nodes;
the worker node is killed mid-run and another one started, and the job resumes from the S3
checkpoint. Only the processes these tests started are stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from segpipe.cluster import free_port, processes_of, ray_executable, stop_processes
from segpipe.progress import LOG_DIR_ENV

RAY = ray_executable()

# A driver that prints every node of the cluster it connects to (dead ones too) with its plasma
# socket, which lies in the node's own --temp-dir.
NODES = ("import json, ray, sys; ray.init(address=sys.argv[1], logging_level='error'); "
         "print(json.dumps({n['NodeID']: n['ObjectStoreSocketName'] for n in ray.nodes()}))")


@dataclass
class Cluster:
    """Nodes started with `ray start`, each in a folder of its own under ``root``."""

    address: str
    env: dict[str, str]
    root: Path
    temps: dict[str, Path] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> Path:
        """`ray start` node ``name`` with working directory ROOT/name and a temp dir of its own; returns that."""
        cwd = self.root / name
        cwd.mkdir()
        # short: Ray's socket paths must stay under ~107 characters
        temp = self.temps[name] = Path(tempfile.mkdtemp(prefix=f"sp{name[:2]}", dir="/tmp"))
        subprocess.run([RAY, "start", "--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
                        "--temp-dir", str(temp), *args], cwd=cwd, env=self.env, check=True, capture_output=True,
                       timeout=180)
        return temp

    def kill(self, name: str) -> None:
        """SIGKILL every process of node ``name``: a machine that dies, not one that stops."""
        for pid in processes_of(str(self.temps[name])):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def node_temps(self) -> dict[str, Path]:
        """{node id: its temp dir} of every node the cluster has known, dead ones too."""
        out = subprocess.run([sys.executable, "-c", NODES, self.address], env=self.env, capture_output=True, text=True,
                             timeout=120, check=True).stdout
        sockets = json.loads(out.strip().splitlines()[-1])
        return {node: next(t for t in self.temps.values() if socket.startswith(f"{t}/"))
                for node, socket in sockets.items()}


@pytest.fixture
def cluster(s3, tmp_path):
    """A head node; the test starts the worker nodes. Every node has the AWS_* variables of the S3
    server (Ray workers inherit their node's environment, not the driver's) and token auth on, as
    docs/production.md tells operators to set it up: RAY_AUTH_MODE=token, and the token in a file
    named by RAY_AUTH_TOKEN_PATH (not the machine's ~/.ray/auth_token)."""
    import secrets

    port = free_port()
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
    c = Cluster(f"127.0.0.1:{port}", env, tmp_path / "nodes")
    c.root.mkdir()
    try:
        c.start("head", "--head", "--port", str(port), "--include-dashboard", "false")
        yield c
    finally:
        stop_processes(*map(str, c.temps.values()), c.address)
        assert not [p for t in c.temps.values() for p in processes_of(str(t))]
        for temp in c.temps.values():
            shutil.rmtree(temp, ignore_errors=True)


PARAMS = textwrap.dedent("""\
    train:
      architectures: [fcn32s]
      epochs: 6
      budget_s: 0
      batch_size: 2
      image_size: 64
      workers: 2
      cpus_per_worker: 1.0
      threads: 1
      placement_strategy: STRICT_SPREAD
      num_to_keep: 2
      max_failures: 2
      overrides: {{}}
      storage_path: {storage}
    """)


def checkpoint_metas(s3, prefix: str) -> dict[str, dict]:
    """{checkpoint folder: its meta.json} of every checkpoint now under ``prefix`` on S3."""
    metas = {}
    for key in s3.files(prefix):
        if key.endswith("/meta.json") and "/checkpoint_" in f"/{key}":
            try:
                metas[key.rsplit("/", 1)[0]] = json.loads(s3.read(f"{prefix}/{key}"))
            except (OSError, ValueError):  # deleted (num_to_keep) or half-listed meanwhile
                continue
    return metas


def registered_checkpoint(s3, prefix: str) -> bool:
    """Whether Ray Train's checkpoint manager has recorded a checkpoint on S3 (so a restart resumes from it)."""
    for key in s3.files(prefix):
        if key.endswith("checkpoint_manager_snapshot.json"):
            try:
                return bool(json.loads(s3.read(f"{prefix}/{key}")).get("latest_checkpoint_result"))
            except (OSError, ValueError):
                return False
    return False


# A driver that runs one task on the cluster it connects to.
DRIVER = "import ray, sys; ray.init(address=sys.argv[1]); print('answer', ray.get(ray.remote(lambda: 41 + 1).remote()))"


@pytest.mark.slow
def test_two_nodes_without_a_shared_disk_spread_and_resume_from_s3_after_losing_a_node(cluster, s3, tiny_raw, tmp_path):
    """Also: the cluster refuses a driver without its token (no RAY_AUTH_TOKEN*, no ~/.ray/auth_token).

    The one proof that a run on worker actors restarts within the run from its last checkpoint
    (train.max_failures), says so, and trains no epoch twice (a single-machine test of a worker
    that raised at an epoch, in tests/stages/test_train.py, was merged into this one)."""
    from segpipe.formats.coco import read_collections
    from segpipe.params import ConvertParams
    from segpipe.stages import convert

    shards = s3.uri("shards")
    convert.run(ConvertParams(val_fraction=0.25, workers=1), read_collections(tiny_raw), shards, progress=False)
    cluster.start("worker", "--address", cluster.address)
    home = tmp_path / "home"  # a driver on a machine that was never given the token
    home.mkdir()
    no_token = {**{k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}, "HOME": str(home)}
    refused = subprocess.run([sys.executable, "-c", DRIVER, cluster.address], env=no_token, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode != 0 and "answer" not in refused.stdout
    assert "Unauthenticated" in refused.stderr and "Authentication token is missing or incorrect" in refused.stderr
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.format(storage=s3.uri("ray")))
    driver = tmp_path / "driver"  # the driver's working directory: no node runs here
    driver.mkdir()
    # The driver runs as its own process, as `dvc repro` would run it, with RAY_ADDRESS and AWS_* set.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_ADDRESS": cluster.address,
           "RAY_AUTH_TOKEN_PATH": cluster.env["RAY_AUTH_TOKEN_PATH"],  # segpipe turns token auth on when it has one
           LOG_DIR_ENV: str(tmp_path / "logs")}  # Ray's messages: a log file outside the driver's folder
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "segpipe", "train", "--arch", "fcn32s", "--shards", shards,
                                 "--out", s3.uri("models/fcn32s"), "--params", str(params)],
                                cwd=driver, env=env, stdout=out, stderr=subprocess.STDOUT)
    seen: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + 400
        while not registered_checkpoint(s3, "ray"):
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{log.read_text()[-5000:]}"
            assert time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.5)
        seen.update(checkpoint_metas(s3, "ray"))
        cluster.kill("worker")  # mid-run: a checkpoint is on S3, more epochs are to come
        cluster.start("worker2", "--address", cluster.address)
        while proc.poll() is None:  # the checkpoints of the resumed run, before the finished run deletes them
            seen.update(checkpoint_metas(s3, "ray"))
            assert time.monotonic() < deadline + 400, log.read_text()[-5000:]
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-5000:]
    assert "resumed from the checkpoint of epoch" in text, text[-5000:]

    temps = cluster.node_temps()
    before = [m for m in seen.values() if not m.get("restarts")]
    after = [m for m in seen.values() if m.get("restarts")]
    assert before and after, sorted(seen)
    # one worker on each node, before and after the worker node was replaced
    assert {temps[n] for n in before[0]["worker_nodes"]} == {cluster.temps["head"], cluster.temps["worker"]}
    assert {temps[n] for n in after[0]["worker_nodes"]} == {cluster.temps["head"], cluster.temps["worker2"]}
    resumed = after[0]["restarts"][0]["resumed_from_epoch"]
    assert resumed >= 1 and f"resumed from the checkpoint of epoch {resumed}" in text  # not from epoch 0

    # finished: the model is on S3, committed by its metrics.json, and nothing was written to any local folder
    metrics = json.loads(s3.read("models/fcn32s/metrics.json"))
    assert metrics["epochs"] == 6 and metrics["restarts"] >= 1
    # the history survived the restart: each epoch once, in order, the ones before it not retrained
    history = [h["epoch"] for h in json.loads(s3.read("models/fcn32s/checkpoint/meta.json"))["history"]]
    assert history == list(range(1, 7)), history
    assert "model.safetensors" in " ".join(s3.files("models/fcn32s/checkpoint"))
    for folder in (driver, *(cluster.root / name for name in cluster.temps)):
        assert list(folder.iterdir()) == [], folder


def test_settle_dataset_threads_stops_batch_threads_of_iterators_nothing_refers_to():
    """What `connect` does before Ray shuts down: a batch thread of Ray Data's name whose
    iterator is only in a reference cycle (stopped when collected, as Ray Data's are) has ended
    when it returns; a thread of another name is not waited for."""
    import threading

    from segpipe.cluster import DATASET_THREAD_NAME, settle_dataset_threads

    class Iterator:  # stops its thread when collected, like Ray Data's generator's `finally`
        def __init__(self, stop: threading.Event) -> None:
            self.stop, self.me = stop, self  # a cycle: only the garbage collector frees it

        def __del__(self) -> None:
            self.stop.set()

    stop, other_stop = threading.Event(), threading.Event()
    batches = threading.Thread(target=stop.wait, name=DATASET_THREAD_NAME, daemon=True)
    other = threading.Thread(target=other_stop.wait, name="unrelated", daemon=True)
    batches.start()
    other.start()
    Iterator(stop)
    try:
        assert batches.is_alive()
        assert settle_dataset_threads(timeout_s=5.0) == []
        assert not batches.is_alive() and other.is_alive()
        assert settle_dataset_threads(timeout_s=5.0) == []  # nothing to wait for: returns at once
    finally:
        stop.set()
        other_stop.set()

