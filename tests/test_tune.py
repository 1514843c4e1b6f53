"""segpipe tune: the search space checked before any trial, a trial's params and its best.yaml
fragment, the merge into params.yaml; then real searches on tiny shards (Ray Tune, ASHA, Ray Train
worker actors): one stopped early, the best merged and retrained, a killed search resumed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from segpipe.params import ARCHITECTURES, ParamsError, TrainParams, TuneParams, load_section
from segpipe.stages.train import params_for
from segpipe.tune import (
    TrialRecord,
    auto_concurrency,
    best_fragment,
    check_space,
    current_values,
    merged_params_text,
    metric_of,
    pick_best,
    read_trials_csv,
    trial_params,
    trial_rows,
)

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- the space (pure)


def test_the_default_space_covers_every_architecture_and_passes_its_checks():
    from segpipe.models import default_kwargs

    tune = TuneParams()
    assert set(tune.space) == set(ARCHITECTURES) and tune.architectures == []
    for arch in ARCHITECTURES:
        check_space(tune.space[arch], arch, TrainParams(), default_kwargs(arch))


def _params_file(tmp_path: Path, space: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"tune": {"space": {"unet": space}}}))
    return path


@pytest.mark.parametrize("entry, message", [
    ({"nosuch": {"uniform": [0, 1]}}, r"tune\.space\.unet\.nosuch .*is no train key"),
    ({"workers": {"choice": [1, 2]}}, r"tune\.space\.unet\.workers .*cannot be searched"),
    ({"lr": {"gaussian": [0, 1]}}, r"tune\.space\.unet\.lr .*unknown distribution 'gaussian'"),
    ({"lr": {"uniform": [0.1, 0.01]}}, r"tune\.space\.unet\.lr .*uniform takes \[low, high\] with low < high"),
    ({"lr": {"loguniform": [0, 0.1]}}, r"tune\.space\.unet\.lr .*loguniform takes \[low, high\] with 0 < low"),
    ({"lr": {"uniform": [0.1], "choice": [1]}}, r"tune\.space\.unet\.lr .*must be one distribution"),
    ({"batch_size": {"randint": [4.5, 8]}}, r"tune\.space\.unet\.batch_size .*randint takes"),
    ({"lr": {"choice": []}}, r"tune\.space\.unet\.lr .*choice takes"),
])
def test_a_bad_space_entry_is_refused_on_load_naming_file_and_key(tmp_path, entry, message):
    path = _params_file(tmp_path, entry)
    with pytest.raises(ParamsError, match=message) as e:
        load_section("tune", path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("entry, message", [
    ({"model.nosuch": {"uniform": [0, 1]}}, r"tune\.space\.unet\.model\.nosuch: 'nosuch' is no build kwarg of unet"),
    ({"lr": {"uniform": [-0.1, 0.1]}}, r"tune\.space\.unet\.lr = .*-0\.1 is not valid: .*lr = -0\.1: must be > 0"),
    ({"batch_size": {"uniform": [4, 8]}}, r"tune\.space\.unet\.batch_size = .*expected an integer"),
    ({"warmup": {"choice": [0.1, 1.5]}}, r"tune\.space\.unet\.warmup = .*1\.5 is not valid"),
])
def test_a_space_whose_values_make_bad_train_params_is_refused(entry, message):
    from segpipe.models import default_kwargs

    with pytest.raises(ParamsError, match=message):
        check_space(entry, "unet", TrainParams(), default_kwargs("unet"))


def test_the_metric_must_be_the_architectures_task():
    assert metric_of("miou", "semantic", "unet") == ("val_score", "max")
    assert metric_of("train_loss", "instance", "mask_rcnn") == ("train_loss", "min")
    with pytest.raises(ParamsError, match=r"mask_rcnn is a instance model; its validation score is thing_miou"):
        metric_of("miou", "instance", "mask_rcnn")


# ----------------------------------------------------------------------------- trials, best.yaml, merge (pure)


def test_a_trials_values_land_in_the_architectures_overrides_and_model():
    train = TrainParams()
    p = params_for(trial_params(train, "unet", {"lr": 0.004, "model.dice_weight": 0.25}), "unet")
    assert p.lr == 0.004 and p.model["unet"]["dice_weight"] == 0.25
    assert p.budget_s == 140.0 and p.val_every == 2  # the architecture's other overrides stay
    assert p.workers == 1  # local mode cannot run in a Tune trial: one worker actor instead
    other = trial_params(train, "unet", {})
    assert params_for(other, "fcn8s") == replace(params_for(train, "fcn8s"), overrides=other.overrides)
    assert best_fragment("unet", {"lr": 0.004, "model.dice_weight": 0.25}) == {
        "train": {"overrides": {"unet": {"lr": 0.004}}, "model": {"unet": {"dice_weight": 0.25}}}}


def test_the_current_values_are_what_segpipe_train_runs_now():
    from segpipe.models import default_kwargs

    train = load_section("train", REPO / "params.yaml")
    space = {"lr": {}, "weight_decay": {}, "model.dice_weight": {}, "model.base_channels": {}}
    values = current_values(space, "unet", train, default_kwargs("unet"))
    p = params_for(train, "unet")
    # lr from the architecture's overrides where it has one, dice_weight from train.model.unet, base_channels
    # from the model's own defaults
    assert values == {"lr": p.lr, "weight_decay": p.weight_decay, "model.dice_weight": p.model["unet"]["dice_weight"],
                      "model.base_channels": default_kwargs("unet")["base_channels"]}
    assert params_for(trial_params(train, "unet", values), "unet") == replace(p, workers=1, overrides=trial_params(
        train, "unet", values).overrides, model=trial_params(train, "unet", values).model)


def test_merging_best_yaml_keeps_comments_and_every_other_key(tmp_path):
    text = (REPO / "params.yaml").read_text()
    merged = merged_params_text(text, best_fragment("unet", {"lr": 0.0042, "model.dice_weight": 0.3}))
    assert merged.count("\n") == text.count("\n")  # values change in place; nothing else moves
    assert "# The generated default data has one ground scale" in merged
    path = tmp_path / "params.yaml"
    path.write_text(merged)
    train = load_section("train", path)
    assert train.overrides["unet"] == {"budget_s": 140.0, "val_every": 2, "lr": 0.0042}
    assert train.model["unet"] == {"dice_weight": 0.3} and train.model["fcn8s"] == {"dice_weight": 0.5}
    for section in ("synth", "evaluate", "tune"):
        assert load_section(section, path) == load_section(section, REPO / "params.yaml")


def test_segpipe_params_merge_writes_the_fragment_and_refuses_an_invalid_one(tmp_path, capsys):
    from segpipe.cli import main

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    good = tmp_path / "best.yaml"
    good.write_text(yaml.safe_dump(best_fragment("fcn8s", {"lr": 0.002})))
    main(["params", "--params", str(params), "--merge", str(good)])
    assert load_section("train", params).overrides["fcn8s"]["lr"] == 0.002
    before = params.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(best_fragment("fcn8s", {"lr": -1.0})))
    with pytest.raises(SystemExit) as e:
        main(["params", "--params", str(params), "--merge", str(bad)])
    assert e.value.code == 2
    assert "train.overrides.fcn8s" in capsys.readouterr().err and params.read_text() == before


def test_trial_rows_say_which_trials_stopped_early_and_when():
    reports = [{"epoch": e, "metric": v, "time_s": e} for e, v in ((1, 0.2), (2, 0.3), (3, 0.35))]
    records = [TrialRecord("t1", {"lr": 0.01}, reports, "completed", out="x"),
               TrialRecord("t0", {"lr": 1e-5}, reports[:1], "stopped"),
               TrialRecord("t2", {"lr": 0.1}, [], "error", error="RuntimeError: boom")]
    rows = read_trials_csv(__import__("segpipe.tune", fromlist=["csv_text"]).csv_text(
        trial_rows(records, ["lr"], "miou", "max")))
    assert [r["trial_id"] for r in rows] == ["t0", "t1", "t2"]
    assert rows[0]["stopped_early"] == "True" and rows[0]["stopped_at_epoch"] == "1" and rows[0]["miou@2"] == ""
    assert rows[1]["miou@3"] == "0.35" and rows[1]["best_miou"] == "0.35" and rows[2]["error"] == "RuntimeError: boom"
    assert pick_best(records, "max").trial_id == "t1"
    assert pick_best(records[1:], "max") is None  # a stopped trial wrote no checkpoint
    assert math.isnan(records[2].best("max"))


def test_concurrency_leaves_ray_data_a_cpu():
    assert auto_concurrency(2, 0, TrainParams()) == 1
    assert auto_concurrency(16, 0, TrainParams()) == 13
    assert auto_concurrency(16, 2, TrainParams(workers=1, use_gpu=True)) == 2


# ----------------------------------------------------------------------------- real searches (Ray)


def tiny_train(**kw) -> TrainParams:
    base = dict(epochs=3, budget_s=0, batch_size=4, image_size=48, threads=1, precision="fp32", channels_last=False,
                architectures=["unet"], overrides={"unet": {"val_every": 1}},
                model={"unet": {"base_channels": 4, "depth": 2}})
    return TrainParams(**{**base, **kw})


# a learning rate over five orders of magnitude: the trials differ at the first rung
TINY_TUNE = TuneParams(trials=4, concurrency=2, grace_epochs=1, reduction_factor=2,
                       space={"unet": {"lr": {"loguniform": [1.0e-6, 3.0e-2]}}})


@pytest.fixture(scope="module")
def search(ray_session, tiny_shards, tmp_path_factory):
    from segpipe.stages.tune import run

    out = tmp_path_factory.mktemp("tune") / "out"
    t0 = time.monotonic()
    free_before = ray_session.available_resources().get("CPU", 0)
    summary = run(TINY_TUNE, tiny_train(), "unet", tiny_shards, out)
    summary["test_s"] = time.monotonic() - t0
    summary["free_cpus"] = (free_before, ray_session.available_resources)
    return out, summary


@pytest.mark.slow
def test_a_four_trial_search_stops_one_early_and_keeps_the_best(search):
    out, summary = search
    rows = read_trials_csv((out / "trials.csv").read_text())
    assert len(rows) == 4 and summary["trials"] == 4
    early = [r for r in rows if r["stopped_early"] == "True"]
    assert early, f"ASHA stopped no trial: {rows}"
    assert all(int(r["stopped_at_epoch"]) < 3 and r["val_score@3"] == "" for r in early)
    done = [r for r in rows if r["status"] == "completed"]
    assert done and all(r["val_score@3"] != "" for r in done)
    best = max(done, key=lambda r: float(r["best_val_score"]))
    assert summary["best_trial"] == best["trial_id"] and summary["best_value"] == float(best["best_val_score"])
    # the first trial ran the current params (tune.include_current), the others sampled ones
    first = min(rows, key=lambda r: r["trial_id"])
    assert float(first["lr"]) == pytest.approx(tiny_train().lr, rel=1e-5)
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "history.tsv").read_text().count("\n") == 4  # header + 3 epochs
    # never more trials at once than concurrency (each trial's span from Tune's own result rows)
    spans = []
    for result in (out / ".searches" / summary["search"]).glob("trial_*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            spans.append((min(r["timestamp"] - r["time_total_s"] for r in rows), max(r["timestamp"] for r in rows)))
    assert len(spans) == 4
    most = max(sum(a < t + 1 < b for a, b in spans) for t, _ in spans)  # running a second after a start
    assert most <= TINY_TUNE.concurrency, spans
    # the trials stopped early gave their workers' CPUs back (Ray Train frees a killed run's placement
    # group through the state API; its cleaner looks once a second, and asks the dashboard, which is
    # slow to answer on a loaded host: one parallel run found a group still held after 30 s)
    before, available = summary["free_cpus"]
    assert cpus_come_back(available, before), "a stopped trial kept its workers' CPUs"


def cpus_come_back(available, before: float, timeout_s: float = 120) -> bool:
    """Whether the Ray's free CPUs (``available()``, Ray's available resources) are back to
    ``before`` within ``timeout_s``, waiting only while they are not."""
    deadline = time.monotonic() + timeout_s
    while available().get("CPU", 0) < before - 1e-6 and time.monotonic() < deadline:
        time.sleep(0.5)
    return available().get("CPU", 0) >= before - 1e-6


@pytest.mark.slow
def test_the_best_checkpoint_is_evaluable_and_best_yaml_retrains_it(search, tiny_shards, tmp_path):
    from segpipe.checkpoint import load_meta
    from segpipe.cli import main
    from segpipe.stages import evaluate
    from segpipe.stages.train import run as train_run

    out, summary = search
    meta = load_meta(out / "checkpoint")
    assert meta.arch == "unet" and meta.params["lr"] == pytest.approx(summary["best_params"]["lr"], rel=1e-5)
    evaluate.main(["--model", str(out / "checkpoint"), "--shards", str(tiny_shards), "--out", str(tmp_path / "eval")])
    assert "miou" in json.loads((tmp_path / "eval" / "metrics.json").read_text())

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {**{k: v for k, v in vars(tiny_train()).items()
                                                    if k not in ("scale_range", "val_detection")},
                                                "scale_range": [1.0, 1.0]}}))
    main(["params", "--params", str(params), "--merge", str(out / "best.yaml")])
    merged = load_section("train", params)
    trial = params_for(trial_params(tiny_train(), "unet", summary["best_params"]), "unet")
    # the same params, but for the one worker actor a trial trains in where the params say local mode
    assert replace(params_for(merged, "unet"), workers=1, overrides={}) == replace(trial, overrides={})
    result = train_run(merged, "unet", tiny_shards, tmp_path / "retrain")
    retrained = load_meta(tmp_path / "retrain" / "checkpoint")
    assert result["epochs"] == 3 and retrained.params["lr"] == meta.params["lr"]
    assert retrained.model_kwargs == meta.model_kwargs


def test_a_bad_space_is_refused_before_any_trial_starts(tiny_shards, tmp_path):
    from segpipe.stages.tune import run

    bad = TuneParams(space={"unet": {"lr": {"uniform": [-1.0, 0.1]}}})
    with pytest.raises(ParamsError, match=r"tune\.space\.unet\.lr"):
        run(bad, tiny_train(), "unet", tiny_shards, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # no experiment, no trial


@pytest.mark.slow
def test_a_killed_search_resumes_when_run_again(tiny_shards, tmp_path, ray_session):
    # both runs are `segpipe tune` commands on the session's Ray (RAY_ADDRESS, as on a cluster): the
    # killed one's trials end with it, and the rerun finds its search on disk
    params = tmp_path / "params.yaml"
    train = {k: v for k, v in vars(tiny_train()).items() if k not in ("scale_range", "val_detection")}
    params.write_text(yaml.safe_dump({"train": train, "tune": {
        "trials": 2, "concurrency": 1, "reduction_factor": 2, "space": {"unet": {"lr": {"loguniform": [1e-3, 1e-2]}}}}}))
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    free_before = ray_session.available_resources().get("CPU", 0)
    proc = subprocess.Popen([sys.executable, "-m", "segpipe", "tune", "--arch", "unet", "--shards", str(tiny_shards),
                             "--out", str(out), "--params", str(params)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not list(out.glob(".searches/*/runs/*/out/metrics.json")):  # the first trial completed
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no trial completed in time"
            time.sleep(1)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (out / "metrics.json").exists()  # killed before the search ended
    first = list(out.glob(".searches/*/runs/*/out/metrics.json"))
    done_at = {p: p.stat().st_mtime for p in first}
    rerun = subprocess.run([sys.executable, "-m", "segpipe", "tune", "--arch", "unet", "--shards", str(tiny_shards),
                            "--out", str(out), "--params", str(params)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "resuming the search" in rerun.stdout
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["resumed"] and summary["trials"] == 2
    runs = sorted(p.name for p in out.glob(".searches/*/runs/*"))
    assert len(runs) == 2 and len(list(out.glob(".searches/*"))) == 1  # the same search, not a new one
    assert all(p.stat().st_mtime == t for p, t in done_at.items())  # the completed trial did not run again
    assert {r["trial_id"] for r in read_trials_csv((out / "trials.csv").read_text())} == set(runs)
    # neither search kept the shared Ray's CPUs (see the test above)
    assert cpus_come_back(ray_session.available_resources, free_before)
