"""``segpipe with-ray CMD ...``: run a command against a local Ray started for it, then stop that Ray.

``make pipeline`` runs ``segpipe with-ray dvc repro``: one local Ray head (token authentication
on, loopback only; ``segpipe.cluster.local_ray``) serves every train stage of the DAG through
``RAY_ADDRESS``, so each stage connects in a fraction of a second instead of starting and
stopping a Ray of its own. The Ray is stopped when the command ends, fails or is interrupted
(Ctrl-C, SIGTERM); only the processes of this Ray are stopped, never another Ray on the machine.
A plain ``dvc repro`` still works: each train stage then starts its own local Ray.
"""

from __future__ import annotations

import signal
import subprocess
import sys

from segpipe.cluster import local_ray


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
