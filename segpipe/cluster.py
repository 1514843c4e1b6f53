"""Connecting to Ray: the one place that does it (train, inference, ``segpipe with-ray``, tests).

Two ways to get a Ray:

- :func:`connect` is what a driver (``segpipe train``, the Ray inference engine) calls: it joins
  ``RAY_ADDRESS`` (or an explicit address) with token authentication when the cluster has a
  token, or starts a local, loopback-only Ray inside this process with token authentication on;
  what it connected or started is disconnected or stopped on exit, and a Ray the caller already
  initialised is left alone.
- :func:`local_ray` starts a Ray head as separate processes (``ray start --head``, token
  authentication on, loopback only, its own temp folder) for several drivers to share through
  ``RAY_ADDRESS``: ``segpipe with-ray dvc repro`` (``segpipe.commands.with_ray``) and the test
  suite's session fixture. Only the processes of that Ray are stopped afterwards, never another
  Ray on the machine.

Where Ray's own messages go: the driver logs at warning level; what Ray forwards from its workers
and actors, its loggers' output and its deprecation warnings are routed to the command's log file
by ``segpipe.progress.session`` (``SEGPIPE_LOG=debug`` shows them). Ray Train's patch of the
workers' ``print`` (which sends every printed line to the console twice: once as printed, once
through its logger) is turned off for the Rays started here (:data:`RAY_ENV`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_of(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker``, plus all their descendants (Ray's agents
    rename themselves, e.g. ``ray::DashboardAgent``, so only the process tree finds them)."""
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


def stop_processes(*markers: str, timeout: float = 15.0, rounds: int = 3) -> None:
    """SIGTERM the processes of ``markers`` (see :func:`processes_of`), SIGKILL what is left.

    Repeated while new ones appear (a raylet may start a worker while it is being stopped), at
    most ``rounds`` times."""
    import psutil

    for _ in range(rounds):
        procs = []
        for pid in sorted({p for m in markers for p in processes_of(m)}):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                proc.terminate()
                procs.append(proc)
        if not procs:
            return
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)


# Environment of the Ray processes started here (and of an in-process Ray's workers, which inherit
# the driver's): Ray Train V2 would otherwise re-log each line a worker prints (a duplicate of it).
# Ray's distributed tqdm would also replace the driver's ``print`` with its own.
RAY_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TQDM_PATCH_PRINT": "0"}


def auth_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with token authentication on, generating ``~/.ray/auth_token`` if no token exists."""
    env = {**env, "RAY_AUTH_MODE": "token"}
    has_token = env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or \
        (Path(env.get("HOME", str(Path.home()))) / ".ray" / "auth_token").is_file()
    if not has_token:
        subprocess.run([ray_executable(), "get-auth-token", "--generate"], env=env, check=True,
                       capture_output=True, timeout=120)
    return env


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None) -> Iterator[dict[str, str]]:
    """Start a single-node Ray head on loopback; yield the environment that points drivers at it."""
    port = free_port()
    # Ray's socket paths must stay under ~107 characters: a short folder of our own under /tmp.
    temp = Path(tempfile.mkdtemp(prefix="segray", dir="/tmp"))
    env = auth_env({k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env = {**RAY_ENV, **env}
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([ray_executable(), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                        "--num-cpus", str(num_cpus or os.cpu_count() or 1), "--temp-dir", str(temp),
                        "--include-dashboard", "false", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, text=True, timeout=300)
        # One node on this machine is never preempted: Ray Train's watcher actor would be a process for nothing.
        yield {**env, "RAY_ADDRESS": address, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    finally:
        # ":port" too: the head's Ray Client server names the GCS by the machine's address, not
        # 127.0.0.1, and nothing else of it; left running it would hold port 10001 for the next head
        stop_processes(str(temp), address, f":{port}")
        shutil.rmtree(temp, ignore_errors=True)


# Ray Train's controller polls its workers this often (Ray's default is 2 s, which adds up to
# two idle polls to every start and end of a run); a driver's own setting wins.
HEALTH_CHECK_INTERVAL_S = "0.25"


def has_ray_token(env: dict[str, str] | None = None) -> bool:
    """Whether a Ray token is configured: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME", str(Path.home())))
    return bool(env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or (home / ".ray" / "auth_token").is_file())


def _quiet() -> dict[str, Any]:
    import ray

    return {"log_to_driver": True, "logging_level": "warning",
            "logging_config": ray.LoggingConfig(encoding="TEXT", log_level="ERROR")}


@contextlib.contextmanager
def connect(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> Iterator[bool]:
    """A Ray for this driver: ``address`` or ``RAY_ADDRESS`` if set, else a local Ray of
    ``num_cpus`` (default: this machine's cores) in this process. Yields whether it started a
    local Ray. Token authentication: on for a local Ray (a token is generated if none exists), and
    for a cluster whenever this machine has a token (Ray reads the mode when it initialises, so it
    is set before ``ray.init``). A Ray the caller initialised is used as it is and left running.

    ``dashboard``: a local Ray starts its dashboard, which serves Ray's state API. Without it a
    Train run that is killed (a Tune trial stopped early) keeps its workers' placement group for
    good: Ray Train's cleaner asks the state API whether the run's controller is still alive, and
    without an answer it never frees the group. Off otherwise: a process and a second of start-up."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address or has_ray_token():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if not address:
        # A local single-node Ray is never preempted: skip Ray Train's watcher actor (one process less).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    import ray

    from segpipe.progress import native_stderr_to_log

    if ray.is_initialized():
        yield False
        return
    with native_stderr_to_log():  # Ray's C++ core worker writes its own warnings to stderr
        if address:
            ray.init(address=address, **_quiet())
        else:
            with _own_address_for_workers() if dashboard else contextlib.nullcontext():
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=dashboard,
                         **_quiet())
        try:
            yield not address
        finally:
            still = settle_dataset_threads()
            if still:
                print(f"segpipe: {len(still)} Ray Data thread(s) still running as Ray shuts down", file=sys.stderr)
            ray.shutdown()


# Ray Data prepares a dataset iterator's batches in threads of the consuming process, named
# "iter_threaded" (ray.data._internal.block_batching.util). An iterator left in mid-epoch (a
# wall-clock budget ends the last epoch early) stops them only when it is garbage-collected. One
# still fetching a block when the driver shuts Ray down makes Ray end the whole process, exit
# status 1 and no traceback ("The core worker has already been shutdown ... The process will
# exit"): in `segpipe train`, after the training and before the output was written (5 runs in 9
# of a 30-s UNet budget on its own local Ray here, 2026-12-03).
DATASET_THREAD_NAME = "iter_threaded"
SETTLE_TIMEOUT_S = 10.0


def settle_dataset_threads(timeout_s: float = SETTLE_TIMEOUT_S) -> list[threading.Thread]:
    """Before Ray shuts down: collect the dataset iterators nothing refers to any more (which
    tells their batch threads to stop) and wait up to ``timeout_s`` for those threads to end.
    Returns the ones still running (none, normally); without any it costs nothing."""
    running = [t for t in threading.enumerate() if t.name == DATASET_THREAD_NAME and t.is_alive()]
    if not running:
        return []
    gc.collect()
    deadline = time.monotonic() + timeout_s
    for t in running:
        t.join(max(0.0, deadline - time.monotonic()))
    return [t for t in running if t.is_alive()]


@contextlib.contextmanager
def _own_address_for_workers() -> Iterator[None]:
    """For a local Ray started in this process: its GCS on a port chosen here, and ``RAY_ADDRESS``
    naming it in the environment its processes inherit, during ``ray.init(address="local")``
    (which ignores ``RAY_ADDRESS``); this process's environment is restored afterwards, so that
    the commands it starts later do not join this Ray by accident.

    Why: Ray's state API client finds its cluster by ``RAY_ADDRESS``, or else by looking for GCS
    processes on the machine, and refuses when it finds more than one. Ray Train's placement-group
    cleaner (an actor) asks it whether a run's controller is alive; with a second Ray on the
    machine (another user's, another command's, a parallel test run's) it never got an answer,
    and a Tune trial stopped early kept its workers' CPUs.

    Only for a Ray with its dashboard: the client of a Ray without one asks the default dashboard
    port (8265), which may be another Ray's, whose answer "no such actor" makes the cleaner remove
    a live run's workers. Without ``RAY_ADDRESS`` it gets no answer, and the run goes on."""
    port = free_port()
    saved = {key: os.environ.get(key) for key in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def serves_state_api(timeout_s: float = 10.0) -> bool:
    """Whether the connected Ray answers its state API (served by its dashboard), which Ray Train
    needs to free the workers of a run that was killed (see ``connect``'s ``dashboard``)."""
    import ray
    from ray.util.state import list_nodes

    try:
        # its own GCS by address: with no address, Ray looks for one on the machine (see above)
        list_nodes(address=ray.get_runtime_context().gcs_address, limit=1, timeout=int(max(1, timeout_s)),
                   raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - any failure means no answer; the caller only warns
        return False
    return True
