"""``segpipe with-ray CMD ...``: run a command against a local Ray started for it, then stop that Ray.

``make pipeline`` runs ``segpipe with-ray dvc repro``: one local Ray head (token authentication
on, loopback only) serves every train stage of the DAG through ``RAY_ADDRESS``, so each stage
connects in a fraction of a second instead of starting and stopping a Ray of its own. The Ray is
stopped when the command ends, fails or is interrupted (Ctrl-C, SIGTERM); only the processes of
this Ray are stopped (found by its own temp folder), never another Ray on the machine. A plain
``dvc repro`` still works: each train stage then starts its own local Ray.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([ray_executable(), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                        "--num-cpus", str(num_cpus or os.cpu_count() or 1), "--temp-dir", str(temp),
                        "--include-dashboard", "false", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, text=True, timeout=300)
        # One node on this machine is never preempted: Ray Train's watcher actor would be a process for nothing.
        yield {**env, "RAY_ADDRESS": address, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    finally:
        stop_processes(str(temp), address)
        shutil.rmtree(temp, ignore_errors=True)


def run_with_ray(command: list[str]) -> int:
    """Run ``command`` with a local Ray started for it; its exit status (128 + n when killed by signal n)."""
    stop = {"signal": 0}

    def forward(signum: int, _frame: object) -> None:
        stop["signal"] = signum
        raise KeyboardInterrupt

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with local_ray() as env:
            print(f"segpipe with-ray: local Ray at {env['RAY_ADDRESS']} for: {' '.join(command)}", file=sys.stderr)
            child = subprocess.Popen(command, env=env)
            try:
                return child.wait()
            except KeyboardInterrupt:
                child.send_signal(stop["signal"] or signal.SIGINT)
                try:
                    child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                return 128 + (stop["signal"] or signal.SIGINT)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().split("\n")[0] + "\n\nusage: segpipe with-ray COMMAND [ARGS...]   e.g. segpipe with-ray dvc repro")
        raise SystemExit(0 if argv else 2)
    raise SystemExit(run_with_ray(argv))
