"""Promotion: the champion moves only when every gate passes; reports explain each decision."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from segpipe.checkpoint import WEIGHTS, save_checkpoint
from segpipe.files import sha256_file
from segpipe.params import PromoteParams
from segpipe.registry import load, read_index
from segpipe.stages import promote
from segpipe.stages.promote import Candidate, check_protected, decide, metric_value, ranking_metric

CLASSES = [
    {"id": 0, "name": "background", "isthing": False, "color": [0, 0, 0]},
    {"id": 1, "name": "worker", "isthing": True, "color": [255, 0, 0]},
    {"id": 2, "name": "excavator", "isthing": True, "color": [0, 255, 0]},
]
DATA = "d" * 64
KWARGS = {"base_channels": 4, "depth": 2}


def candidate(root: Path, name: str, miou: float, *, seed: int | None = None, data: str = DATA,
              task: str = "semantic", worker_iou: float = 0.5, extra: dict | None = None) -> Path:
    """An evaluation directory (metrics.json) next to the real checkpoint it names."""
    from segpipe.models import build_model

    ck = root / "checkpoints" / name
    if not ck.exists():
        torch.manual_seed(seed if seed is not None else hash(name) % 1000)
        model = build_model("unet", len(CLASSES), **KWARGS)
        save_checkpoint(ck, model, {
            "arch": "unet", "task": task, "num_classes": len(CLASSES), "model_kwargs": KWARGS,
            "classes": CLASSES, "ignore_index": 255, "params": {"seed": seed}, "shards_manifest_sha256": data,
            "epoch": 1, "metrics": {}, "image_size": 64,
        })
    metrics = {
        "arch": "unet", "task": task, "checkpoint": {"path": str(ck), "sha256": sha256_file(ck / WEIGHTS)},
        "shards_manifest_sha256": data, "split": "val", "pixel_acc": 0.9, "mean_acc": 0.8, "miou": miou,
        "fwiou": 0.7, "mdice": 0.6,
        "per_class": {"background": {"iou": 0.9, "dice": 0.9, "acc": 0.9},
                      "worker": {"iou": worker_iou, "dice": 0.5, "acc": 0.5},
                      "excavator": {"iou": None, "dice": None, "acc": None}},
        **(extra or {}),
    }
    out = root / "eval" / name
    out.mkdir(parents=True, exist_ok=True)
    # json.dumps writes NaN as the bare token NaN, as a careless evaluator might.
    (out / "metrics.json").write_text(json.dumps(metrics))
    return out


def champion_of(registry: Path) -> str | None:
    return read_index(registry)["aliases"].get("champion")


@pytest.fixture
def params() -> PromoteParams:
    return PromoteParams(margin=0.01, min_value=0.1, protected_classes=["worker"], protected_tolerance=0.05)


def test_first_promotion_then_only_better_candidates_move_the_champion(tmp_path, params):
    reg, rep = tmp_path / "registry", tmp_path / "report"
    a = candidate(tmp_path, "a", 0.50)
    report = promote.run(params, [a], reg, rep)
    assert report["champion_after"]["version"] == "v1" and champion_of(reg) == "v1"

    worse = candidate(tmp_path, "worse", 0.45)
    tiny_gain = candidate(tmp_path, "tiny_gain", 0.505)
    nan = candidate(tmp_path, "nan", math.nan)
    other_data = candidate(tmp_path, "other_data", 0.90, data="e" * 64)
    dropped_class = candidate(tmp_path, "dropped_class", 0.80, worker_iou=0.40)
    below_min = candidate(tmp_path, "below_min", 0.05)
    report = promote.run(params, [worse, tiny_gain, nan, other_data, dropped_class, below_min], reg, rep)
    assert champion_of(reg) == "v1"
    decisions = {Path(r["eval_dir"]).name: r["decision"] for r in report["candidates"]}
    assert decisions["worse"].startswith("rejected at margin")
    assert decisions["tiny_gain"].startswith("rejected at margin")
    assert decisions["nan"].startswith("rejected at metric: miou is missing or NaN")
    assert decisions["other_data"].startswith("rejected at same_data") and "e" * 64 in decisions["other_data"]
    assert decisions["dropped_class"].startswith("rejected at protected_classes: protected class 'worker'")
    assert decisions["below_min"].startswith("rejected at min_value")
    # The strongest comparable loser is kept as challenger (registered, not champion).
    assert "made challenger" in decisions["dropped_class"]
    assert read_index(reg)["aliases"]["challenger"] == "v2"

    good = candidate(tmp_path, "good", 0.60, worker_iou=0.47)  # within the tolerance of 0.05
    report = promote.run(params, [worse, good], reg, rep)
    assert champion_of(reg) == "v3" and report["champion_before"]["version"] == "v1"
    index = read_index(reg)
    assert index["versions"][2]["source"]["eval_dir"] == str(good)
    assert index["aliases"]["challenger"] == "v4"  # the loser of this run that passed gates 1-4
    md = (rep / "promotion.md").read_text()
    assert "promoted to champion" in md and "FAIL margin" in md
    assert json.loads((rep / "promotion.json").read_text())["champion_after"]["version"] == "v3"
    model, meta = load("champion", registry=reg)
    assert meta.arch == "unet"


def test_best_of_several_passing_candidates_wins(tmp_path, params):
    reg = tmp_path / "registry"
    cands = [candidate(tmp_path, n, v) for n, v in (("a", 0.5), ("b", 0.7), ("c", 0.6))]
    report = promote.run(params, cands, reg, tmp_path / "rep")
    assert report["champion_after"]["value"] == pytest.approx(0.7)
    assert read_index(reg)["versions"][0]["source"]["eval_dir"] == str(cands[1])
    rows = {Path(r["eval_dir"]).name: r["decision"] for r in report["candidates"]}
    assert rows["a"].startswith("passed every gate, but")
    assert rows["c"].endswith("made challenger")


def test_running_twice_creates_no_new_version(tmp_path, params):
    reg = tmp_path / "registry"
    cands = [candidate(tmp_path, "a", 0.5), candidate(tmp_path, "b", 0.6)]
    first = promote.run(params, cands, reg, tmp_path / "rep")
    index_before = (reg / "index.json").read_text()
    second = promote.run(params, cands, reg, tmp_path / "rep")
    assert first["created"] == ["v1", "v2"] and second["created"] == []
    assert (reg / "index.json").read_text() == index_before
    assert "is the champion (v1)" in second["candidates"][1]["decision"]


def test_tampered_candidate_checkpoint_is_refused(tmp_path, params):
    reg = tmp_path / "registry"
    a = candidate(tmp_path, "a", 0.5)
    weights = tmp_path / "checkpoints" / "a" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    report = promote.run(params, [a], reg, None)
    assert report["champion_after"] is None and champion_of(reg) is None
    assert "rejected at readable" in report["candidates"][0]["decision"]
    assert str(weights) in report["candidates"][0]["decision"]


def test_unreadable_candidates_are_reported_not_fatal(tmp_path, params):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text(json.dumps({"arch": "unet"}))
    report = promote.run(params, [empty, broken], tmp_path / "registry", None)
    d = [r["decision"] for r in report["candidates"]]
    assert "metrics.json: not found" in d[0]
    assert "missing key(s) 'task', 'checkpoint'" in d[1]


def test_mixed_tasks_rank_on_thing_miou(tmp_path, params):
    # The instance model's plain mIoU (things + one background class) is higher, but only the
    # thing-class mean is the same quantity for both tasks.
    sem = candidate(tmp_path, "sem", 0.3, extra={"miou_things": 0.4})
    inst = candidate(tmp_path, "inst", 0.8, task="instance", extra={"segm": {"AP": 0.9}, "miou_things": 0.2})
    report = promote.run(params, [sem, inst], tmp_path / "registry", None)
    assert report["metric"] == "miou_things"
    assert Path(report["candidates"][0]["eval_dir"]).name == "sem"
    assert report["candidates"][0]["decision"] == "promoted to champion"
    # Instance-only runs rank on segm.AP; NaN AP never promotes.
    only = promote.run(params, [candidate(tmp_path, "i2", 0.1, task="instance", extra={"segm": {"AP": math.nan}})],
                       tmp_path / "reg2", None)
    assert only["metric"] == "segm.AP" and only["champion_after"] is None


def test_metric_value_and_ranking_metric():
    m = {"miou": 0.5, "segm": {"AP": 0.3, "AP50": float("nan")}, "flag": True}
    assert metric_value(m, "miou") == 0.5 and metric_value(m, "segm.AP") == 0.3
    assert metric_value(m, "segm.AP50") is None and metric_value(m, "bbox.AP") is None
    assert metric_value(m, "flag") is None
    p = PromoteParams()
    assert ranking_metric(p, ["instance", "instance"]) == "segm.AP"
    assert ranking_metric(p, ["instance", "semantic"]) == "miou_things"
    assert ranking_metric(replace(p, mixed_metric="mdice"), ["instance", "semantic"]) == "mdice"
    assert ranking_metric(replace(p, semantic_metric="fwiou"), ["semantic"]) == "fwiou"


def test_check_protected_handles_absent_classes():
    champ = {"per_class": {"a": {"iou": 0.5}, "b": {"iou": None}}}
    assert check_protected({"per_class": {"a": {"iou": 0.46}, "b": {"iou": None}}}, champ, ["a", "b"], 0.05) == []
    assert check_protected({"per_class": {"a": {"iou": 0.44}}}, champ, ["a"], 0.05)[0].startswith("protected class 'a': IoU 0.4400")
    assert "missing from the candidate" in check_protected({"per_class": {}}, champ, ["a"], 0.05)[0]
    assert "IoU is NaN" in check_protected({"per_class": {"a": {"iou": float("nan")}}}, champ, ["a"], 0.05)[0]


def test_decide_is_pure_and_ties_go_to_the_first(tmp_path):
    rows = [Candidate(Path(f"e{i}"), {"task": "semantic", "miou": 0.5, "shards_manifest_sha256": DATA}, sha256=str(i))
            for i in range(2)]
    d = decide(rows, None, PromoteParams())
    assert d["champion"] == 0 and d["challenger"] == 1


def _promote_in_process(args: tuple[str, list[str], str]) -> str:
    reg, cands, rep = args
    report = promote.run(PromoteParams(), [Path(c) for c in cands], Path(reg), Path(rep))
    return report["champion_after"]["version"]


def test_concurrent_promotions_leave_a_valid_index(tmp_path):
    reg = tmp_path / "registry"
    groups = [[str(candidate(tmp_path, f"g{g}c{i}", 0.3 + 0.05 * g + 0.01 * i, seed=10 * g + i)) for i in range(3)]
              for g in range(4)]
    # fork: the children only read JSON, hash and copy files (no torch ops), and start in milliseconds.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(4) as pool:
        pool.map(_promote_in_process, [(str(reg), grp, str(tmp_path / f"rep{g}")) for g, grp in enumerate(groups)])
    index = read_index(reg)  # validates the index
    shas = [v["checkpoint_sha256"] for v in index["versions"]]
    assert len(shas) == len(set(shas))
    assert sorted(int(v["version"][1:]) for v in index["versions"]) == list(range(1, len(shas) + 1))
    for v in index["versions"]:
        assert sha256_file(reg / v["path"] / WEIGHTS) == v["checkpoint_sha256"]
    # Whatever the interleaving, the best candidate of all ends up champion.
    best = groups[3][2]
    champion = next(v for v in index["versions"] if v["version"] == index["aliases"]["champion"])
    assert champion["source"]["eval_dir"] == best


def test_cli(tmp_path, capsys):
    a = candidate(tmp_path, "a", 0.5)
    promote.main(["--candidates", str(a), "--registry", str(tmp_path / "reg"), "--report", str(tmp_path / "rep"),
                  "--set", "promote.min_value=0.6"])
    out = capsys.readouterr().out
    assert "rejected at min_value" in out and "champion: none" in out
    assert (tmp_path / "rep" / "promotion.md").exists()


def baseline(root: Path, name: str, miou: float, data: str = DATA, split: str = "val") -> Path:
    """A reference predictor's output folder, as `segpipe evaluate --baselines` writes it."""
    out = root / "baselines" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({
        "baseline": name, "arch": f"baseline:{name}", "task": "semantic", "shards_manifest_sha256": data,
        "split": split, "miou": miou, "per_class": {}}))
    return out.parent


def test_beats_baseline_gate_refuses_a_candidate_no_better_than_the_colour_lookup(tmp_path):
    params = PromoteParams(baseline_margin=0.02)
    baseline(tmp_path, "majority", 0.06)
    folder = baseline(tmp_path, "colour", 0.21)
    weak = candidate(tmp_path, "weak", 0.22)  # beats colour, but not by the margin
    strong = candidate(tmp_path, "strong", 0.40)
    report = promote.run(params, [weak, strong], tmp_path / "registry", tmp_path / "report", baselines=folder)
    rows = {Path(r["eval_dir"]).name: r for r in report["candidates"]}
    assert rows["strong"]["decision"].startswith("promoted")
    gate = next(g for g in rows["weak"]["gates"] if g["gate"] == "beats_baseline")
    assert not gate["passed"] and "colour 0.2100" in gate["detail"] and "baseline_margin 0.02" in gate["detail"]
    assert rows["weak"]["decision"].startswith("rejected at beats_baseline")
    assert "challenger" not in rows["weak"]["decision"]  # a challenger must beat the baselines too
    md = (tmp_path / "report" / "promotion.md").read_text()
    assert "colour 0.2100" in md and "FAIL beats_baseline" in md


def test_no_champion_when_every_candidate_loses_to_the_baseline(tmp_path):
    folder = baseline(tmp_path, "colour", 0.30)
    a = candidate(tmp_path, "a", 0.25)
    report = promote.run(PromoteParams(), [a], tmp_path / "registry", tmp_path / "report", baselines=folder)
    assert report["champion_after"] is None and champion_of(tmp_path / "registry") is None


def test_baselines_of_other_data_are_not_comparable(tmp_path):
    folder = baseline(tmp_path, "colour", 0.10, data="e" * 64)
    a = candidate(tmp_path, "a", 0.50)
    report = promote.run(PromoteParams(), [a], tmp_path / "registry", tmp_path / "report", baselines=folder)
    gate = next(g for g in report["candidates"][0]["gates"] if g["gate"] == "beats_baseline")
    assert not gate["passed"] and "not comparable" in gate["detail"]


def test_beats_baseline_is_not_applicable_to_a_metric_no_baseline_has(tmp_path):
    ok, detail = promote.check_baselines({"shards_manifest_sha256": DATA, "split": "val"}, 0.3, "segm.AP",
                                         [{"baseline": "colour", "shards_manifest_sha256": DATA, "split": "val",
                                           "miou": 0.2}], 0.0)
    assert ok and "not applicable" in detail
    assert promote.check_baselines({}, 0.3, "miou", [], 0.0) == (True, "no baselines given")
    with pytest.raises(ValueError, match="no <baseline>/metrics.json"):
        promote.read_baselines(tmp_path)


# --------------------------------------------------------------------------------------
# Panoptic candidates: ranked apart on panoptic.pq, a fused pair registered as a bundle
# --------------------------------------------------------------------------------------


def fused(root: Path, name: str, pq: float, semantic: str, instance: str, data: str = DATA) -> Path:
    """A fused pair's evaluation directory (segpipe evaluate --fuse-best) naming two real checkpoints."""
    ck = {k: root / "checkpoints" / n for k, n in (("semantic", semantic), ("instance", instance))}
    metrics = {
        "arch": "fused", "task": "panoptic", "shards_manifest_sha256": data, "split": "val",
        "checkpoints": {k: {"path": str(v), "sha256": sha256_file(v / WEIGHTS), "arch": "unet"} for k, v in ck.items()},
        "fusion": {"overlap_threshold": 0.5, "stuff_min_area": 64, "score_threshold": 0.5},
        "panoptic": {"pq": pq, "sq": 0.8, "rq": pq / 0.8, "per_class": {}},
    }
    out = root / "eval" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics))
    return out


def test_panoptic_candidates_rank_apart_and_a_fused_pair_is_a_bundle(tmp_path, params):
    from segpipe.registry import checkpoint_dir, read_bundle

    reg, rep = tmp_path / "registry", tmp_path / "report"
    sem = candidate(tmp_path, "sem", 0.60)
    mf = candidate(tmp_path, "mf", 0.50, extra={"panoptic": {"pq": 0.30}})
    candidate(tmp_path, "inst", 0.40)
    pair = fused(tmp_path, "fused", 0.35, "sem", "inst")
    report = promote.run(params, [sem, mf, pair], reg, rep)
    index = read_index(reg)
    assert [c["eval_dir"] for c in report["candidates"]] == [str(sem), str(mf)]  # the fused pair is not in it
    assert report["champion_after"]["value"] == 0.60
    pan = report["panoptic"]
    assert pan["metric"] == "panoptic.pq" and pan["champion_after"]["value"] == 0.35
    assert [c["value"] for c in pan["candidates"]] == [0.30, 0.35]
    bundle = next(v for v in index["versions"] if v["version"] == index["aliases"]["panoptic-champion"])
    assert bundle["task"] == "panoptic" and bundle["fusion"]["stuff_min_area"] == 64
    assert bundle["bundle"]["semantic"]["checkpoint_sha256"] == sha256_file(tmp_path / "checkpoints/sem" / WEIGHTS)
    assert bundle["bundle"]["instance"]["checkpoint_sha256"] == sha256_file(tmp_path / "checkpoints/inst" / WEIGHTS)
    assert index["aliases"]["panoptic-challenger"] == next(v["version"] for v in index["versions"]
                                                           if v["source"]["eval_dir"] == str(mf))
    directory = checkpoint_dir("panoptic-champion", reg)  # verifies every file of both members
    members = read_bundle(directory)["members"]
    assert load(directory / members["instance"])[1].arch == "unet"
    assert "## Panoptic ranking" in (rep / "promotion.md").read_text()
    # tampering with either member is caught on load
    (directory / "instance" / WEIGHTS).write_bytes(b"x")
    with pytest.raises(ValueError, match="instance/model.safetensors: sha256"):
        checkpoint_dir("panoptic-champion", reg)
    # running again registers nothing new; a worse pair does not move the panoptic champion
    worse = fused(tmp_path, "worse", 0.20, "sem", "sem")
    again = promote.run(params, [sem, mf, pair, worse], reg, rep)
    assert again["created"] == []
    assert read_index(reg)["aliases"]["panoptic-champion"] == bundle["version"]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_gto_tags_for_the_champion_and_the_panoptic_champion(tmp_path, params, monkeypatch, git_repo, git_cmd):
    git_repo(tmp_path)
    monkeypatch.chdir(tmp_path)  # the tags go into the repository promote runs in
    sem = candidate(tmp_path, "sem", 0.60)
    candidate(tmp_path, "inst", 0.40)
    pair = fused(tmp_path, "fused", 0.35, "sem", "inst")
    tagged = replace(params, gto_tags=True)
    report = promote.run(tagged, [sem, pair], tmp_path / "registry", tmp_path / "report")
    champion, panoptic = report["champion_after"]["version"], report["panoptic"]["champion_after"]["version"]
    assert champion != panoptic
    assert report["git_tags"] == [f"segmenter@{champion}.0.0", "segmenter#prod#1",
                                  f"segmenter-panoptic@{panoptic}.0.0", "segmenter-panoptic#prod#1"]
    assert sorted(git_cmd(tmp_path, "tag", "--list").split()) == sorted(report["git_tags"])
    # nothing new promoted: no new tags
    assert promote.run(tagged, [sem, pair], tmp_path / "registry", tmp_path / "report")["git_tags"] == []


def test_a_fused_pair_whose_member_changed_is_not_readable(tmp_path, params):
    candidate(tmp_path, "sem", 0.60)
    candidate(tmp_path, "inst", 0.40)
    pair = fused(tmp_path, "fused", 0.35, "sem", "inst")
    (tmp_path / "checkpoints" / "inst" / WEIGHTS).write_bytes(b"changed")
    c = promote.read_candidate(pair)
    assert c.error and "differs from the evaluated" in c.error and "inst" in c.error
