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
