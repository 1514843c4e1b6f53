"""The retrain deployment: built from the params' cron, printed by the dry run without a server."""

from __future__ import annotations

import datetime as dt
import textwrap

from pipelines.deploy import build_deployment, main, next_runs
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
