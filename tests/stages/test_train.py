import contextlib
import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from segpipe.checkpoint import CheckpointError, load_meta, load_model
from segpipe.params import DetectionParams, ParamsError, TrainParams
from segpipe.stages.train import (
    FAIL_AT_EPOCH_ENV,
    SLIVER,
    Clock,
    InitFromError,
    KeptCheckpoint,
    Schedule,
    TrainError,
    checkpoint_score,
    choose_setting,
    class_weights,
    final_meta,
    history_tsv,
    init_from_key,
    init_model,
    keep_checkpoint,
    kept_checkpoints,
    model_kwargs_for,
    params_for,
    peak_lr_and_warmup,
    plan_cpus_per_worker,
    resolve_init_from,
    retained,
    run_fingerprint,
    steps_per_epoch,
    stop_cause,
    train_one_epoch,
    val_score,
    validate,
)


def test_params_for_applies_arch_overrides_validated():
    p = TrainParams(epochs=3, overrides={"unet": {"epochs": 7, "lr": 0.01}})
    assert params_for(p, "unet").epochs == 7 and params_for(p, "unet").lr == 0.01
    assert params_for(p, "fcn8s").epochs == 3
    with pytest.raises(ParamsError, match=r"overrides\.unet\.epochs"):
        params_for(TrainParams(overrides={"unet": {"epochs": "x"}}), "unet")
    with pytest.raises(ParamsError, match="nosuch"):
        params_for(TrainParams(overrides={"unet": {"nosuch": 1}}), "unet")
    with pytest.raises(ParamsError, match="architectures"):
        params_for(TrainParams(overrides={"unet": {"architectures": []}}), "unet")


def test_plan_cpus_leaves_room_for_ray_data():
    assert plan_cpus_per_worker(2, 1, 1.0) == 1.0
    assert plan_cpus_per_worker(2, 2, 1.0) == 0.75  # the 2-core hang: 2 x 1 CPU leaves data nothing
    assert plan_cpus_per_worker(16, 4, 2.0) == 2.0
    with pytest.raises(ValueError, match="do not fit"):
        plan_cpus_per_worker(1, 8, 1.0)


def test_validate_semantic_counts_every_labelled_pixel():
    import torch

    class Fixed(torch.nn.Module):  # predicts class 1 everywhere
        def forward(self, x):
            out = torch.zeros(x.shape[0], 3, *x.shape[2:])
            out[:, 1] = 1.0
            return out

    sem = np.array([[[0, 1], [1, 255]]], dtype=np.uint8)
    batch = {"image": np.zeros((1, 2, 2, 3), np.uint8), "semantic": sem, "instance_map": np.zeros((1, 2, 2), np.int16),
             "instance_label": np.full((1, 4), -1, np.int32), "instance_crowd": np.zeros((1, 4), np.uint8)}
    conf = validate(Fixed(), [batch], "semantic", ["a", "b", "c"], [], 255, torch.device("cpu"), DetectionParams())
    assert conf.tolist() == [[0, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert val_score(conf, "semantic", ["a", "b", "c"], [], 255) == pytest.approx((0 + 2 / 3) / 2)


def test_validate_instance_renders_detections_like_evaluate():
    import torch

    class Detector(torch.nn.Module):  # one confident class-2 mask on the left column, one below threshold
        def predict_instances(self, x, score_threshold, mask_threshold, max_detections):
            masks = torch.zeros(2, 1, *x.shape[2:])
            masks[0, 0, :, 0] = 1.0
            masks[1, 0] = 1.0
            return [{"scores": torch.tensor([0.9, 0.01]), "labels": torch.tensor([2, 1]), "masks": masks,
                     "boxes": torch.zeros(2, 4)}] * x.shape[0]

    sem = np.array([[[2, 0], [2, 2]]], dtype=np.uint8)  # 0 stuff, 2 thing
    batch = {"image": np.zeros((1, 2, 2, 3), np.uint8), "semantic": sem, "instance_map": np.zeros((1, 2, 2), np.int16),
             "instance_label": np.full((1, 4), -1, np.int32), "instance_crowd": np.zeros((1, 4), np.uint8)}
    names = ["soil", "pipe", "truck"]
    conf = validate(Detector(), [batch], "instance", names, [1, 2], 255, torch.device("cpu"), DetectionParams())
    # rows/cols: pipe, truck, background; the 0.01 pipe detection is below the score threshold
    assert conf.tolist() == [[0, 0, 0], [0, 2, 1], [0, 0, 1]]
    assert val_score(conf, "instance", names, [1, 2], 255) == pytest.approx(2 / 3)  # pipe absent: skipped


def test_schedule_warms_up_then_decays_linearly_to_zero_at_the_budget():
    s = Schedule(budget_s=100.0, total_steps=0, warmup=0.1)
    assert s.progress(0, 0) == 0 and s.progress(50, 10**6) == 0.5 and s.progress(250, 0) == 1.0
    assert s.lr_factor(0.0) == 0.0 and s.lr_factor(0.05) == pytest.approx(0.5) and s.lr_factor(0.1) == 1.0
    assert s.lr_factor(0.55) == pytest.approx(0.5) and s.lr_factor(1.0) == 0.0
    # learning rate falls strictly after the warm-up, following the share of the budget spent
    factors = [s.lr_factor(s.progress(t, 0)) for t in range(10, 101, 10)]
    assert factors == sorted(factors, reverse=True) and factors[-1] == 0.0


def test_schedule_ends_at_whichever_limit_comes_first():
    s = Schedule(budget_s=100.0, total_steps=40, warmup=0.0)
    assert s.progress(10, 20) == 0.5  # steps are ahead of the clock
    assert s.progress(80, 20) == 0.8  # the clock is ahead of the steps
    assert Schedule(budget_s=0.0, total_steps=40).progress(10**6, 10) == 0.25  # no budget: steps only
    assert steps_per_epoch(rows=100, batch_size=8, workers=1) == 13
    assert steps_per_epoch(rows=100, batch_size=8, workers=2) == 7  # 50 rows each


class FakeClock(Clock):
    """One second passes per optimizer step."""

    def elapsed(self) -> float:
        return float(self.steps)


def tiny_batches(n: int):
    for _ in range(n):
        yield {"image": np.zeros((2, 8, 8, 3), np.uint8), "semantic": np.zeros((2, 8, 8), np.uint8),
               "instance_map": np.zeros((2, 8, 8), np.int16), "instance_label": np.full((2, 4), -1, np.int32),
               "instance_crowd": np.zeros((2, 4), np.uint8)}


def test_train_one_epoch_stops_when_the_budget_is_spent_and_follows_the_schedule():
    import torch

    from segpipe.models import build_model

    model = build_model("unet", 3, base_channels=2, depth=1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    lrs = []
    opt.step = (lambda step: lambda *a, **k: (lrs.append(opt.param_groups[0]["lr"]), step(*a, **k))[1])(opt.step)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    clock, schedule = FakeClock(), Schedule(budget_s=5.0, total_steps=0, warmup=0.2)
    stats = train_one_epoch(model, tiny_batches(50), opt, scaler, torch.device("cpu"), "fp32", schedule, clock,
                            base_lr=1.0)
    assert stats["stopped"] and stats["steps"] == 5 and clock.steps == 5  # 1 s a step, 5 s budget
    assert lrs == pytest.approx([0.0, 1.0, 0.75, 0.5, 0.25])  # warm-up over 1 s, then linear to 0 at 5 s
    # a new epoch of a finished schedule takes no step
    again = train_one_epoch(model, tiny_batches(50), opt, scaler, torch.device("cpu"), "fp32", schedule, clock, 1.0)
    assert again["steps"] == 0 and again["stopped"]


def test_train_one_epoch_without_budget_runs_the_whole_epoch():
    import torch

    from segpipe.models import build_model

    model = build_model("unet", 3, base_channels=2, depth=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = train_one_epoch(model, tiny_batches(4), opt, torch.amp.GradScaler("cpu", enabled=False),
                            torch.device("cpu"), "fp32", Schedule(0.0, total_steps=8), FakeClock(), 1e-3)
    assert stats["steps"] == 4 and not stats["stopped"] and stats["images"] == 8


def test_an_explicit_precision_skips_the_trial(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    meta = {"num_classes": 3, "thing_ids": [2], "ignore_index": 255, "model_kwargs": {"base_channels": 2, "depth": 1}}
    never = lambda *a, **k: pytest.fail("timed a trial")  # noqa: E731
    for precision, cl, expected in (("fp32", "auto", "fp32"), ("fp32", True, "fp32+channels_last"),
                                    ("bf16", "auto", "bf16+channels_last")):  # unet: ModelSpec.channels_last
        if precision == "bf16":
            monkeypatch.setattr("segpipe.precision.cpu_supports_bf16", lambda: True)
        p = TrainParams(precision=precision, channels_last=cl, batch_size=2, image_size=32)
        setting, record = choose_setting(p, "unet", meta, torch_cpu(), measure=never)
        assert setting.name == expected and record == {"choice": expected, "source": "explicit"}
    with pytest.raises(ParamsError, match="train.precision.*fp16.*CUDA"):
        choose_setting(TrainParams(precision="fp16"), "unet", meta, torch_cpu(), measure=never)
    with pytest.raises(ParamsError, match="channels_last.*auto, true or false"):
        TrainParams(channels_last="sometimes")
    assert not list(tmp_path.iterdir())  # nothing cached


def torch_cpu():
    import torch

    return torch.device("cpu")


def test_precision_auto_is_measured_once_per_host_then_cached(monkeypatch, tmp_path):
    """The second call finds the first one's trial in the cache and times nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("segpipe.precision.cpu_supports_bf16", lambda: True)
    meta = {"num_classes": 3, "thing_ids": [2], "ignore_index": 255, "model_kwargs": {"base_channels": 2, "depth": 1}}
    calls = []

    def measure(build, p, batch, settings):
        calls.append([s.name for s in settings])
        images, targets = batch
        assert tuple(images.shape) == (p.batch_size, 3, 32, 32) and len(targets) == p.batch_size  # the run's
        return {s: {"bf16+channels_last": 30.0}.get(s.name, 10.0) for s in settings}

    p = TrainParams(batch_size=2, image_size=32)
    import torch

    before = torch.random.get_rng_state()
    setting, record = choose_setting(p, "unet", meta, torch_cpu(), measure=measure)
    assert torch.equal(torch.random.get_rng_state(), before)  # the model's initialisation is not disturbed
    assert setting.name == "bf16+channels_last" and record["source"] == "trial"
    assert calls == [["fp32", "fp32+channels_last", "bf16", "bf16+channels_last"]]
    assert record["rates"]["fp32"] == 10.0
    again, cached = choose_setting(p, "unet", meta, torch_cpu(), measure=measure)
    assert again == setting and cached["source"] == "cache" and cached["rates"] == record["rates"] and len(calls) == 1
    # another batch size is another question
    choose_setting(TrainParams(batch_size=4, image_size=32), "unet", meta, torch_cpu(), measure=measure)
    assert len(calls) == 2
    assert (tmp_path / "segpipe" / "precision.json").is_file()


def test_the_timed_trial_runs_real_training_steps():
    from segpipe.data import collate_targets, synthetic_batch
    from segpipe.models import build_model
    from segpipe.precision import Setting
    from segpipe.stages.train import time_settings

    batch = collate_targets(synthetic_batch(2, 32, 3, [2], 255))
    settings = [Setting("fp32", False), Setting("fp32", True)]
    rates = time_settings(lambda: build_model("unet", 3, base_channels=2, depth=1), TrainParams(), batch, settings)
    assert list(rates) == settings and all(r > 0 for r in rates.values())


def test_a_setting_whose_loss_overflows_is_rated_zero():
    import torch

    from segpipe.precision import Setting
    from segpipe.stages.train import time_settings

    class Overflows(torch.nn.Module):  # a finite loss in fp32, inf under autocast
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, images, targets):
            scale = float("inf") if torch.is_autocast_enabled("cpu") else 1.0
            return {"loss": (self.w * images).mean() * scale}

    batch = (torch.ones(2, 3, 4, 4), [{}, {}])
    rates = time_settings(Overflows, TrainParams(), batch, [Setting("fp32", False), Setting("bf16", False)])
    assert rates[Setting("bf16", False)] == 0.0 and rates[Setting("fp32", False)] > 0


def test_class_weights_favour_rare_classes_and_leave_absent_ones_neutral():
    w = class_weights([900, 100, 25, 0])
    # the median frequency of the present classes is 100's: sqrt(100 / count)
    assert w == pytest.approx([1 / 3, 1.0, 2.0, 1.0], abs=1e-4)
    assert class_weights([0, 0]) == [1.0, 1.0]


def test_model_kwargs_carry_class_weights_from_the_train_split(tiny_shards):
    from segpipe.shards import open_shards

    shards = open_shards(tiny_shards)
    kw = model_kwargs_for(TrainParams(), "unet", shards)
    assert kw["class_weights"] == class_weights(shards.class_pixels["train"])
    assert model_kwargs_for(TrainParams(class_weighting="none"), "unet", shards)["class_weights"] is None
    assert "class_weights" not in model_kwargs_for(TrainParams(), "mask_rcnn", shards)


def test_fingerprint_changes_with_params_data_code_and_parent():
    base = run_fingerprint({"lr": 1}, "data", "code")
    assert base == run_fingerprint({"lr": 1}, "data", "code")
    assert len({base, run_fingerprint({"lr": 2}, "data", "code"), run_fingerprint({"lr": 1}, "other", "code"),
                run_fingerprint({"lr": 1}, "data", "other"), run_fingerprint({"lr": 1}, "data", "code", "a" * 64),
                run_fingerprint({"lr": 1}, "data", "code", "b" * 64)}) == 6


def test_final_meta_keeps_best_weights_meta_but_whole_run_history():
    best = {"epoch": 1, "metrics": {"val_score": 0.4}, "history": [{"epoch": 1}], "restarts": []}
    last = {"epoch": 3, "metrics": {"val_score": 0.3}, "history": [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}],
            "restarts": [{"resumed_from_epoch": 1}], "run": {"epochs": 3, "stopped_by": "epochs"}}
    meta = final_meta(best, last, budget_s=0, epochs=3)
    assert meta["epoch"] == 1 and meta["metrics"]["val_score"] == 0.4
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]
    assert meta["restarts"] == [{"resumed_from_epoch": 1}]
    assert meta["run"] == {"epochs": 3, "stopped_by": "epochs"}


def test_stop_cause_is_the_budget_when_the_last_checkpoint_was_written_before_it_ran_out():
    # the last epoch's validation and checkpoint used the budget up after the workers decided to go on
    assert stop_cause({"epochs": 18, "stopped_by": None}, budget_s=6.0, epochs=1000) == "budget"
    assert stop_cause({"epochs": 18, "stopped_by": "epochs"}, budget_s=6.0, epochs=1000) == "epochs"
    assert stop_cause({"epochs": 3, "stopped_by": None}, budget_s=0, epochs=3) == "epochs"
    assert stop_cause({"epochs": 2, "stopped_by": None}, budget_s=0, epochs=3) == "epochs"


def test_startup_phases_account_for_the_time_outside_the_epoch_loop():
    from segpipe.stages.train import startup_phases

    marks = {"run": 101.0, "verified": 101.5, "connected": 102.0, "planned": 104.0, "dataset": 104.25, "end": 120.0}
    progress = {"loop_started_at": 105.0, "reported_at": 119.0, "first_batch_s": 0.75, "elapsed_s": 14.0}
    phases = startup_phases(100.0, marks, progress)
    assert phases == {"imports_s": 1.0, "shards_s": 0.5, "ray_connect_s": 0.5, "plan_s": 2.0, "dataset_s": 0.25,
                      "trainer_s": 0.75, "finish_s": 1.0, "first_batch_s": 0.75}
    # everything but the epoch loop is start-up: the phases add up to wall - train_s
    wall = marks["end"] - 100.0
    assert sum(v for k, v in phases.items() if k != "first_batch_s") == wall - progress["elapsed_s"]


def test_a_resumed_run_counts_only_its_own_epoch_loop_against_its_start_up():
    from segpipe.stages.train import earlier_processes_s

    assert earlier_processes_s(()) == 0.0  # a run this process started
    # a worker failure restarts in the same process: its epoch loop is this process's own
    assert earlier_processes_s([{"resumed_from_epoch": 2, "after": "worker failure", "elapsed_s": 9.0}]) == 0.0
    # a killed run picked up here, then a worker failure: the killed process had trained 30.2 s
    restarts = [{"resumed_from_epoch": 1, "after": "interrupted run", "elapsed_s": 30.2},
                {"resumed_from_epoch": 3, "after": "worker failure", "elapsed_s": 41.0}]
    assert earlier_processes_s(restarts) == 30.2
    # killed twice: only the last pick-up is this process's
    assert earlier_processes_s([*restarts, {"resumed_from_epoch": 4, "after": "interrupted run",
                                            "elapsed_s": 50.5}]) == 50.5


def test_history_tsv_columns():
    text = history_tsv([{"epoch": 1, "steps": 4, "elapsed_s": 2.5, "train_loss": 0.5, "val_score": None,
                         "images_per_s": 3.0, "lr": 0.1}])
    assert text.splitlines() == ["epoch\tsteps\telapsed_s\ttrain_loss\tval_score\timages_per_s\tlr",
                                 "1\t4\t2.5\t0.5\t\t3.0\t0.1"]


@pytest.mark.slow
def test_ray_two_workers_write_loadable_checkpoint(ray_session, tiny_shards, tmp_path):
    from segpipe.shards import open_shards
    from segpipe.stages.train import run

    p = TrainParams(epochs=2, budget_s=0, batch_size=4, image_size=48, workers=2, cpus_per_worker=0.5, threads=1,
                    architectures=["fcn8s"], num_to_keep=1, overrides={})
    summary = run(p, "fcn8s", tiny_shards, tmp_path / "out")
    assert summary["epochs"] == 2 and summary["stopped_by"] == "epochs"
    shards = open_shards(tiny_shards)
    model, meta = load_model(tmp_path / "out" / "checkpoint", classes=list(shards.classes))
    assert meta.arch == "fcn8s" and meta.shards_manifest_sha256 == shards.manifest_sha256
    assert meta.params["workers"] == 2 and len(meta.worker_nodes) == 2
    # the checkpoint records what was run: 2 epochs of 2 steps (12 train rows / 2 workers / batch 4)
    assert meta.run["epochs"] == 2 and meta.run["steps"] == 2 * steps_per_epoch(shards.rows("train"), 4, 2)
    rows = (tmp_path / "out" / "history.tsv").read_text().splitlines()
    assert len(rows) == 3
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["best_epoch"] in (1, 2)


@pytest.mark.slow
def test_ray_budget_stops_training_and_metrics_split_startup_from_training(ray_session, tiny_shards, tmp_path):
    from segpipe.stages.train import run

    p = TrainParams(epochs=1000, budget_s=6.0, batch_size=4, image_size=48, threads=1, architectures=["unet"],
                    model={"unet": {"base_channels": 4, "depth": 2}}, overrides={})
    summary = run(p, "unet", tiny_shards, tmp_path / "out")
    assert summary["stopped_by"] == "budget" and summary["epochs"] < 1000
    # the last checkpoint is written when the budget is (nearly) used: an epoch is not started for a
    # sliver of it (less than SLIVER of an epoch's time; an epoch is long on a loaded host)
    meta = load_meta(tmp_path / "out" / "checkpoint")
    ends = [0.0, *(h["elapsed_s"] for h in meta.history)]
    longest = max(b - a for a, b in zip(ends, ends[1:]))
    assert 6.0 - max(0.3 * 6.0, SLIVER * longest) - 0.2 <= summary["train_s"] < 60 and summary["startup_s"] > 0
    assert summary["wall_s"] == pytest.approx(summary["train_s"] + summary["startup_s"], abs=0.2)
    assert meta.run["stopped_by"] == "budget" and meta.run["steps"] == summary["steps"] > 0
    # decayed with the budget: the last epoch's steps started after the epoch before it ended, so
    # the last rate is at most the schedule's at that time (the history's times are rounded to 10 ms),
    # and the sliver rule above makes that time late in the budget. A bound by the clock, not by a
    # share of the peak: on a loaded host one step and a validation took 0.8 s of a 6-s budget, and
    # a fixed 10% of the peak failed (0.1005)
    schedule = Schedule(p.budget_s, 0, p.warmup)
    at_most = p.lr * schedule.lr_factor(max(p.warmup, schedule.progress(ends[-2] - 0.005, 0)))  # the peak: warm-up's end
    assert meta.history[-1]["lr"] <= at_most + 1e-12, (ends, meta.history[-1])
    assert not (tmp_path / ".ray_results").exists() or not any((tmp_path / ".ray_results").iterdir())


def test_checkpoint_with_other_class_table_is_refused(tmp_path):
    import torch

    from segpipe.checkpoint import save_checkpoint

    model = torch.nn.Conv2d(3, 2, 1)
    meta = {"arch": "fcn8s", "num_classes": 2, "classes": [{"id": 0, "name": "soil"}, {"id": 1, "name": "truck"}]}
    save_checkpoint(tmp_path / "ck", model, meta)
    with pytest.raises(CheckpointError, match="class table differs.*truck"):
        load_model(tmp_path / "ck", classes=[{"id": 0, "name": "soil"}, {"id": 1, "name": "excavator"}])


def test_train_params_dataclass_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainParams().epochs = 3  # type: ignore[misc]


def _flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("fault", ["flipped byte", "truncated", "deleted"])
def test_train_refuses_corrupt_truncated_or_missing_shards_naming_the_file(tiny_shards, tmp_path, capsys, split, fault):
    """A bad shard stops `segpipe train` before Ray starts, with one line naming the file."""
    import os
    import shutil

    from segpipe.cli import main as cli_main

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    shard = sorted((shards / split).glob("*.parquet"))[0]
    stat = shard.stat()
    if fault == "flipped byte":  # in place, keeping size and mtime: what DVC's status does not notice
        _flip_byte(shard, stat.st_size // 2)
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    elif fault == "truncated":
        shard.write_bytes(shard.read_bytes()[: stat.st_size // 2])
    else:
        shard.unlink()
    (tmp_path / "defaults.yaml").write_text("{}\n")
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--arch", "unet", "--shards", str(shards), "--out", str(tmp_path / "out"),
                  "--params", str(tmp_path / "defaults.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1, err
    assert str(shard.relative_to(shards)) in err[0] and ("checksum" in err[0] or "missing" in err[0])
    assert "Traceback" not in err[0] and not (tmp_path / "out").exists()


def test_prune_keeps_complete_checkpoints_only(tmp_path):
    import torch

    from segpipe.checkpoint import save_checkpoint
    from segpipe.stages.train import prune_incomplete_checkpoints

    model = torch.nn.Conv2d(3, 2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_c"):
        save_checkpoint(tmp_path / name, model, {"arch": "x", "epoch": 1}, optimizer=opt)
    (tmp_path / "checkpoint_b" / "model.safetensors").write_bytes(b"")  # cut short by a full disk
    (tmp_path / "checkpoint_c" / "meta.json").write_text('{"arch": ')  # truncated
    (tmp_path / "checkpoint_tmp_d").mkdir()  # a copy that never finished
    removed = prune_incomplete_checkpoints(tmp_path)
    assert sorted(p.name for p in removed) == ["checkpoint_b", "checkpoint_c", "checkpoint_tmp_d"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_a"]


def kept_count(runs: Path) -> int:
    """Complete checkpoints a local-mode run (train.workers: 0) has kept in its run folder."""
    return sum(len(kept_checkpoints(str(d))) for d in runs.glob("unet-*"))


@pytest.mark.slow
def test_rerun_after_a_killed_train_resumes_only_with_identical_inputs(tiny_shards, tmp_path, ray_session):
    """`dvc repro` killed mid-train: the rerun with the same params, data and code resumes from the
    killed run's newest complete checkpoint and records it; other params start afresh. The default
    local mode (train.workers: 0) keeps these checkpoints itself, in the same run folder. The stages
    join the session's Ray, as `make pipeline`'s do (`segpipe with-ray dvc repro`): Ray outlives
    the killed stage and ends what it ran for it."""
    import subprocess
    import sys
    import time

    import psutil

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: 40\n  budget_s: 0\n  batch_size: 4\n  image_size: 32\n  threads: 1\n"
                      "  architectures: [unet]\n  overrides: {}\n  model: {unet: {base_channels: 4, depth: 2}}\n")
    out = tmp_path / "models" / "unet"
    cmd = [sys.executable, "-m", "segpipe", "train", "--arch", "unet", "--shards", str(tiny_shards), "--out", str(out),
           "--params", str(params)]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    runs = tmp_path / "models" / ".ray_results"
    deadline = time.monotonic() + 240
    while kept_count(runs) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:  # SIGKILL, like an OOM killer or a killed dvc: nothing gets to clean up
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = load_meta(out / "checkpoint")
    assert [r.get("after") for r in meta.restarts] == ["interrupted run"], meta.restarts
    # start-up is this process's wall time less its own epoch loop, not less the killed one's too
    # (which once gave a negative start-up)
    metrics = json.loads((out / "metrics.json").read_text())
    earlier = meta.restarts[0]["elapsed_s"]
    assert 0 < earlier < metrics["train_s"]
    assert metrics["startup_s"] == pytest.approx(metrics["wall_s"] - (metrics["train_s"] - earlier), abs=0.15)
    assert metrics["startup_s"] > 0
    assert meta.restarts[0]["resumed_from_epoch"] >= 1 and "after a interrupted run" in done.stdout
    assert [h["epoch"] for h in meta.history] == list(range(1, 41))  # no epoch trained twice
    assert not list(runs.glob("unet-*"))  # a finished run leaves nothing to resume
    # other inputs: a fresh run, not a resume of anything
    params.write_text(params.read_text().replace("epochs: 40", "epochs: 2"))
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and load_meta(out / "checkpoint").restarts == ()


@pytest.mark.parametrize("where, value, message", [
    ("storage", "ftp://host/ray", "train.storage_path: unsupported scheme 'ftp' in 'ftp://host/ray'"),
    ("out", "s3:/bucket/unet", "--out: 's3:/bucket/unet' is not a URI"),
    ("shards", "hdfs://nn/shards", "--shards: unsupported scheme 'hdfs'"),
])
def test_train_refuses_unusable_locations_naming_them_before_ray_starts(tiny_shards, tmp_path, monkeypatch,
                                                                         where, value, message):
    from segpipe.stages import train
    from segpipe.storage import StorageError

    monkeypatch.chdir(tmp_path)
    from segpipe import cluster

    monkeypatch.setattr(cluster, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    p = TrainParams(storage_path=value if where == "storage" else "", architectures=["unet"], overrides={})
    with pytest.raises(StorageError, match=message.replace("(", r"\(")):
        train.run(p, "unet", value if where == "shards" else str(tiny_shards), value if where == "out" else "out")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- fine-tuning (train.init_from)

TINY_UNET = {"base_channels": 4, "depth": 2}


def parent_classes(shards) -> list[dict]:
    """The shards' class table in reverse id order, without 'worker' and with a 'crane' the data lacks."""
    names = [c["name"] for c in shards.classes if c["name"] != "worker"][::-1] + ["crane"]
    return [{"id": i, "name": n, "isthing": False} for i, n in enumerate(names)]


def write_parent(path: Path, classes: list[dict], arch: str = "unet", seed: int = 1, **kwargs) -> Path:
    import torch

    from segpipe.checkpoint import CheckpointMeta, save_checkpoint
    from segpipe.models import build_model, default_kwargs

    torch.manual_seed(seed)
    kwargs = kwargs or TINY_UNET
    model = build_model(arch, len(classes), **kwargs)
    meta = CheckpointMeta(arch=arch, num_classes=len(classes), classes=tuple(classes),
                          model_kwargs={**default_kwargs(arch), **kwargs}, epoch=1)
    return save_checkpoint(path, model, meta)


def test_finetuning_schedule_and_the_key_that_sets_init_from():
    p = TrainParams(lr=0.01, warmup=0.1, finetune_lr_scale=0.25, finetune_warmup=0.01)
    assert peak_lr_and_warmup(p, finetuning=False) == (0.01, 0.1)
    assert peak_lr_and_warmup(p, finetuning=True) == (0.0025, 0.01)
    with_override = TrainParams(overrides={"unet": {"init_from": "v2"}})
    assert init_from_key(with_override, "unet") == "train.overrides.unet.init_from"
    assert init_from_key(with_override, "fcn8s") == "train.init_from"
    assert params_for(with_override, "unet").init_from == "v2" and params_for(with_override, "fcn8s").init_from == ""


def test_init_model_matches_classes_by_name(tiny_shards, tmp_path):
    """Kept classes start from the parent's output rows (moved to their new ids), the new class
    keeps its fresh row, the class that is gone is dropped; every other tensor is the parent's."""
    import torch

    from segpipe.checkpoint import load_weights
    from segpipe.models import build_model
    from segpipe.shards import open_shards

    shards = open_shards(tiny_shards)
    classes = parent_classes(shards)
    parent = write_parent(tmp_path / "parent", classes)
    init = resolve_init_from(TrainParams(init_from=str(parent)), "unet", "train.init_from")
    torch.manual_seed(0)
    model = build_model("unet", shards.num_classes, **TINY_UNET)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_model(model, "unet", list(shards.classes), init)
    state, before = model.state_dict(), load_weights(parent)
    by_name = {c["name"]: c["id"] for c in classes}
    for c in shards.classes:
        row = state["classifier.weight"][c["id"]]
        expected = fresh["classifier.weight"][c["id"]] if c["name"] == "worker" else \
            before["classifier.weight"][by_name[c["name"]]]
        assert torch.equal(row, expected), c["name"]
    others = [k for k in state if not k.startswith("classifier.")]
    assert others and all(torch.equal(state[k], before[k]) for k in others)
    assert [c["name"] for c in report["added"]] == ["worker"] and [c["name"] for c in report["dropped"]] == ["crane"]
    assert len(report["kept"]) == shards.num_classes - 1 and report["remapped"] == 2


def test_init_from_errors_name_the_key_and_the_version(tiny_shards, tmp_path):
    from segpipe import registry
    from segpipe.shards import open_shards

    classes = parent_classes(open_shards(tiny_shards))
    reg = tmp_path / "registry"
    with pytest.raises(InitFromError, match=r"train.overrides.unet.init_from = 'champion': .*no 'champion' yet"):
        resolve_init_from(TrainParams(init_from="champion", registry=str(reg)), "unet", "train.overrides.unet.init_from")
    entry, _ = registry.register(reg, write_parent(tmp_path / "parent", classes))
    registry.set_alias(reg, "champion", entry["version"], "test")
    p = TrainParams(init_from="champion", registry=str(reg))
    init = resolve_init_from(p, "unet", "train.init_from")
    assert init.version == "v1" and init.sha256 == entry["checkpoint_sha256"] and init.registry == str(reg)
    assert init.parent() == {"ref": "champion", "version": "v1", "sha256": entry["checkpoint_sha256"], "arch": "unet",
                             "registry": str(reg)}
    with pytest.raises(InitFromError, match=r"train.init_from = 'champion' \(v1\): a unet model cannot initialise fcn8s"):
        resolve_init_from(p, "fcn8s", "train.init_from")
    with pytest.raises(InitFromError, match=r"train.init_from = 'v7': unknown version 'v7'"):
        resolve_init_from(TrainParams(init_from="v7", registry=str(reg)), "unet", "train.init_from")
    with pytest.raises(InitFromError, match=r"train.init_from = 'nowhere': .*neither an alias"):
        resolve_init_from(TrainParams(init_from="nowhere"), "unet", "train.init_from")
    unreadable = write_parent(tmp_path / "unreadable", classes)
    (unreadable / "meta.json").write_text('{"format": "segpipe-checkpoint/1", "arch": ')
    with pytest.raises(InitFromError, match=r"train.init_from = '.*unreadable': .*meta.json: not valid JSON"):
        resolve_init_from(TrainParams(init_from=str(unreadable)), "unet", "train.init_from")
    _flip_byte(reg / "v1" / "model.safetensors", 200)  # the registry's copy tampered with
    with pytest.raises(InitFromError, match=r"train.init_from = 'champion' \(v1\): .*v1/model.safetensors: sha256 .* "
                                            r"does not match the registry"):
        resolve_init_from(p, "unet", "train.init_from")


def test_a_worker_refuses_weights_that_changed_after_the_driver_verified_them(tiny_shards, tmp_path):
    from segpipe.models import build_model
    from segpipe.shards import open_shards

    shards = open_shards(tiny_shards)
    parent = write_parent(tmp_path / "parent", parent_classes(shards))
    init = resolve_init_from(TrainParams(init_from=str(parent)), "unet", "train.overrides.unet.init_from")
    write_parent(parent, parent_classes(shards), seed=2)  # replaced in between
    with pytest.raises(InitFromError, match=r"train.overrides.unet.init_from = .*parent': .*sha256 .* does not match"):
        init_model(build_model("unet", shards.num_classes, **TINY_UNET), "unet", list(shards.classes), init)
    wider = write_parent(tmp_path / "wider", parent_classes(shards), base_channels=8, depth=2)
    init = resolve_init_from(TrainParams(init_from=str(wider)), "unet", "train.init_from")
    with pytest.raises(InitFromError, match=r"train.init_from = .*wider': .*parent shape .* != target shape"):
        init_model(build_model("unet", shards.num_classes, **TINY_UNET), "unet", list(shards.classes), init)


def tiny_params(**kw) -> TrainParams:
    base = {"epochs": 2, "budget_s": 0.0, "batch_size": 4, "image_size": 48, "threads": 1, "workers": 0,
            "precision": "fp32", "architectures": ["unet"], "model": {"unet": dict(TINY_UNET)}, "overrides": {}}
    return TrainParams(**{**base, **kw})


@pytest.mark.slow
def test_finetuning_from_a_registered_model_records_its_parent(ray_session, tiny_shards, tmp_path, monkeypatch):
    """A run fine-tuned from the champion (another class table: one class added, one gone) trains,
    records its parent, the transfer and the fine-tuning schedule, and has a lineage."""
    from segpipe import registry
    from segpipe.shards import open_shards
    from segpipe.stages.train import run

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    reg = tmp_path / "registry"
    entry, _ = registry.register(reg, write_parent(tmp_path / "parent", parent_classes(open_shards(tiny_shards))))
    registry.set_alias(reg, "champion", "v1", "test")
    p = tiny_params(registry=str(reg), precision="auto", overrides={"unet": {"init_from": "champion"}})
    summary = run(p, "unet", tiny_shards, tmp_path / "out")
    meta = load_meta(tmp_path / "out" / "checkpoint")
    assert meta.parent == {"ref": "champion", "version": "v1", "sha256": entry["checkpoint_sha256"], "arch": "unet",
                           "registry": str(reg)}
    assert summary["parent"] == meta.parent
    transfer = meta.extra["transfer"]
    assert [c["name"] for c in transfer["added"]] == ["worker"] and [c["name"] for c in transfer["dropped"]] == ["crane"]
    assert meta.extra["lr_schedule"] == {"peak_lr": p.lr * p.finetune_lr_scale, "warmup": p.finetune_warmup}
    # the measured precision choice is recorded with the model and in metrics.json
    trial = meta.extra["precision_trial"]
    assert trial["source"] == "trial" and trial["choice"] == meta.precision + "+channels_last" * meta.extra["channels_last"]
    assert summary["precision_trial"] == trial and set(trial["rates"]) >= {"fp32", "fp32+channels_last"}
    assert [m["model"] for m in registry.lineage(tmp_path / "out" / "checkpoint", reg)] == \
        [str(tmp_path / "out" / "checkpoint"), "v1"]


# ----------------------------------------------------------------------------- local mode (train.workers: 0)


def test_retained_checkpoints_are_the_best_and_the_latest():
    kept = [KeptCheckpoint(f"checkpoint_{e:06d}", e, s) for e, s in ((1, 0.2), (2, 0.5), (3, 0.4), (4, 0.1))]
    assert [k.epoch for k in retained(kept, 2)] == [2, 3, 4]
    assert [k.epoch for k in retained(kept, 1)] == [2, 4]
    assert [k.epoch for k in retained(kept[:2], 5)] == [1, 2]
    assert checkpoint_score({"val_score": 0.3, "train_loss": 2.0}) == 0.3
    assert checkpoint_score({"val_score": None, "train_loss": 2.0}) == -2.0


def test_local_mode_keeps_its_own_checkpoints_whole(tmp_path):
    import torch

    from segpipe.checkpoint import save_checkpoint

    model = torch.nn.Conv2d(3, 2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_dir = tmp_path / "runs" / "unet-0123"
    for epoch, score in ((1, 0.1), (2, 0.3), (3, 0.2)):
        src = save_checkpoint(tmp_path / f"src{epoch}", model, {"arch": "unet", "epoch": epoch, "metrics": {
            "val_score": score, "train_loss": 1.0}}, optimizer=opt)
        keep_checkpoint(str(run_dir), src, epoch, num_to_keep=1)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_000002", "checkpoint_000003"]
    (run_dir / "checkpoint_000003" / "train_state.safetensors").write_bytes(b"")  # cut short by a full disk
    assert [(k.name, k.score) for k in kept_checkpoints(str(run_dir))] == [("checkpoint_000002", 0.3)]


@pytest.mark.slow
def test_local_mode_and_a_worker_actor_train_the_same_model(ray_session, tiny_shards, tmp_path):
    """One training function, one code path: a fixed seed and epoch count give bit-identical weights
    in the driver (workers: 0) and in one worker actor (workers: 1).

    The data are made deterministic here: crops as large as the 64 px images and no flips. With
    random crops or flips the two runs differ, and so would two runs of the same mode: Ray Data's
    map tasks draw augmentation from a fresh, unseeded generator per batch.
    """
    from segpipe.files import sha256_file
    from segpipe.shards import open_shards
    from segpipe.stages.train import run

    rows = open_shards(tiny_shards).rows("train")
    weights = {}
    for workers in (0, 1):
        out = tmp_path / f"out{workers}"
        run(tiny_params(workers=workers, image_size=64, hflip=False), "unet", tiny_shards, out)
        weights[workers] = sha256_file(out / "checkpoint" / "model.safetensors")
        assert load_meta(out / "checkpoint").run["steps"] == 2 * steps_per_epoch(rows, 4, 1)
    assert weights[0] == weights[1]


@pytest.mark.slow
def test_local_mode_keeps_and_resumes_its_checkpoints_on_an_object_store(ray_session, s3, tiny_shards, tmp_path,
                                                                          monkeypatch):
    """Local mode has no restarts within a run: the failure ends the command, and the rerun with the
    same inputs resumes from the checkpoint the failed run kept in its run folder, here on S3.

    The one proof that a failed local-mode run resumes (it carries what the local-disk variant,
    merged into it, proved; the local-disk run folder is proven by the killed-train test above)."""
    from segpipe.stages.train import run

    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "2")
    p = tiny_params(epochs=3, storage_path=s3.uri("ray"))
    with pytest.raises(TrainError, match=r"\[unet\] training failed: RuntimeError: \[unet\] injected failure at epoch 2"):
        run(p, "unet", tiny_shards, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (run_name,) = {k.split("/")[0] for k in s3.files("ray")}
    assert [k.epoch for k in kept_checkpoints(s3.uri("ray", run_name))] == [1]
    assert {"checkpoint_000001/meta.json", "checkpoint_000001/train_state.safetensors"} <= set(
        s3.files(f"ray/{run_name}"))
    summary = run(p, "unet", tiny_shards, tmp_path / "out")
    meta = load_meta(tmp_path / "out" / "checkpoint")
    assert [(r["resumed_from_epoch"], r["after"]) for r in meta.restarts] == [(1, "interrupted run")]
    assert [h["epoch"] for h in meta.history] == [1, 2, 3] and summary["epochs"] == 3  # epoch 1 not retrained
    assert s3.files("ray") == []  # a finished run leaves nothing to resume
