"""``segpipe schedule``: serve the ``retrain`` flow on its cron schedule (``retrain.cron``) and, with
``retrain.on_ingest`` (the default), whenever an ``ingest`` flow run completes.

The second is a Prefect deployment trigger: an automation on the server that runs the retrain
deployment when it sees a ``prefect.flow-run.Completed`` event of a flow named ``ingest``. A drop
that is rejected ends its ingest run Failed, so it triggers nothing. Ingest runs must report to the
same server (``PREFECT_API_URL``) for their events to reach it.

With ``PREFECT_API_URL`` set, the deployment is registered with that Prefect server and this
process runs the flow runs it schedules. Without it, a local Prefect server is started for the
life of this command (``prefect server start`` on 127.0.0.1): Prefect's in-process ephemeral
API runs no scheduler service, so cron runs would never be created against it. ``--dry-run``
builds the deployment and prints its schedule without contacting any server::

    segpipe schedule --dry-run
    segpipe schedule                      # blocks; Ctrl-C stops serving (and the local server)
    segpipe schedule --pool segpipe       # register with a work pool; `prefect worker start` runs it
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.retrain import check_params, retrain_flow
from segpipe.params import RetrainParams, add_params_arguments, from_args

SERVER_START_S = 120.0  # a cold `prefect server start` migrates its database first


def next_runs(cron: str, timezone: str, count: int, after: dt.datetime | None = None) -> list[dt.datetime]:
    """The next ``count`` times ``cron`` fires in ``timezone`` (pure, for the dry run)."""
    from zoneinfo import ZoneInfo

    from prefect._vendor.croniter import croniter

    start = (after or dt.datetime.now(dt.timezone.utc)).astimezone(ZoneInfo(timezone))
    it = croniter(cron, start)
    return [it.get_next(dt.datetime) for _ in range(count)]


INGEST_FLOW = "ingest"  # pipelines.ingest's flow name: its completed runs trigger a retrain


def ingest_trigger() -> Any:
    """The deployment trigger that runs retrain when an ``ingest`` flow run completes (only then:
    a rejected drop's run is Failed)."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="retrain-on-ingest",
        expect={"prefect.flow-run.Completed"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": INGEST_FLOW},
    )


def deployment_fields(params: RetrainParams, repo: Path, params_file: str = "params.yaml",
                      overrides: list[str] | None = None) -> dict[str, Any]:
    """What every retrain deployment has, served or in a work pool: name, cron schedule, the ingest
    trigger (``retrain.on_ingest``), parameters."""
    from prefect.schedules import Cron

    check_params(params)
    repo = Path(repo).resolve()
    return {
        "name": params.deployment,
        "schedules": [Cron(params.cron, timezone=params.timezone)],
        "triggers": [ingest_trigger()] if params.on_ingest else [],
        # Runs read params_file (relative to repo) at run time, with the same --set overrides.
        "parameters": {"repo": str(repo), "params_file": params_file, "overrides": list(overrides or [])},
        "description": f"dvc repro of the segpipe pipeline in {repo}, then promotion",
        "tags": ["segpipe", "retrain"],
    }


def build_deployment(params: RetrainParams, repo: Path, params_file: str = "params.yaml",
                     overrides: list[str] | None = None) -> Any:
    """The RunnerDeployment of ``retrain_flow`` on ``params.cron`` (not yet registered anywhere)."""
    return retrain_flow.to_deployment(**deployment_fields(params, repo, params_file, overrides))


def deploy_to_pool(params: RetrainParams, repo: Path, pool: str, params_file: str = "params.yaml",
                   overrides: list[str] | None = None) -> Any:
    """Register the retrain deployment with the work pool ``pool`` instead of serving it; returns
    its id. A worker of the pool (``prefect worker start --pool POOL``) runs each run from the
    checkout ``repo``, which must be at that path, with its ``.venv``, on every worker's machine."""
    fields = deployment_fields(params, repo, params_file, overrides)
    flow = retrain_flow.from_source(source=fields["parameters"]["repo"], entrypoint="pipelines/retrain.py:retrain_flow")
    return flow.deploy(**fields, work_pool_name=pool, build=False, push=False, print_next_steps=False,
                       ignore_warnings=True)


def describe(deployment: Any, api_url: str | None, count: int = 3) -> str:
    """Human-readable summary of a deployment: name, schedule, next runs, API target."""
    lines = [f"deployment: {deployment.flow_name}/{deployment.name}"]
    for s in deployment.schedules or []:
        sched = s.schedule
        lines.append(f"schedule: cron {sched.cron!r} in {sched.timezone or 'UTC'}")
        lines += [f"  next: {t.isoformat()}" for t in next_runs(sched.cron, sched.timezone or "UTC", count)]
    for t in deployment.triggers or []:
        lines.append(f"trigger: {t.name}: {sorted(t.expect)} of flow {INGEST_FLOW!r}")
    lines.append(f"parameters: {deployment.parameters}")
    lines.append(f"api: {api_url}" if api_url else "api: none set; a local Prefect server will be started")
    return "\n".join(lines)


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def local_server(port: int) -> Iterator[str]:
    """A ``prefect server start`` subprocess on 127.0.0.1:``port``; yields its API URL."""
    api_url = f"http://127.0.0.1:{port}/api"
    if _healthy(api_url):
        raise SystemExit(f"segpipe schedule: a server already answers on {api_url}; "
                         f"set PREFECT_API_URL={api_url} to use it, or pick another --port")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _healthy(api_url):
            if proc.poll() is not None:
                raise SystemExit(f"segpipe schedule: `prefect server start` exited with status {proc.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit(f"segpipe schedule: the local Prefect server did not answer on {api_url} "
                                 f"within {SERVER_START_S:g} s")
            time.sleep(1)
        print(f"local Prefect server: {api_url} (UI at http://127.0.0.1:{port})", flush=True)
        yield api_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def serve(deployment: Any, api_url: str | None, port: int) -> None:
    """Register ``deployment`` and run its scheduled flow runs until interrupted."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if api_url:
        prefect_serve(deployment)
        return
    with local_server(port) as url, temporary_settings(updates={PREFECT_API_URL: url}):
        # The flow runs are subprocesses: they must reach the same server.
        os.environ["PREFECT_API_URL"] = url
        prefect_serve(deployment)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segpipe schedule", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="repository the flow runs in (default: .)")
    parser.add_argument("--dry-run", "--once", dest="dry_run", action="store_true",
                        help="build the deployment, print its schedule and exit (no server needed)")
    parser.add_argument("--port", type=int, default=4200,
                        help="port of the local Prefect server when PREFECT_API_URL is unset (default: 4200)")
    parser.add_argument("--pool", metavar="WORK_POOL",
                        help="register the deployment with this work pool (its workers run it) instead of serving "
                             "it here; needs PREFECT_API_URL")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    params: RetrainParams = from_args(args, "retrain")
    deployment = build_deployment(params, args.repo, args.params, args.overrides)
    api_url = os.environ.get("PREFECT_API_URL") or None
    print(describe(deployment, api_url), flush=True)
    if args.dry_run:
        return
    if args.pool:
        if not api_url:
            raise SystemExit("segpipe schedule: --pool needs PREFECT_API_URL (the server that holds the work pool)")
        deployment_id = deploy_to_pool(params, args.repo, args.pool, args.params, args.overrides)
        print(f"registered {deployment.flow_name}/{deployment.name} ({deployment_id}) with work pool {args.pool!r}: "
              f"start its workers with `prefect worker start --pool {args.pool}`", flush=True)
        return
    serve(deployment, api_url, args.port)


if __name__ == "__main__":
    main()
