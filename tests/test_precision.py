import json

import pytest

from segpipe.params import ParamsError
from segpipe.precision import (
    Setting,
    cache_path,
    candidates,
    check_precision,
    host_description,
    pick_fastest,
    read_cached,
    trial_key,
    write_cached,
)

FP32, FP32_CL, BF16, BF16_CL = Setting("fp32", False), Setting("fp32", True), Setting("bf16", False), Setting("bf16", True)


def names(settings):
    return [s.name for s in settings]


def test_auto_tries_fp32_and_every_mixed_precision_the_device_runs_in_both_layouts():
    assert names(candidates("auto", "auto", "cpu", True, False, False)) == [
        "fp32", "fp32+channels_last", "bf16", "bf16+channels_last"]
    assert names(candidates("auto", "auto", "cpu", False, False, True)) == ["fp32", "fp32+channels_last"]
    assert names(candidates("auto", False, "cuda", False, True, True)) == ["fp32", "fp16", "bf16"]
    assert names(candidates("auto", True, "cpu", True, False, False)) == ["fp32+channels_last", "bf16+channels_last"]


def test_an_explicit_precision_is_one_candidate_and_is_checked():
    # channels_last auto with an explicit precision: the architecture's flag, under mixed precision only
    assert candidates("bf16", "auto", "cpu", True, False, True) == [BF16_CL]
    assert candidates("bf16", "auto", "cpu", True, False, False) == [BF16]
    assert candidates("fp32", "auto", "cpu", True, False, True) == [FP32]
    assert candidates("fp16", False, "cuda", False, False, True) == [Setting("fp16", False)]
    with pytest.raises(ParamsError, match=r"train.precision = 'fp16' needs a CUDA device"):
        candidates("fp16", "auto", "cpu", True, False, True)
    with pytest.raises(ParamsError, match=r"train.precision = 'bf16': this CPU has no native bf16"):
        check_precision("bf16", "cpu", cpu_bf16=False)
    check_precision("bf16", "cuda", cpu_bf16=False)  # the CPU's flags say nothing about a GPU


def test_the_fastest_wins_unless_a_simpler_setting_is_within_the_margin():
    assert pick_fastest({FP32: 50.0, FP32_CL: 45.0, BF16: 80.0, BF16_CL: 106.0}) == BF16_CL
    # bf16 + channels_last at 0.66x fp32: fp32 is chosen
    assert pick_fastest({FP32: 60.0, FP32_CL: 55.0, BF16: 50.0, BF16_CL: 40.0}) == FP32
    # 3% faster is noise on a shared host: the simpler setting stays
    assert pick_fastest({FP32: 100.0, FP32_CL: 101.0, BF16: 103.0, BF16_CL: 90.0}) == FP32
    assert pick_fastest({FP32: 100.0, BF16: 106.0}) == BF16
    assert pick_fastest({FP32: 100.0, FP32_CL: 102.0, BF16: 106.0}) == FP32_CL  # within 5% of the fastest
    assert pick_fastest({FP32: 100.0, BF16: 103.0}, margin=0.0) == BF16
    with pytest.raises(ValueError):
        pick_fastest({})


def test_settings_round_trip_through_their_names():
    for s in (FP32, FP32_CL, BF16, BF16_CL, Setting("fp16", True)):
        assert Setting.parse(s.name) == s
    with pytest.raises(ValueError):
        Setting.parse("fp8")


def test_the_cache_key_changes_with_what_changes_the_answer_only():
    args = dict(arch="unet", num_classes=12, model_kwargs={"base_channels": 32, "class_weights": [1.0, 2.0]},
                image_size=96, batch_size=16, threads=2, candidates=[FP32, BF16], host="cpu: x", torch_version="2.9")
    base = trial_key(**args)
    # the class weights are data facts (a new data version), not the network's shape
    assert trial_key(**{**args, "model_kwargs": {"base_channels": 32, "class_weights": [3.0, 1.0]}}) == base
    for change in ({"model_kwargs": {"base_channels": 16}}, {"num_classes": 13}, {"image_size": 128},
                   {"batch_size": 8}, {"threads": 1}, {"candidates": [FP32]}, {"host": "cpu: y"},
                   {"torch_version": "2.10"}, {"arch": "fcn8s"}):
        assert trial_key(**{**args, **change}) != base, change
    assert host_description("cpu").startswith("cpu: ")


def test_the_cache_survives_a_corrupt_or_foreign_file(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = cache_path()
    assert path == tmp_path / "segpipe" / "precision.json"
    assert read_cached(path, "k") is None
    write_cached(path, "k", {"choice": "bf16+channels_last", "rates": {"bf16+channels_last": 9.0}})
    write_cached(path, "j", {"choice": "fp32", "rates": {"fp32": 5.0}})
    assert read_cached(path, "k")["choice"] == "bf16+channels_last" and read_cached(path, "j")["choice"] == "fp32"
    assert "measured" in read_cached(path, "k")
    data = json.loads(path.read_text())
    data["entries"]["k"]["choice"] = "fp8"  # not a setting: measured again rather than trusted
    path.write_text(json.dumps(data))
    assert read_cached(path, "k") is None and read_cached(path, "j")["choice"] == "fp32"
    path.write_text("{not json")
    assert read_cached(path, "j") is None
    write_cached(path, "k", {"choice": "fp32", "rates": {}})  # a corrupt file is replaced, not a crash
    assert list(json.loads(path.read_text())["entries"]) == ["k"]
