"""The retrain deployment: built from the params' cron, printed by the dry run without a server, and
served by `segpipe schedule` against a real Prefect server that runs it when triggered."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
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


TINY = {  # a whole pipeline run in a few minutes on 2 cores: one small architecture, small images
    "synth": {"images": 16, "size": [64, 64]},
    "convert": {"val_fraction": 0.25, "workers": 1},
    # 40 epochs of 3 steps (about 12 s here), not a time budget: as much training on a loaded machine, and
    # enough to beat the colour baseline at 1 bit per channel (val mIoU about 0.12 against 0.08)
    "train": {"architectures": ["unet"], "epochs": 40, "budget_s": 0.0, "image_size": 64, "batch_size": 4,
              "threads": 2, "model": {"unet": {"base_channels": 8, "depth": 2}}, "overrides": {"unet": {}}},
    "evaluate": {"num_overlays": 1, "colour_bits": 1},
    "retrain": {"retries": 0, "timeout_s": 900.0},
}


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


def trigger(server: dict[str, str], name: str, cwd: Path) -> tuple[str, str]:
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


@pytest.mark.slow
def test_retrain_on_a_prefect_server_served_then_run_by_a_work_pool_worker(prefect_server, copy_repo, tmp_path):
    """`segpipe schedule` serves the deployment: a triggered run reproduces the pipeline and promotes,
    a second one reruns nothing and promotes nothing. Then the deployment moves to a process work
    pool (`segpipe schedule --pool`) and `prefect worker start` runs the next one."""
    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"]):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)
    name = f"retrain/{params['retrain']['deployment']}"
    log = tmp_path / "schedule.log"
    with open(log, "wb") as out:  # the runner picks up a triggered run within 2 s (Prefect's default: 10)
        schedule = subprocess.Popen([sys.executable, "-m", "segpipe", "schedule", "--repo", str(repo)], cwd=repo,
                                    env={**prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        def registered() -> bool:
            try:
                return api(prefect_server, f"/deployments/name/{name}")["name"] == params["retrain"]["deployment"]
            except OSError:
                return False

        wait_until(registered, "`segpipe schedule` registers the deployment", 120, log)
        deployment = api(prefect_server, f"/deployments/name/{name}")
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [params["retrain"]["cron"]]

        first, _ = trigger(prefect_server, name, tmp_path)
        run = api(prefect_server, f"/flow_runs/{first}")
        assert run["state_type"] == "COMPLETED" and run["deployment_id"] == deployment["id"]
        report = retrain_report(prefect_server, first)
        index = json.loads((repo / "models/registry/index.json").read_text())
        champion = index["aliases"]["champion"]
        assert f"**Promoted** {champion} (unet" in report, report
        assert [v["version"] for v in index["versions"]] == [champion] == ["v1"]
        registry = (repo / "models/registry/index.json").read_bytes()

        second, _ = trigger(prefect_server, name, tmp_path)
        assert api(prefect_server, f"/flow_runs/{second}")["state_type"] == "COMPLETED"
        report = retrain_report(prefect_server, second)
        assert "**Promotion unchanged**" in report, report
        stages = [*params["retrain"]["stages"], params["retrain"]["promote_stage"]]
        assert all(f"| `{s}` | completed | nothing (up to date) |" in report for s in stages), report
        assert (repo / "models/registry/index.json").read_bytes() == registry  # nothing new promoted

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
        third, _ = trigger(prefect_server, name, tmp_path)
        run = api(prefect_server, f"/flow_runs/{third}")
        assert run["state_type"] == "COMPLETED" and run["work_pool_name"] == "segpipe"
        assert "**Promotion unchanged**" in retrain_report(prefect_server, third)
    finally:
        for proc in (schedule, worker):
            if proc is not None:
                stop_group(proc)
