"""The real `dvc repro`, end to end, in a temporary copy of the repository on a tiny params override
(two architectures, 16 images, one epoch), checking every output and DVC's incremental behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent


def sh(cmd: list[str], cwd: Path, timeout: int = 900) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory, copy_repo) -> Path:
    root = tmp_path_factory.mktemp("repo")
    copy_repo(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["synth"].update(images=16, size=[64, 64])
    params["convert"].update(val_fraction=0.25)
    archs = ["unet", "mask_rcnn"]
    params["train"].update(architectures=archs, epochs=1, image_size=48, batch_size=4, threads=1)
    params["train"]["model"] = {a: {} for a in archs}
    params["train"]["overrides"] = {a: {} for a in archs}
    params["evaluate"].update(num_overlays=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], root)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], root)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], root)
    (root / "repro.log").write_text(sh(["dvc", "repro"], root))  # what the console showed
    return root


def params_of(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


@pytest.mark.slow
def test_repro_writes_every_output(tiny_repo):
    root = tiny_repo
    assert len(list((root / "data/raw/synth/images").glob("*.jpg"))) == 16
    manifest = json.loads((root / "data/shards/manifest.json").read_text())
    assert sum(manifest["splits"].values()) == 16 and manifest["quarantine"] == []
    for arch in ("unet", "mask_rcnn"):
        assert (root / f"models/train/{arch}/checkpoint/model.safetensors").is_file()
        history = (root / f"models/train/{arch}/history.tsv").read_text().splitlines()
        assert history[0].startswith("epoch") and len(history) == 2
        m = json.loads((root / f"models/eval/{arch}/metrics.json").read_text())
        assert m["arch"] == arch and 0 <= m["pixel_acc"] <= 1
        assert (root / f"models/eval/{arch}/confusion.csv").read_text().startswith("actual,predicted")
        assert len(list((root / f"models/eval/{arch}/overlays").glob("*.png"))) == 2
    assert "AP" in json.loads((root / "models/eval/mask_rcnn/metrics.json").read_text())["segm"]
    promotion = json.loads((root / "reports/promotion/promotion.json").read_text())
    assert {c["arch"] for c in promotion["candidates"]} == {"unet", "mask_rcnn"}
    # the fused pair: the best semantic (unet) and the best instance model (mask_rcnn), scored as panoptic
    fused = json.loads((root / "models/fused/metrics.json").read_text())
    assert fused["task"] == "panoptic" and "skipped" not in fused
    assert {k: v["arch"] for k, v in fused["checkpoints"].items()} == {"semantic": "unet", "instance": "mask_rcnn"}
    assert fused["fusion"]["stuff_min_area"] == params_of(root)["fuse"]["fusion"]["stuff_min_area"]
    assert fused["panoptic"]["pq"] is not None and 0 <= fused["panoptic"]["pq"] <= 1
    assert (root / "models/fused/per_class_pq.csv").read_text().startswith("class,pq")
    assert (root / "models/eval/unet/per_class_pq.csv").read_text() == "class,pq\n"
    assert promotion["panoptic"]["metric"] == "panoptic.pq"
    assert [c["arch"] for c in promotion["panoptic"]["candidates"]] == ["fused"]
    summary = (root / "reports/summary.md").read_text()
    assert "| unet |" in summary and "| mask_rcnn |" in summary and "Promotion" in summary
    assert "## Panoptic quality" in summary and "| fused: unet + mask_rcnn |" in summary
    page = (root / "reports/index.html").read_text()
    assert "<title>segpipe report</title>" in page and 'src="http' not in page and "<script" not in page
    assert "<td>unet</td>" in page and "<td>mask_rcnn</td>" in page and "fused: unet + mask_rcnn" in page
    ending = (root / "reports/ending.txt").read_text()
    assert ending.startswith("== segpipe: the outcome (promotion of ") and "Report: reports/index.html" in ending
    # the console: Ray's and its libraries' messages are in logs/, our lines are not repeated
    console = (root / "repro.log").read_text()
    assert "Requesting resources" not in console and "Starting execution of Dataset" not in console
    assert "RayDeprecationWarning" not in console and "Moving model to device" not in console
    ours = [line for line in console.splitlines() if line.startswith("[")]
    assert ours and len(ours) == len(set(ours)), ours
    assert ending.rstrip("\n") in console  # the promote stage printed it (a plain dvc repro)
    assert (root / "logs" / "train-unet.log").is_file()
    index = json.loads((root / "models/registry/index.json").read_text())
    versions = {v["version"] for v in index["versions"]}
    if "champion" in index["aliases"]:
        assert index["aliases"]["champion"] in versions
    else:  # one epoch on 12 images need not beat the colour lookup; then every candidate says so
        assert all("rejected at beats_baseline" in c["decision"] for c in promotion["candidates"])
    # the fused pair has no baseline to beat: it is the panoptic champion, a bundle of both checkpoints
    bundle = next(v for v in index["versions"] if v["version"] == index["aliases"]["panoptic-champion"])
    assert bundle["task"] == "panoptic" and set(bundle["bundle"]) == {"semantic", "instance"}
    shown = sh(["dvc", "metrics", "show", "--json"], root)
    assert "miou" in shown
    sh(["dvc", "plots", "show", "--json"], root)


@pytest.mark.slow
def test_second_repro_runs_nothing(tiny_repo):
    # Python's bytecode cache appears inside directory dependencies while stages run (stages
    # import segpipe); .dvcignore keeps it out of their hashes.
    cache = tiny_repo / "segpipe" / "metrics" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "semantic.cpython-311.pyc").write_bytes(b"not source")
    out = sh(["dvc", "repro"], tiny_repo)
    assert "Running stage" not in out
    assert "didn't change" in out or "up to date" in out


@pytest.mark.slow
def test_unet_param_change_reruns_only_unet_then_promote(tiny_repo):
    root = tiny_repo
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["overrides"]["unet"] = {"lr": 0.002}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(["dvc", "repro"], root)
    ran = sorted({line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")})
    assert ran == ["evaluate@unet", "fuse", "promote", "train@unet"]  # fuse: unet is the best semantic model
