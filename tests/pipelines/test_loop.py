"""The whole loop a site team lives in, with real parts only: the real `dvc repro` of the pipeline in a
temporary copy of the repository (tiny params: two architectures, 16 images of 64 px, a few epochs),
DVC's incremental behaviour, then a second site ingested by the Prefect ingest flow and the retrain
flow judging the retrained model against the champion re-scored on the new data, then a drop with
corrupted labels caught by the protected-collection gate.

The pipeline runs once for the module (it is the slowest thing in the suite); the tests below are
its steps, in order. Train stages join the session's Ray through RAY_ADDRESS, as `segpipe
with-ray dvc repro` makes them do in `make pipeline`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

BIN = Path(sys.executable).parent
ARCHS = ["unet", "mask_rcnn"]

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]


def sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def ran(output: str) -> list[str]:
    return sorted({line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")})


def read(path: Path) -> dict:
    return json.loads(path.read_text())


class Loop:
    """The repository under test and the environment its commands run in."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env

    def repro(self) -> str:
        return sh(["dvc", "repro"], self.root, self.env)

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set_params(self, params: dict, message: str) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        self.commit(message)

    def commit(self, message: str) -> None:
        sh(["git", "add", "-A"], self.root, self.env)
        sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], self.root, self.env)

    def index(self) -> dict:
        return read(self.root / "models/registry/index.json")

    def promotion(self) -> dict:
        return read(self.root / "reports/promotion/promotion.json")


@pytest.fixture(scope="module")
def loop(tmp_path_factory, copy_repo, ray_session) -> Loop:
    root = tmp_path_factory.mktemp("repo")
    copy_repo(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["synth"].update(images=32, size=[64, 64])
    params["convert"].update(val_fraction=0.25, workers=1)
    params["train"].update(architectures=ARCHS, epochs=2, budget_s=0.0, image_size=48, batch_size=4, threads=1)
    # a U-Net that learns something in a few seconds (epochs, not a budget: the same work on a loaded host)
    params["train"]["model"] = {"unet": {"base_channels": 8, "depth": 3, "dice_weight": 0.5}, "mask_rcnn": {}}
    params["train"]["overrides"] = {"unet": {"epochs": 20, "image_size": 64, "lr": 0.01}, "mask_rcnn": {}}
    params["evaluate"].update(num_overlays=2)
    params["baselines"].update(colour_bits=1)  # 8 colour bins: a baseline tiny models can beat
    params["promote"].update(protected_collection_tolerance=0.5)  # steps 4-5 set it as they need
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    loop = Loop(root, env)
    sh(["git", "init", "-q"], root, env)
    loop.commit("copy")
    (root / "repro.log").write_text(loop.repro())  # what the console showed
    return loop


def test_repro_writes_every_output(loop):
    root = loop.root
    assert len(list((root / "data/raw/synth/images").glob("*.jpg"))) == 32
    manifest = read(root / "data/shards/manifest.json")
    assert sum(manifest["splits"].values()) == 32 and manifest["quarantine"] == []
    assert set(manifest["collections"]) == {"synth"}
    for arch in ARCHS:
        assert (root / f"models/train/{arch}/checkpoint/model.safetensors").is_file()
        m = read(root / f"models/eval/{arch}/metrics.json")
        assert m["arch"] == arch and 0 <= m["pixel_acc"] <= 1 and set(m["per_collection"]) == {"synth"}
        assert (root / f"models/eval/{arch}/confusion.csv").read_text().startswith("actual,predicted")
        assert len(list((root / f"models/eval/{arch}/overlays").glob("*.png"))) == 2
    assert "AP" in read(root / "models/eval/mask_rcnn/metrics.json")["segm"]
    promotion = loop.promotion()
    assert {c["arch"] for c in promotion["candidates"]} == set(ARCHS)
    # the fused pair: the best semantic (unet) and the best instance model (mask_rcnn), scored as panoptic
    fused = read(root / "models/fused/metrics.json")
    assert fused["task"] == "panoptic" and "skipped" not in fused
    assert {k: v["arch"] for k, v in fused["checkpoints"].items()} == {"semantic": "unet", "instance": "mask_rcnn"}
    assert fused["fusion"]["stuff_min_area"] == loop.params()["fuse"]["fusion"]["stuff_min_area"]
    assert fused["panoptic"]["pq"] is not None and 0 <= fused["panoptic"]["pq"] <= 1
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
    index = loop.index()
    assert index["aliases"].get("champion") == "v1", [c["decision"] for c in promotion["candidates"]]  # beats 1-bit colour
    assert index["versions"][0]["scores"][0]["how"] == "registered"
    bundle = next(v for v in index["versions"] if v["version"] == index["aliases"]["panoptic-champion"])
    assert bundle["task"] == "panoptic" and set(bundle["bundle"]) == {"semantic", "instance"}
    assert "miou" in sh(["dvc", "metrics", "show", "--json"], root, loop.env)
    sh(["dvc", "plots", "show", "--json"], root, loop.env)


def test_second_repro_runs_nothing(loop):
    # Python's bytecode cache appears inside directory dependencies while stages run (stages
    # import segpipe); .dvcignore keeps it out of their hashes. So is the registry's lock file.
    cache = loop.root / "segpipe" / "metrics" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "semantic.cpython-311.pyc").write_bytes(b"not source")
    out = loop.repro()
    assert "Running stage" not in out
    assert "didn't change" in out or "up to date" in out


def test_unet_param_change_reruns_only_unet_then_promote(loop):
    params = loop.params()
    params["train"]["overrides"]["unet"]["lr"] = 0.008
    loop.set_params(params, "unet lr")
    assert ran(loop.repro()) == ["evaluate@unet", "fuse", "promote", "train@unet"]  # fuse: unet is the best semantic


def test_moving_the_champion_by_hand_reruns_the_promotion(loop):
    before = loop.index()["aliases"]["champion"]
    out = sh(["segpipe", "registry", "rollback", "--to", "v1", "--reason", "test"], loop.root, loop.env)
    assert f"champion: {before} -> v1" in out or before == "v1"
    if before != "v1":
        assert ran(loop.repro()) == ["promote"]


def drop(loop: Loop, name: str, seed: int, *extra: str, images: int = 32) -> Path:
    """A drop of generated 64 px scenes: the collection layout segpipe synth writes."""
    out = loop.root.parent / f"drop-{name}"
    sh(["segpipe", "synth", "--out", str(out), "--images", str(images), "--size", "64", "64", "--seed", str(seed),
        *extra], loop.root, loop.env)
    return out


def ingest(loop: Loop, folder: Path, name: str) -> None:
    from pipelines.ingest import ingest_flow

    state = ingest_flow(drop=folder, name=name, repo=loop.root, return_state=True)
    assert state.is_completed(), state.message


def retrain(loop: Loop) -> dict:
    from pipelines.retrain import retrain_flow

    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = loop.env["RAY_ADDRESS"]  # the flow's dvc repro subprocesses inherit it
    try:
        state = retrain_flow(repo=loop.root, return_state=True)
    finally:
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old
    assert state.is_completed(), state.message
    return state.result()


def test_a_new_site_is_judged_on_equal_terms(loop, prefect_harness):
    """Ingest a visibly different site, retrain (fine-tuning the champion); the champion is re-scored
    on the new shards, and the retrained model, better there, is promoted with both numbers reported.
    Mask R-CNN is no longer trained: its result, left over from the shards before the drop, is refused."""
    champion = loop.index()["aliases"]["champion"]
    old_manifest = read(loop.root / "data/shards/manifest.json")
    ingest(loop, drop(loop, "site2", 7, "--site", "site2"), "site2")
    params = loop.params()
    params["train"]["architectures"] = ["unet"]
    # fine-tuned from the champion, for longer than it trained: a better model, which promote must see
    params["train"]["overrides"]["unet"].update(init_from="champion", epochs=40)
    loop.set_params(params, "fine-tune unet from the champion")
    result = retrain(loop)
    manifest = read(loop.root / "data/shards/manifest.json")
    assert set(manifest["collections"]) == {"synth", "site2"}
    promotion = loop.promotion()
    judged = promotion["champion_judged"]
    assert judged["version"] == champion and judged["how"] == "re-scored"
    assert judged["registered_manifest"] != promotion["data"]["manifest"]
    unet = next(c for c in promotion["candidates"] if c["arch"] == "unet")
    assert promotion["metric"] == "miou"  # the left-over instance result does not make it a mixed run
    assert unet["decision"] == "promoted to champion", promotion["candidates"]
    assert unet["value"] > judged["on_this_data"]
    stale = next(c for c in promotion["candidates"] if c["arch"] == "mask_rcnn")
    assert stale["decision"].startswith("rejected at current_data: computed on shard manifest "), stale
    assert "a result left over from an older run" in stale["decision"]
    md = (loop.root / "reports/promotion/promotion.md").read_text()
    assert "as registered" in md and "the gates used the re-scored figure" in md
    index = loop.index()
    new = index["aliases"]["champion"]
    assert new != champion
    entry = next(v for v in index["versions"] if v["version"] == new)
    assert entry["parent"]["version"] == champion  # fine-tuned from it
    old = next(v for v in index["versions"] if v["version"] == champion)
    assert {s["shards_manifest_sha256"] for s in old["scores"]} >= {promotion["data"]["manifest"]}
    summary = (loop.root / "reports/summary.md").read_text()
    assert "## Per collection" in summary and "| site2 |" in summary and "| synth |" in summary
    lineage = sh(["segpipe", "registry", "lineage", new], loop.root, loop.env)
    assert f"fine-tuned from {champion}" in lineage and "trained from scratch" in lineage
    assert "**Promoted**" in str(result) or result["promotion"]["champion_after"]["version"] == new
    assert old_manifest["collections"]["synth"] == manifest["collections"]["synth"]  # stable ids and splits


def swap_labels(folder: Path, a: str, b: str) -> None:
    """Swap two classes in every annotation and label map of a drop (a contractor's systematic mistake)."""
    doc = read(folder / "annotations" / "instances.json")
    ids = {c["name"]: c["id"] for c in doc["categories"]}
    x, y = ids[a], ids[b]
    for ann in doc["annotations"]:
        ann["category_id"] = {x: y, y: x}.get(ann["category_id"], ann["category_id"])
    (folder / "annotations" / "instances.json").write_text(json.dumps(doc))
    for png in (folder / "masks").glob("*.png"):
        labels = np.array(Image.open(png))
        swapped = labels.copy()
        swapped[labels == x], swapped[labels == y] = y, x
        Image.fromarray(swapped).save(png)


def test_a_drop_with_swapped_labels_is_caught_by_the_protected_collection_gate(loop, prefect_harness):
    """A contractor swapped two thing classes in every annotation of a large drop: the two the
    champion knows best, so that the damage is larger than what more training gains on these tiny
    models. The model retrained on it is better overall (the drop's own val labels agree with it)
    but worse on a clean site, and the protected-collection gate says which."""
    champion = loop.index()["aliases"]["champion"]
    per_class = read(loop.root / "models/eval/unet/metrics.json")["per_class"]  # the champion's evaluation
    things = [c["name"] for c in read(loop.root / "data/shards/manifest.json")["classes"] if c["isthing"]]
    swap = sorted(things, key=lambda n: per_class[n]["iou"] or 0.0)[-2:]
    params = loop.params()
    # the thing classes are what the swapped labels damage; the clean sites may not lose more than 0.02
    params["promote"].update(semantic_metric="miou_things", protected_collection_tolerance=0.02)
    params["train"]["overrides"]["unet"].update(epochs=15)
    loop.set_params(params, "protect the clean sites")
    bad = drop(loop, "site3", 11, "--set", "synth.density=3.0", images=64)
    swap_labels(bad, *swap)
    ingest(loop, bad, "site3")
    retrain(loop)
    promotion = loop.promotion()
    unet = next(c for c in promotion["candidates"] if c["arch"] == "unet")
    gate = next(g for g in unet["gates"] if g["gate"] == "protected_collections")
    # the damage shows on the clean sites (the swapped drop's own val labels agree with the damage)
    named = [c for c in ("synth", "site2", "site3") if f"protected collection '{c}'" in gate["detail"]]
    assert not gate["passed"] and named and "site3" not in named, promotion["candidates"]
    assert not unet["decision"].startswith("promoted") and loop.index()["aliases"]["champion"] == champion
    assert f"FAIL protected_collections: {gate['detail']}" in (loop.root / "reports/promotion/promotion.md").read_text()
