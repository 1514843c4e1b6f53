import dataclasses
import json

import numpy as np
import pytest

from segpipe.checkpoint import CheckpointError, load_meta, load_model
from segpipe.params import ParamsError, TrainParams
from segpipe.stages.train import (
    final_meta,
    history_tsv,
    lr_schedule,
    params_for,
    plan_cpus_per_worker,
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
    conf = validate(Fixed(), [batch], "semantic", ["a", "b", "c"], [], 255, torch.device("cpu"))
    assert conf.tolist() == [[0, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert val_score(conf, "semantic", ["a", "b", "c"], [], 255) == pytest.approx((0 + 2 / 3) / 2)


def test_validate_instance_renders_detections_like_evaluate():
    import torch

    class Detector(torch.nn.Module):  # one confident class-2 mask on the left column, one below threshold
        def forward(self, x):
            masks = torch.zeros(2, 1, *x.shape[2:])
            masks[0, 0, :, 0] = 1.0
            masks[1, 0] = 1.0
            return [{"scores": torch.tensor([0.9, 0.01]), "labels": torch.tensor([2, 1]), "masks": masks,
                     "boxes": torch.zeros(2, 4)}] * x.shape[0]

    sem = np.array([[[2, 0], [2, 2]]], dtype=np.uint8)  # 0 stuff, 2 thing
    batch = {"image": np.zeros((1, 2, 2, 3), np.uint8), "semantic": sem, "instance_map": np.zeros((1, 2, 2), np.int16),
             "instance_label": np.full((1, 4), -1, np.int32), "instance_crowd": np.zeros((1, 4), np.uint8)}
    names = ["soil", "pipe", "truck"]
    conf = validate(Detector(), [batch], "instance", names, [1, 2], 255, torch.device("cpu"))
    # rows/cols: pipe, truck, background; the 0.01 pipe detection is below the score threshold
    assert conf.tolist() == [[0, 0, 0], [0, 2, 1], [0, 0, 1]]
    assert val_score(conf, "instance", names, [1, 2], 255) == pytest.approx(2 / 3)  # pipe absent: skipped


def test_lr_schedule_warms_up_then_decays():
    f = lr_schedule(TrainParams(epochs=10, warmup_epochs=2))
    assert f(0) < f(1) < f(2) == pytest.approx(1.0)
    assert f(9) < f(5) < f(2) and f(20) == pytest.approx(0.05)


def test_final_meta_keeps_best_weights_meta_but_whole_run_history():
    best = {"epoch": 1, "metrics": {"val_score": 0.4}, "history": [{"epoch": 1}], "restarts": []}
    last = {"epoch": 3, "metrics": {"val_score": 0.3}, "history": [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}],
            "restarts": [{"resumed_from_epoch": 1}]}
    meta = final_meta(best, last)
    assert meta["epoch"] == 1 and meta["metrics"]["val_score"] == 0.4
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]
    assert meta["restarts"] == [{"resumed_from_epoch": 1}]


def test_history_tsv_columns():
    text = history_tsv([{"epoch": 1, "train_loss": 0.5, "val_score": None, "images_per_s": 3.0, "lr": 0.1}])
    assert text.splitlines() == ["epoch\ttrain_loss\tval_score\timages_per_s\tlr", "1\t0.5\t\t3.0\t0.1"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_two_workers_write_loadable_checkpoint(ray_local, tiny_shards, tmp_path):
    from segpipe.shards import manifest_hash, read_manifest
    from segpipe.stages.train import run

    p = TrainParams(epochs=2, batch_size=4, image_size=48, workers=2, cpus_per_worker=0.5, threads=1,
                    architectures=["fcn8s"], num_to_keep=1)
    summary = run(p, "fcn8s", tiny_shards, tmp_path / "out")
    assert summary["epochs"] == 2
    model, meta = load_model(tmp_path / "out" / "checkpoint", classes=read_manifest(tiny_shards)["classes"])
    assert meta["arch"] == "fcn8s" and meta["shards_manifest_sha256"] == manifest_hash(tiny_shards)
    assert meta["params"]["workers"] == 2
    rows = (tmp_path / "out" / "history.tsv").read_text().splitlines()
    assert len(rows) == 3
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["best_epoch"] in (1, 2)


@pytest.mark.slow
def test_ray_resumes_from_last_checkpoint_after_a_crash(ray_local, tiny_shards, tmp_path, capfd):
    from segpipe.stages.train import run

    p = TrainParams(epochs=3, batch_size=4, image_size=48, workers=1, cpus_per_worker=1.0, threads=1,
                    max_failures=1, fail_at_epoch=2, architectures=["unet"], model={"unet": {"base_channels": 8}})
    run(p, "unet", tiny_shards, tmp_path / "out")
    meta = load_meta(tmp_path / "out" / "checkpoint")
    # history survived the restart: epoch 1 (before the crash) was not retrained
    hist = [h["epoch"] for h in json.loads((tmp_path / "out" / "checkpoint" / "meta.json").read_text())["history"]]
    assert meta["restarts"] == [{"resumed_from_epoch": 1}]
    assert hist[:1] == [1] and sorted(set(hist)) == hist
    assert "resumed from the checkpoint of epoch 1" in capfd.readouterr().out


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
