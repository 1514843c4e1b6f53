"""The ``retrain`` flow: the pipeline's stages as Prefect tasks, then promotion.

Each task runs ``dvc repro STAGE`` in a subprocess, so DVC decides what reruns (a foreach stage
name such as ``train`` reproduces every architecture). Retries, their delay and the per-attempt
timeout come from the ``retrain`` params section. The promotion stage runs only when every
earlier task completed: a failed, timed-out or crashed run never promotes. Each run publishes a
Markdown artifact (key ``retrain-report``) with the metrics of the report stage (read through
``dvc metrics show``, so no path is written here) and the promotion decision::

    python -m pipelines.retrain --repo .
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipelines import commands
from segpipe.errors import UserError
from segpipe.params import ParamsError, RetrainParams, add_params_arguments, load_section
from segpipe.results import metric_value

ARTIFACT_KEY = "retrain-report"
PROMOTION_FILE = "promotion.json"  # what segpipe.stages.promote writes into its report folder
_RUNNING = re.compile(r"^Running stage '([^']+)'", re.MULTILINE)


class RetrainFailed(UserError, RuntimeError):
    """A stage failed after its retries; nothing was promoted."""


# --------------------------------------------------------------------------------------
# Pure logic
# --------------------------------------------------------------------------------------


def check_params(p: RetrainParams) -> None:
    """Raise ParamsError when the cron expression or the timezone is not valid (the ranges are
    checked by RetrainParams itself)."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=p.cron, timezone=p.timezone)
    except ValueError as e:  # pydantic's ValidationError: keep its first message only
        errors = getattr(e, "errors", None)
        reason = errors()[0]["msg"] if callable(errors) and errors() else str(e)
        raise ParamsError(f"retrain.cron = {p.cron!r} / retrain.timezone = {p.timezone!r}: {reason}") from None


def ran_stages(dvc_output: str) -> list[str]:
    """The stages ``dvc repro`` actually ran (not skipped as unchanged), from its output."""
    return _RUNNING.findall(dvc_output)


def _stage_items(lock: dict[str, Any], stage: str) -> dict[str, list[str]]:
    """{item: [out paths]} of ``stage`` in a parsed dvc.lock; foreach items are ``stage@item``."""
    items = {}
    for name, entry in (lock.get("stages") or {}).items():
        base, _, item = name.partition("@")
        if base == stage:
            items[item or name] = [o["path"] for o in (entry or {}).get("outs", []) if "path" in o]
    return items


def _workspace_metrics(shown: dict[str, Any]) -> dict[str, Any]:
    """{path: metrics dict} of the workspace from ``dvc metrics show --json``."""
    rev = shown.get("", shown.get("workspace", {}))
    files = (rev or {}).get("data", {})
    return {path: entry["data"] for path, entry in files.items() if isinstance(entry, dict) and "data" in entry}


def metric_rows(shown: dict[str, Any], lock: dict[str, Any], stage: str, columns: list[str]) -> list[dict[str, Any]]:
    """One row per metrics file of ``stage`` (per foreach item): ``{"item", "path", col: value}``."""
    metrics = _workspace_metrics(shown)
    rows = []
    for item, outs in sorted(_stage_items(lock, stage).items()):
        for path in outs:
            if path in metrics:
                rows.append({"item": item, "path": path, **{c: metric_value(metrics[path], c) for c in columns}})
    return rows


def promotion_paths(lock: dict[str, Any], stage: str) -> list[str]:
    """Where the promotion stage's ``promotion.json`` can be, from its outputs in a parsed dvc.lock:
    an output of that name, or that name inside a folder output."""
    outs = [p for paths in _stage_items(lock, stage).values() for p in paths]
    named = [p for p in outs if Path(p).name == PROMOTION_FILE]
    return named or [f"{p.rstrip('/')}/{PROMOTION_FILE}" for p in outs]


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


@dataclass
class StageResult:
    stage: str
    status: str  # "completed", "failed" or "not run"
    ran: list[str] = field(default_factory=list)  # stages DVC reran (empty: all up to date)
    message: str = ""


def headline(results: list[StageResult], promotion: dict[str, Any] | None, promote_ran: bool) -> str:
    """One sentence: was a model promoted by this run, and if not, why."""
    failed = next((r for r in results if r.status == "failed"), None)
    if failed is not None:
        return f"**Not promoted**: stage `{failed.stage}` failed, so promotion did not run."
    if promotion is None:
        return "**No promotion decision**: the promotion stage wrote no report."
    after, before = promotion.get("champion_after"), promotion.get("champion_before")
    if not promote_ran:
        return ("**Promotion unchanged**: DVC found nothing new to judge and skipped the promotion stage; "
                f"champion: {_champion(after, promotion.get('metric'))}.")
    if after and (not before or after.get("version") != before.get("version")):
        return f"**Promoted** {_champion(after, promotion.get('metric'))} to champion."
    return f"**Not promoted**: no candidate beat the champion ({_champion(after, promotion.get('metric'))})."


def _champion(entry: dict[str, Any] | None, metric: str | None) -> str:
    if not entry:
        return "none"
    return f"{entry.get('version')} ({entry.get('arch')}, {metric} {_cell(entry.get('value'))})"


def render_markdown(
    results: list[StageResult],
    rows: list[dict[str, Any]],
    columns: list[str],
    promotion: dict[str, Any] | None,
    promote_ran: bool,
    report_stage: str,
) -> str:
    """The run's Markdown artifact: headline, stages, metrics table, promotion decision."""
    lines = ["# Retrain", "", headline(results, promotion, promote_ran), "", "## Stages", "",
             "| stage | result | reran by DVC |", "|---|---|---|"]
    for r in results:
        ran = ", ".join(f"`{s}`" for s in r.ran) or ("nothing (up to date)" if r.status == "completed" else "")
        status = r.status + (f": {_cell(r.message[-300:])}" if r.message else "")
        lines.append(f"| `{r.stage}` | {status} | {ran} |")
    lines += ["", f"## Metrics (`{report_stage}`)", ""]
    if rows:
        lines += ["| item | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {_cell(r['item'])} | " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    else:
        lines.append(f"No metrics of `{report_stage}` yet.")
    if promotion is not None and not any(r.status == "failed" for r in results):
        metric = promotion.get("metric", "metric")
        lines += ["", "## Promotion", "", f"Ranking metric: `{metric}`; champion before: "
                  f"{_champion(promotion.get('champion_before'), metric)}; after: "
                  f"{_champion(promotion.get('champion_after'), metric)}; challenger: "
                  f"{promotion.get('challenger') or 'none'}.", "",
                  f"| candidate | arch | {metric} | decision |", "|---|---|---|---|"]
        for c in promotion.get("candidates", []):
            lines.append(f"| `{_cell(c.get('eval_dir'))}` | {_cell(c.get('arch'))} | {_cell(c.get('value'))} | "
                         f"{_cell(c.get('decision'))} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Tasks (I/O)
# --------------------------------------------------------------------------------------


@task(cache_policy=NO_CACHE)
def repro(stage: str, repo: Path, timeout_s: float) -> list[str]:
    """``dvc repro STAGE`` in ``repo``; returns the stages DVC reran."""
    done = commands.run(commands.python_tool("dvc") + ["repro", stage], cwd=repo, timeout_s=timeout_s)
    return ran_stages(done.output)


def _read_lock(repo: Path) -> dict[str, Any]:
    path = repo / "dvc.lock"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


@task(cache_policy=NO_CACHE)
def collect_metrics(repo: Path, stage: str, columns: list[str], timeout_s: float) -> list[dict[str, Any]]:
    """The metrics table rows of ``stage`` from ``dvc metrics show --json`` and dvc.lock."""
    done = commands.run(commands.python_tool("dvc") + ["metrics", "show", "--json"], cwd=repo,
                        timeout_s=timeout_s, echo=False)
    text = done.output[done.output.find("{"):] if "{" in done.output else "{}"
    return metric_rows(json.loads(text), _read_lock(repo), stage, columns)


@task(cache_policy=NO_CACHE)
def read_promotion(repo: Path, stage: str) -> dict[str, Any] | None:
    """The promotion report written by the promotion stage, or None when there is none."""
    for rel in promotion_paths(_read_lock(repo), stage):
        if (repo / rel).is_file():
            return json.loads((repo / rel).read_text())
    return None


# --------------------------------------------------------------------------------------
# Flow
# --------------------------------------------------------------------------------------


@flow(name="retrain", log_prints=True)
def retrain_flow(repo: Path = Path("."), params_file: str = "params.yaml",
                 overrides: list[str] | None = None) -> dict[str, Any]:
    """Reproduce ``retrain.stages`` one task each, then the promotion stage if all succeeded.

    Publishes the ``retrain-report`` Markdown artifact; raises RetrainFailed (the run is
    Failed) when a stage fails after its retries.
    """
    repo = Path(repo).resolve()
    params: RetrainParams = load_section("retrain", repo / params_file, overrides or [])
    check_params(params)
    options = {"retries": params.retries, "retry_delay_seconds": params.retry_delay_s,
               "timeout_seconds": params.timeout_s}
    results = [StageResult(s, "not run") for s in [*params.stages, params.promote_stage]]
    for result in results:
        run = repro.with_options(name=f"repro-{result.stage}", task_run_name=f"dvc repro {result.stage}", **options)
        state = run(result.stage, repo, params.timeout_s, return_state=True)
        if not state.is_completed():
            result.status, result.message = "failed", state.message or state.name or "failed"
            break
        result.status, result.ran = "completed", state.result()
    failed = next((r for r in results if r.status == "failed"), None)
    promote_ran = results[-1].status == "completed" and bool(results[-1].ran)

    rows_state = collect_metrics(repo, params.report_stage, params.metrics, params.timeout_s, return_state=True)
    rows = rows_state.result() if rows_state.is_completed() else []
    promotion = read_promotion(repo, params.promote_stage) if failed is None else None
    markdown = render_markdown(results, rows, params.metrics, promotion, promote_ran, params.report_stage)
    create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY, description=headline(results, promotion, promote_ran))
    if failed is not None:
        raise RetrainFailed(f"stage {failed.stage!r} failed after {params.retries + 1} attempt(s); "
                            f"nothing was promoted: {failed.message}")
    return {"stages": [r.__dict__ for r in results], "metrics": rows, "promotion": promotion,
            "promote_ran": promote_ran}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.retrain", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="repository root (default: .)")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    state = retrain_flow(repo=args.repo, params_file=args.params, overrides=args.overrides, return_state=True)
    if not state.is_completed():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
