"""segpipe drift: a re-lit drop drifts, a fresh sample of the same generator does not; the report
names every feature's value and threshold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from segpipe.commands import drift
from segpipe.params import DriftParams, SynthParams

FEATURES = ["width", "height", "brightness", "red", "green", "blue", "class_shares", "instances_per_image"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, Path]:
    """Reference shards of 24 generated 64 px scenes; drops of 24 new scenes: same site, and re-lit (0.6)."""
    from segpipe.formats.coco import read_collection
    from segpipe.params import ConvertParams
    from segpipe.stages import convert, synth

    root = tmp_path_factory.mktemp("drift")
    synth.run(SynthParams(images=24, size=(64, 64), seed=3, workers=1), root / "ref")
    convert.run(ConvertParams(workers=1, val_fraction=0.0), read_collection(root / "ref"), root / "shards",
                progress=False)
    synth.run(SynthParams(images=24, size=(64, 64), seed=9, workers=1), root / "fresh")
    synth.run(SynthParams(images=24, size=(64, 64), seed=9, workers=1, lighting=0.6), root / "relit")
    return {"shards": root / "shards", "fresh": root / "fresh", "relit": root / "relit"}


def test_a_relit_drop_drifts_and_a_fresh_sample_does_not(site):
    relit = drift.run(DriftParams(), site["shards"], site["relit"])
    assert list(relit["features"]) == FEATURES and relit["skipped"] == {
        "confidence": "no model (no champion in the registry, or --no-model)"}
    assert relit["drifted"] and set(relit["drifted_features"]) == {"brightness", "red", "green", "blue"}
    b = relit["features"]["brightness"]
    assert b["measure"] == "ks" and b["value"] > 0.8 and b["p_value"] < 1e-6 and b["threshold"] == 0.3
    assert b["input"] == pytest.approx(0.6 * b["reference"], rel=0.1)
    assert relit["features"]["red"]["measure"] == "psi" and relit["features"]["red"]["value"] > 1.0
    # the same scenes' labels: same generator, same site
    assert not relit["features"]["class_shares"]["drifted"] and not relit["features"]["instances_per_image"]["drifted"]
    assert relit["reference"]["images"] == relit["input"]["images"] == 24 and relit["input"]["masks"]

    fresh = drift.run(DriftParams(), site["shards"], site["fresh"])
    assert not fresh["drifted"] and fresh["drifted_features"] == []
    assert all(f["value"] < 0.5 * relit["features"][name]["value"] for name, f in fresh["features"].items()
               if name in ("brightness", "red", "green", "blue"))


def test_the_models_confidence_is_compared_when_there_is_a_model(site, tiny_checkpoint):
    model = tiny_checkpoint("unet", shards=site["shards"], base_channels=4, depth=2)
    report = drift.run(DriftParams(max_images=12), site["shards"], site["fresh"], model_ref=model)
    c = report["features"]["confidence"]
    assert c["measure"] == "ks" and 0 < c["reference"] <= 1 and 0 < c["input"] <= 1 and not c["drifted"]
    assert report["model"]["arch"] == "unet" and len(report["model"]["sha256"]) == 64
    assert report["reference"]["images"] == report["input"]["images"] == 12  # evenly spaced samples


def test_plain_images_compare_images_only(site, tmp_path):
    shutil.copytree(site["relit"] / "images", tmp_path / "drop")
    report = drift.run(DriftParams(), site["shards"], tmp_path / "drop")
    assert list(report["features"]) == FEATURES[:6] and report["drifted"]
    assert report["skipped"]["class_shares"] == "the drop has no labels (plain images)"
    assert report["input"] == {"path": str(tmp_path / "drop"), "images": 24, "files": 24, "labelled": False}


def test_compare_skips_what_cannot_be_compared():
    from segpipe.quality import image_stats

    rng = np.random.default_rng(0)
    images = [image_stats(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), 16) for _ in range(4)]
    ref = drift.Side(images=images, class_pixels=np.array([5, 5]), instances=[1, 2, 1, 2],
                     classes=[{"id": 0, "name": "a"}, {"id": 1, "name": "b"}], tiled=True)
    other = drift.Side(images=images, class_pixels=np.array([5, 5]), instances=[1, 2, 1, 2],
                       classes=[{"id": 0, "name": "a"}, {"id": 1, "name": "c"}])
    features, skipped = drift.compare(ref, other, DriftParams())
    assert skipped["width"].startswith("the reference shards are tiled")
    assert skipped["class_shares"] == skipped["instances_per_image"] == "the class tables differ (different names: 1: 'b' vs 'c')"
    assert set(features) == {"brightness", "red", "green", "blue"} and not any(f["drifted"] for f in features.values())


def test_cli_table_and_json(site, tmp_path, capsys, tiny_checkpoint):
    from segpipe.cli import main
    from segpipe.registry import register, set_alias

    registry = tmp_path / "registry"
    main(["drift", "--reference", str(site["shards"]), "--input", str(site["relit"]), "--json",
          str(tmp_path / "d.json"), "--registry", str(registry), "--set", "drift.thresholds.brightness=0.95"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["feature", "measure", "value", "threshold", "drifted"]
    assert next(line for line in out if line.startswith("brightness")).split()[3:5] == ["0.95", "no"]
    assert out[-1] == "drifted: red, green, blue"
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["features"]["brightness"]["threshold"] == 0.95 and "confidence" in report["skipped"]
    # with a champion in the registry, it is the model
    register(registry, tiny_checkpoint("unet", shards=site["shards"], base_channels=4, depth=2))
    set_alias(registry, "champion", "v1", "test")
    main(["drift", "--reference", str(site["shards"]), "--input", str(site["fresh"]), "--json", "--registry",
          str(registry), "--set", "drift.max_images=6"])
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["ref"] == "champion" and "confidence" in report["features"]
    main(["drift", "--reference", str(site["shards"]), "--input", str(site["fresh"]), "--json", "--registry",
          str(registry), "--no-model", "--set", "drift.max_images=6"])
    assert json.loads(capsys.readouterr().out)["model"] is None
    with pytest.raises(SystemExit) as e:
        main(["drift", "--reference", str(site["shards"]), "--input", str(site["fresh"]), "--split", "val"])
    assert e.value.code == 1 and "no split 'val'; splits: train" in capsys.readouterr().err
