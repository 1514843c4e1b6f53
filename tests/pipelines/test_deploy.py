"""The retrain deployment: built from the params' cron, printed by the dry run without a server, and
served by `segpipe schedule` against a real Prefect server that runs it when triggered."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipelines import commands
from pipelines.deploy import _healthy, build_deployment, main, next_runs
from segpipe.params import RetrainParams


def test_next_runs_of_a_cron_in_its_timezone():
    after = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.timezone.utc)  # a Wednesday
    runs = next_runs("0 3 * * 1", "Europe/Paris", 2, after)
    assert [r.isoformat() for r in runs] == ["2025-01-06T03:00:00+01:00", "2025-01-13T03:00:00+01:00"]


def test_deployment_builds_with_the_cron_from_params(tmp_path):
    params = RetrainParams(cron="30 2 * * *", timezone="Europe/Paris", deployment="nightly")
    deployment = build_deployment(params, tmp_path, "p.yaml", ["retrain.retries=3"])
    assert deployment.name == "nightly" and deployment.flow_name == "retrain"
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "30 2 * * *" and schedule.schedule.timezone == "Europe/Paris"
    assert schedule.active
    assert deployment.parameters == {"repo": str(tmp_path.resolve()), "params_file": "p.yaml",
                                     "overrides": ["retrain.retries=3"]}


def test_dry_run_prints_the_schedule(tmp_path, capsys, monkeypatch):
    (tmp_path / "params.yaml").write_text(textwrap.dedent("""\
        retrain:
          cron: "15 4 * * 6"
          deployment: weekly
        """))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    main(["--dry-run", "--repo", str(tmp_path), "--params", str(tmp_path / "params.yaml")])
    out = capsys.readouterr().out
    assert "deployment: retrain/weekly" in out
    assert "schedule: cron '15 4 * * 6' in UTC" in out
    assert out.count("  next: ") == 3 and "T04:15:00+00:00" in out
    assert "a local Prefect server will be started" in out


# ----------------------------------------------------------------------------- a real Prefect server


def api(server: dict[str, str], path: str, body: dict | None = None) -> dict | list:
    """A call to the Prefect server's REST API (what the UI and the CLI use)."""
    request = urllib.request.Request(server["PREFECT_API_URL"] + path, method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def wait_until(check, what: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s; log:\n{log.read_text()[-4000:]}"
        time.sleep(1)


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on a free loopback port with its own SQLite database; yields the
    environment that points a client at it (PREFECT_API_URL, PREFECT_HOME)."""
    from segpipe.cluster import free_port

    port = free_port()
    env = {k: v for k, v in commands.tool_env().items() if not k.startswith("PREFECT_") and k != "RAY_ADDRESS"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until(lambda: _healthy(env["PREFECT_API_URL"]), "the Prefect server answers", 180, log)
        yield env
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGINT the process group (Ctrl-C: `segpipe schedule` pauses its schedule), SIGKILL after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def trigger_run(server: dict[str, str], name: str, cwd: Path) -> tuple[str, str]:
    """`prefect deployment run NAME --watch`, as a user would: (flow run id, output)."""
    proc = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", name, "--watch",
                           "--watch-timeout", "900"], cwd=cwd, env=server, capture_output=True, text=True, timeout=960)
    output = proc.stdout + proc.stderr
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert run_id and proc.returncode == 0, output[-4000:]
    return run_id.group(1), output


def retrain_report(server: dict[str, str], run_id: str) -> str:
    artifacts = api(server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    (report,) = [a for a in artifacts if a["key"] == "retrain-report"]
    return report["data"]


def flow_runs(server: dict[str, str], flow: str) -> list[dict]:
    """Every run of ``flow`` on the server, oldest first."""
    runs = api(server, "/flow_runs/filter", {"flows": {"name": {"any_": [flow]}}, "sort": "EXPECTED_START_TIME_ASC"})
    return sorted(runs, key=lambda r: r["created"])


def ingest_cli(server: dict[str, str], repo: Path, drop: Path, name: str) -> subprocess.CompletedProcess:
    """`segpipe ingest DROP --name NAME` reporting to the server, as a site team would run it."""
    return subprocess.run([sys.executable, "-m", "segpipe", "ingest", str(drop), "--name", name, "--repo", str(repo)],
                          cwd=repo, env=server, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_schedule_serves_retrain_on_cron_on_demand_and_on_each_ingest_then_a_work_pool_runs_it(
        prefect_server, init_repo, tmp_path):
    """`segpipe schedule` serves the retrain deployment of a repository (a DVC pipeline of cheap shell
    stages: what is under test here is the orchestration, and the real pipeline has its own test in
    test_loop.py). A triggered run reproduces the pipeline and promotes; a second one reruns nothing.
    A completed ingest starts a retrain with no manual trigger; a rejected drop starts nothing. Then
    the deployment moves to a process work pool (`segpipe schedule --pool`) and `prefect worker start`
    runs the next one."""
    from test_retrain import make_pipeline  # the toy pipeline of the flow tests

    from segpipe.params import SynthParams
    from segpipe.stages import synth

    repo = make_pipeline(init_repo, tmp_path, "mkdir -p models/train/$1 && echo w > models/train/$1/model.txt\n")
    # a work pool's worker loads the flow from the checkout (pipelines/retrain.py), as from a clone of this repository
    shutil.copytree(Path(__file__).resolve().parents[2] / "pipelines", repo / "pipelines",
                    ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["retrain"].update(retries=0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "no retries"], cwd=repo,
                   check=True)
    retrain = RetrainParams()
    name = f"retrain/{retrain.deployment}"
    log = tmp_path / "schedule.log"
    with open(log, "wb") as out:  # the runner picks up a triggered run within 2 s (Prefect's default: 10)
        schedule = subprocess.Popen([sys.executable, "-m", "segpipe", "schedule", "--repo", str(repo)], cwd=repo,
                                    env={**prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        def triggers() -> list[dict]:
            return [a for a in api(prefect_server, "/automations/filter", {}) if a["name"].startswith("retrain-on-ingest")]

        def registered() -> bool:  # the deployment, then its trigger (an automation Prefect creates after it)
            try:
                return api(prefect_server, f"/deployments/name/{name}")["name"] == retrain.deployment and bool(triggers())
            except OSError:
                return False

        wait_until(registered, "`segpipe schedule` registers the deployment and its trigger", 120, log)
        deployment = api(prefect_server, f"/deployments/name/{name}")
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [retrain.cron]
        (trigger,) = triggers()
        assert trigger["trigger"]["expect"] == ["prefect.flow-run.Completed"]
        assert trigger["actions"][0]["deployment_id"] == deployment["id"]

        first, _ = trigger_run(prefect_server, name, tmp_path)
        run = api(prefect_server, f"/flow_runs/{first}")
        assert run["state_type"] == "COMPLETED" and run["deployment_id"] == deployment["id"]
        report = retrain_report(prefect_server, first)
        assert "**Promoted** v1 (b" in report, report
        second, _ = trigger_run(prefect_server, name, tmp_path)
        report = retrain_report(prefect_server, second)
        assert "**Promotion unchanged**" in report, report
        assert "| `train` | completed | nothing (up to date) |" in report, report

        # A rejected drop (an annotation naming a missing image) ends its ingest run Failed: no retrain.
        bad, good = tmp_path / "bad", tmp_path / "good"
        synth.run(SynthParams(images=3, size=(64, 64), seed=5, workers=1), bad)
        (bad / "images" / sorted(p.name for p in (bad / "images").iterdir())[0]).unlink()
        done = ingest_cli(prefect_server, repo, bad, "bad")
        assert done.returncode == 1 and "rejected" in done.stderr + done.stdout, done.stdout + done.stderr
        # A valid drop: its ingest completes, and the server starts a retrain run by itself.
        synth.run(SynthParams(images=3, size=(64, 64), seed=6, workers=1), good)
        before = len(flow_runs(prefect_server, "retrain"))
        done = ingest_cli(prefect_server, repo, good, "site2")
        assert done.returncode == 0, done.stdout + done.stderr
        assert (repo / "data" / "raw" / "site2.dvc").is_file()

        def retrained() -> bool:
            runs = flow_runs(prefect_server, "retrain")
            return len(runs) > before and runs[-1]["state_type"] in ("COMPLETED", "FAILED", "CRASHED")

        wait_until(retrained, "a completed ingest starts a retrain run", 300, log)
        runs = flow_runs(prefect_server, "retrain")
        assert len(runs) == before + 1  # one for the valid drop, none for the rejected one
        auto = runs[-1]
        assert auto["state_type"] == "COMPLETED" and auto["deployment_id"] == deployment["id"]
        report = retrain_report(prefect_server, auto["id"])
        assert "`convert`" in report and "| `convert` | completed | `convert` |" in report, report

        stop_group(schedule)  # Ctrl-C: it stops serving
        prefect = [sys.executable, "-m", "prefect"]
        subprocess.run([*prefect, "work-pool", "create", "segpipe", "--type", "process"], env=prefect_server,
                       check=True, capture_output=True, timeout=120)
        done = subprocess.run([sys.executable, "-m", "segpipe", "schedule", "--repo", str(repo), "--pool", "segpipe"],
                              cwd=repo, env=prefect_server, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "with work pool 'segpipe'" in done.stdout, done.stdout + done.stderr
        with open(tmp_path / "worker.log", "wb") as out:
            worker = subprocess.Popen([*prefect, "worker", "start", "--pool", "segpipe", "--type", "process"],
                                      cwd=tmp_path, env={**prefect_server, "PREFECT_WORKER_QUERY_SECONDS": "2"},
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        third, _ = trigger_run(prefect_server, name, tmp_path)
        run = api(prefect_server, f"/flow_runs/{third}")
        assert run["state_type"] == "COMPLETED" and run["work_pool_name"] == "segpipe"
        assert "**Promotion unchanged**" in retrain_report(prefect_server, third)
    finally:
        for proc in (schedule, worker):
            if proc is not None:
                stop_group(proc)
