import argparse
import dataclasses
from pathlib import Path

import pytest

from segpipe.cli import main as cli_main
from segpipe.params import (
    SECTIONS,
    ParamsError,
    SynthParams,
    TrainParams,
    add_params_arguments,
    check_all,
    from_args,
    load_section,
)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_repo_params_file_is_valid():
    loaded = check_all(REPO / "params.yaml")
    assert set(loaded) == set(SECTIONS)
    assert isinstance(loaded["train"], TrainParams)


def test_section_loads_typed_and_frozen(tmp_path):
    p = write(tmp_path, "synth:\n  images: 7\n  size: [32, 48]\n")
    s = load_section("synth", p)
    assert s == SynthParams(images=7, size=(32, 48))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.images = 3  # type: ignore[misc]


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "synth:\n  imagez: 7\n")
    with pytest.raises(ParamsError) as e:
        load_section("synth", p)
    assert "imagez" in str(e.value) and str(p) in str(e.value)


def test_wrong_type_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  epochs: three\n")
    with pytest.raises(ParamsError) as e:
        load_section("train", p)
    assert "train.epochs" in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("text, key", [
    ("synth:\n  size: [32]\n", "synth.size"),
    ("train:\n  use_gpu: 1\n", "train.use_gpu"),
    ("train:\n  architectures: unet\n", "train.architectures"),
    ("train:\n  lr: true\n", "train.lr"),
])
def test_shapes_and_bool_ints_rejected(tmp_path, text, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load_section(key.split(".")[0], write(tmp_path, text))


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ParamsError, match="trian"):
        load_section("train", write(tmp_path, "trian:\n  epochs: 1\n"))


def test_int_accepted_for_float(tmp_path):
    assert load_section("train", write(tmp_path, "train:\n  lr: 1\n")).lr == 1.0


def test_overrides_apply_validated(tmp_path):
    p = write(tmp_path, "train:\n  epochs: 2\n")
    t = load_section("train", p, ["train.epochs=5", "train.overrides.unet.epochs=9", "synth.images=3"])
    assert t.epochs == 5 and t.overrides == {"unet": {"epochs": 9}}
    with pytest.raises(ParamsError, match=r"train\.epochs"):
        load_section("train", p, ["train.epochs=abc"])
    with pytest.raises(ParamsError, match="nosuch"):
        load_section("train", p, ["train.nosuch=1"])
    with pytest.raises(ParamsError, match="section.key=value"):
        load_section("train", p, ["epochs"])
    with pytest.raises(ParamsError, match="bogus"):
        load_section("train", p, ["bogus.x=1"])


def test_stage_receives_only_its_section(tmp_path):
    p = write(tmp_path, "synth:\n  images: 3\ntrain:\n  epochs: 4\n")
    s = load_section("synth", p)
    assert not hasattr(s, "epochs")


def test_cli_reports_params_error(tmp_path, capsys):
    p = write(tmp_path, "synth:\n  imagez: 1\n")
    with pytest.raises(SystemExit) as e:
        cli_main(["params", "--params", str(p)])
    assert e.value.code == 2
    assert "imagez" in capsys.readouterr().err


def test_from_args_defaults_without_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ap = argparse.ArgumentParser()
    add_params_arguments(ap)
    args = ap.parse_args(["--set", "synth.images=5"])
    assert from_args(args, "synth").images == 5


def test_params_yaml_states_exactly_the_dataclass_defaults():
    """One source of defaults: params.yaml repeats them for users, and may not drift."""
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == set(SECTIONS)
    for name, cls in SECTIONS.items():
        assert set(raw[name]) == {f.name for f in dataclasses.fields(cls)}, f"{name}: params.yaml lists other keys"
        assert load_section(name, REPO / "params.yaml") == cls(), f"{name}: params.yaml differs from {cls.__name__}"


@pytest.mark.parametrize("text, key", [
    ("convert:\n  val_fraction: 2\n", "convert.val_fraction"),
    ("convert:\n  val_fraction: 0.6\n  test_fraction: 0.5\n", "convert.test_fraction"),
    ("train:\n  epochs: 0\n", "train.epochs"),
    ("train:\n  lr: 0\n", "train.lr"),
    ("train:\n  image_size: 16\n", "train.image_size"),
    ("train:\n  budget_s: -1\n", "train.budget_s"),
    ("train:\n  warmup: 1.0\n", "train.warmup"),
    ("train:\n  precision: fp8\n", "train.precision"),
    ("evaluate:\n  detection:\n    score_threshold: 1.5\n", "evaluate.detection.score_threshold"),
    ("predict:\n  overlap: 600\n", "predict.overlap"),
    ("synth:\n  images: 0\n", "synth.images"),
    ("retrain:\n  retries: -1\n", "retrain.retries"),
    ("ingest:\n  timeout_s: 0\n", "ingest.timeout_s"),
])
def test_ranges_are_checked_on_load_naming_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ParamsError) as e:
        load_section(key.split(".")[0], path)
    assert f"{path}: {key} = " in str(e.value)


def test_ranges_are_checked_for_per_architecture_overrides_and_set(tmp_path):
    from segpipe.stages.train import params_for

    with pytest.raises(ParamsError, match=r"train\.overrides\.unet\.budget_s = -5"):
        params_for(TrainParams(overrides={"unet": {"budget_s": -5}}), "unet")
    with pytest.raises(ParamsError, match=r"\(with --set\): convert\.val_fraction = 2"):
        load_section("convert", write(tmp_path, "convert: {}\n"), ["convert.val_fraction=2"])


def test_segpipe_params_rejects_out_of_range_values_and_non_mapping_sections(tmp_path, capsys):
    for text, needle in (("convert:\n  val_fraction: 2\n", "convert.val_fraction = 2"), ("train: 5\n", "'train' is 5")):
        with pytest.raises(SystemExit) as e:
            cli_main(["params", "--params", str(write(tmp_path, text))])
        assert e.value.code == 2 and needle in capsys.readouterr().err


def test_nested_sections_are_typed_and_range_checked(tmp_path):
    from segpipe.params import DetectionParams, FuseParams, FusionParams, PredictParams

    p = write(tmp_path, "fuse:\n  fusion:\n    stuff_min_area: 100\n")
    f = load_section("fuse", p)
    assert isinstance(f, FuseParams) and f.fusion == FusionParams(stuff_min_area=100)
    assert f.semantic_metric == "miou"  # the rest keep their defaults
    with pytest.raises(ParamsError, match=r"fuse\.fusion\.stuff_min_area = -1: must be >= 0") as err:
        load_section("fuse", p, ["fuse.fusion.stuff_min_area=-1"])
    assert str(p) in str(err.value)
    with pytest.raises(ParamsError, match=r"evaluate\.panoptic: unknown key\(s\) 'nope'"):
        load_section("evaluate", p, ["evaluate.panoptic.nope=1"])
    with pytest.raises(ParamsError, match=r"evaluate\.panoptic\.overlap_threshold = 1\.5"):
        load_section("evaluate", p, ["evaluate.panoptic.overlap_threshold=1.5"])
    # one dataclass, one set of defaults; predict's own default keeps only confident detections
    assert load_section("predict", p).detection == DetectionParams(score_threshold=0.5)
    assert load_section("train", p).val_detection == load_section("evaluate", p).detection == DetectionParams()
    assert PredictParams().fusion == FusionParams()
    with pytest.raises(ParamsError, match=r"evaluate\.panoptic: expected a mapping"):
        load_section("evaluate", write(tmp_path, "evaluate:\n  panoptic: 3\n"))


def test_boundary_ratio_default_is_the_metrics_modules():
    from segpipe.metrics.boundary import DEFAULT_RATIO
    from segpipe.params import EvaluateParams

    assert EvaluateParams().boundary_ratio == DEFAULT_RATIO
