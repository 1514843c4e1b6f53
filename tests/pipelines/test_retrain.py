"""The retrain flow: pure rendering helpers, and real ``dvc repro`` runs of a cheap pipeline
(shell stages) under a Prefect test server: retries, a failure that must not promote, the
Markdown artifact."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pipelines.retrain import (
    StageResult,
    check_params,
    headline,
    metric_rows,
    promotion_paths,
    ran_stages,
    render_markdown,
)
from segpipe.params import ParamsError, RetrainParams

LOCK = {
    "schema": "2.0",
    "stages": {
        "train@a": {"outs": [{"path": "models/train/a/metrics.json"}]},
        "evaluate@a": {"outs": [{"path": "models/eval/a/metrics.json"}, {"path": "models/eval/a/overlays"}]},
        "evaluate@b": {"outs": [{"path": "models/eval/b/metrics.json"}]},
        "promote": {"outs": [{"path": "reports/promotion"}, {"path": "reports/summary.md"}]},
    },
}
SHOWN = {"": {"data": {
    "models/train/a/metrics.json": {"data": {"miou": 0.99}},
    "models/eval/a/metrics.json": {"data": {"miou": 0.5, "mdice": 0.6, "segm": {"AP": 0.25}}},
    "models/eval/b/metrics.json": {"data": {"miou": float("nan"), "mdice": 0.7}},
}}}
PROMOTION = {
    "metric": "miou",
    "champion_before": None,
    "champion_after": {"version": "v1", "arch": "a", "value": 0.5},
    "challenger": None,
    "candidates": [{"eval_dir": "models/eval/a", "arch": "a", "value": 0.5, "decision": "promoted to champion"}],
}


def test_ran_stages_reads_dvc_output():
    out = "Stage 'synth' didn't change, skipping\nRunning stage 'train@unet':\n> segpipe train\nRunning stage 'evaluate@unet':\n"
    assert ran_stages(out) == ["train@unet", "evaluate@unet"]
    assert ran_stages("Stage 'synth' didn't change, skipping\n") == []


def test_metric_lookup_dotted_and_non_finite():
    from segpipe.results import metric_value as lookup

    m = {"miou": 0.5, "segm": {"AP": 0.25}, "bad": float("inf"), "flag": True}
    assert lookup(m, "miou") == 0.5 and lookup(m, "segm.AP") == 0.25
    assert lookup(m, "segm.AR") is None and lookup(m, "bad") is None and lookup(m, "flag") is None


def test_metric_rows_take_only_the_report_stage():
    rows = metric_rows(SHOWN, LOCK, "evaluate", ["miou", "segm.AP"])
    assert rows == [
        {"item": "a", "path": "models/eval/a/metrics.json", "miou": 0.5, "segm.AP": 0.25},
        {"item": "b", "path": "models/eval/b/metrics.json", "miou": None, "segm.AP": None},
    ]
    assert metric_rows(SHOWN, {}, "evaluate", ["miou"]) == []


def test_promotion_paths_from_lock():
    assert promotion_paths(LOCK, "promote")[0] == "reports/promotion/promotion.json"
    lock = {"stages": {"promote": {"outs": [{"path": "out/summary.md"}, {"path": "out/promotion.json"}]}}}
    assert promotion_paths(lock, "promote") == ["out/promotion.json"]
    assert promotion_paths(LOCK, "missing") == []


def test_headline_cases():
    ok = [StageResult("train", "completed", ["train@a"]), StageResult("promote", "completed", ["promote"])]
    assert headline(ok, PROMOTION, True).startswith("**Promoted** v1 (a, miou 0.5000)")
    kept = dict(PROMOTION, champion_before=PROMOTION["champion_after"])
    assert headline(ok, kept, True).startswith("**Not promoted**: no candidate beat")
    assert headline(ok, PROMOTION, False).startswith("**Promotion unchanged**")
    failed = [StageResult("train", "failed", message="boom"), StageResult("promote", "not run")]
    assert headline(failed, PROMOTION, False).startswith("**Not promoted**: stage `train` failed")


def test_render_markdown_table_and_failure_hides_stale_decision():
    rows = metric_rows(SHOWN, LOCK, "evaluate", ["miou", "mdice"])
    ok = [StageResult("evaluate", "completed", []), StageResult("promote", "completed", ["promote"])]
    md = render_markdown(ok, rows, ["miou", "mdice"], PROMOTION, True, "evaluate")
    assert "| item | miou | mdice |" in md and "| a | 0.5000 | 0.6000 |" in md and "| b | n/a | 0.7000 |" in md
    assert "| `evaluate` | completed | nothing (up to date) |" in md
    assert "| `models/eval/a` | a | 0.5000 | promoted to champion |" in md
    failed = [StageResult("evaluate", "failed", message="exit 1 | oops"), StageResult("promote", "not run")]
    md = render_markdown(failed, rows, ["miou"], PROMOTION, False, "evaluate")
    assert "## Promotion" not in md and "exit 1 \\| oops" in md


def test_check_params_names_the_key():
    check_params(RetrainParams())
    with pytest.raises(ParamsError, match="retrain.cron"):
        check_params(RetrainParams(cron="every monday"))
    with pytest.raises(ParamsError, match="retrain.timezone"):
        check_params(RetrainParams(timezone="Mars/Olympus"))
    with pytest.raises(ParamsError, match="promote_stage"):
        RetrainParams(stages=["train", "promote"])
    with pytest.raises(ParamsError, match="retries"):
        RetrainParams(retries=-1)


# --------------------------------------------------------------------------------------
# Flow runs: a real `dvc repro` of shell stages in a temporary repository
# --------------------------------------------------------------------------------------

DVC_YAML = textwrap.dedent("""\
    stages:
      synth:
        cmd: mkdir -p data/raw/synth && echo scene > data/raw/synth/x.txt
        outs: [data/raw/synth]
      convert:
        cmd: mkdir -p data/shards && cat data/raw/synth/x.txt > data/shards/s.txt
        deps: [data/raw]
        outs: [data/shards]
      train:
        foreach: ${train.architectures}
        do:
          cmd: sh train.sh ${item}
          deps: [data/shards, train.sh]
          outs:
            - models/train/${item}
      evaluate:
        foreach: ${train.architectures}
        do:
          cmd: sh evaluate.sh ${item}
          deps:
            - models/train/${item}
            - evaluate.sh
          outs:
            - models/eval/${item}/overlays
          metrics:
            - models/eval/${item}/metrics.json:
                cache: false
      promote:
        cmd: sh promote.sh
        deps: [models/eval, promote.sh]
        outs:
          - reports/promotion:
              cache: false
    """)
PARAMS = textwrap.dedent("""\
    train:
      architectures: [a, b]
    retrain:
      stages: [synth, convert, train, evaluate]   # this toy pipeline has no baselines or fuse stage
      metrics: [miou, mdice, pixel_acc, segm.AP]
      retries: 1
      retry_delay_s: 0
      timeout_s: 120
    """)
EVALUATE_SH = textwrap.dedent("""\
    mkdir -p models/eval/$1/overlays && echo png > models/eval/$1/overlays/o.txt
    if [ "$1" = a ]; then v='"miou": 0.55, "mdice": 0.7, "pixel_acc": 0.9'
    else v='"miou": 0.625, "mdice": 0.75, "pixel_acc": 0.95, "segm": {"AP": 0.25}'; fi
    echo "{\\"arch\\": \\"$1\\", $v}" > models/eval/$1/metrics.json
    """)
PROMOTE_SH = textwrap.dedent("""\
    mkdir -p reports/promotion
    cat > reports/promotion/promotion.json <<'JSON'
    {"metric": "miou", "champion_before": null, "challenger": null, "created": ["v1"],
     "champion_after": {"version": "v1", "arch": "b", "value": 0.625},
     "candidates": [{"eval_dir": "models/eval/a", "arch": "a", "value": 0.55, "decision": "passed every gate, but models/eval/b ranks higher on miou"},
                    {"eval_dir": "models/eval/b", "arch": "b", "value": 0.625, "decision": "promoted to champion"}]}
    JSON
    """)
# Fails the first time any train item runs (a marker outside DVC's outputs), then succeeds.
TRAIN_ONCE_SH = "mkdir -p .tries; if [ ! -f .tries/once ]; then touch .tries/once; echo 'flaky failure' >&2; exit 1; fi\n" \
                "mkdir -p models/train/$1 && echo w > models/train/$1/model.txt\n"
TRAIN_FAIL_SH = "echo 'train: out of memory' >&2; exit 3\n"


def make_pipeline(init_repo, tmp_path: Path, train_sh: str) -> Path:
    return init_repo(tmp_path / "repo", {"dvc.yaml": DVC_YAML, "params.yaml": PARAMS, "train.sh": train_sh,
                                         "evaluate.sh": EVALUATE_SH, "promote.sh": PROMOTE_SH})


def flow_run_details(state):
    """(task runs by name, artifacts) of the flow run that ended in ``state``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return {t.name: t for t in tasks}, artifacts


@pytest.mark.slow
def test_retrain_retries_a_flaky_stage_then_promotes(tmp_path, prefect_harness, init_repo):
    from pipelines.retrain import retrain_flow

    repo = make_pipeline(init_repo, tmp_path, TRAIN_ONCE_SH)
    state = retrain_flow(repo=repo, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert [s["status"] for s in result["stages"]] == ["completed"] * 5
    assert "train@a" in result["stages"][2]["ran"] and result["promote_ran"]
    assert (repo / ".tries" / "once").is_file() and (repo / "models/train/a/model.txt").is_file()
    assert json.loads((repo / "reports/promotion/promotion.json").read_text())["champion_after"]["version"] == "v1"

    tasks, artifacts = flow_run_details(state)
    assert tasks["dvc repro train"].run_count == 2  # failed once, retried once
    assert tasks["dvc repro synth"].run_count == 1 and tasks["dvc repro promote"].run_count == 1
    (report,) = [a for a in artifacts if a.key == "retrain-report"]
    assert report.type == "markdown"
    assert "**Promoted** v1 (b, miou 0.6250) to champion." in report.data
    assert "| item | miou | mdice | pixel_acc | segm.AP |" in report.data
    assert "| a | 0.5500 | 0.7000 | 0.9000 | n/a |" in report.data
    assert "| b | 0.6250 | 0.7500 | 0.9500 | 0.2500 |" in report.data
    assert "| `models/eval/b` | b | 0.6250 | promoted to champion |" in report.data


@pytest.mark.slow
def test_retrain_failing_stage_never_promotes(tmp_path, prefect_harness, init_repo):
    from pipelines.retrain import retrain_flow

    repo = make_pipeline(init_repo, tmp_path, TRAIN_FAIL_SH)
    state = retrain_flow(repo=repo, return_state=True)
    assert state.is_failed()
    assert "stage 'train' failed after 2 attempt(s); nothing was promoted" in state.message
    assert not (repo / "reports").exists() and not (repo / "models/eval").exists()

    tasks, artifacts = flow_run_details(state)
    assert tasks["dvc repro train"].run_count == 2 and tasks["dvc repro train"].state.is_failed()
    assert "dvc repro evaluate" not in tasks and "dvc repro promote" not in tasks
    (report,) = [a for a in artifacts if a.key == "retrain-report"]
    assert "**Not promoted**: stage `train` failed" in report.data
    assert "out of memory" in report.data and "## Promotion" not in report.data
