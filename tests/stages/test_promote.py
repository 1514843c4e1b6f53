"""Promotion: the champion moves only when every gate passes, judged on the candidates' data (the
champion re-scored when its scores are of other data); reports explain each decision."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from segpipe.checkpoint import WEIGHTS
from segpipe.files import sha256_file
from segpipe.lifetime import pool_context
from segpipe.params import EvaluateParams, PromoteParams
from segpipe.registry import load, read_index
from segpipe.results import EvalResult, metric_value
from segpipe.stages import promote
from segpipe.stages.promote import Candidate, Data, check_collections, check_protected, decide, ranking_metric

SCORING = EvaluateParams(batch_size=4, num_overlays=0)
KWARGS = {"base_channels": 4, "depth": 2}


@pytest.fixture
def world(tmp_path, tiny_shards, tiny_checkpoint):
    """Candidates, baselines and promotions on the tiny shard set (the current data)."""
    from segpipe.shards import open_shards

    return World(tmp_path, tiny_shards, open_shards(tiny_shards).manifest_sha256, tiny_checkpoint)


class World:
    def __init__(self, root: Path, shards: Path, manifest: str, make) -> None:
        self.root, self.shards, self.manifest, self.make = root, shards, manifest, make
        self.registry, self.report = root / "registry", root / "report"
        self.data = Data(manifest, "val", SCORING.scoring_key())

    def checkpoint(self, name: str, arch: str = "unet", seed: int | None = None, **kwargs) -> Path:
        ck = self.root / "checkpoints" / name
        if not ck.exists():
            self.make(arch, shards=self.shards, out=ck, seed=seed if seed is not None else sum(map(ord, name)),
                      **(kwargs or (KWARGS if arch == "unet" else {})))
        return ck

    def candidate(self, name: str, miou: float, *, data: str | None = None, task: str = "semantic",
                  worker_iou: float = 0.5, extra: dict | None = None, arch: str = "unet", seed: int | None = None,
                  scoring: str | None = None, **kwargs) -> Path:
        """An evaluation directory (metrics.json) next to the real checkpoint it names."""
        ck = self.checkpoint(name, arch, seed, **kwargs)
        metrics = {
            "arch": arch, "task": task, "checkpoint": {"path": str(ck), "sha256": sha256_file(ck / WEIGHTS)},
            "shards_manifest_sha256": data or self.manifest, "split": "val",
            "scoring": scoring or SCORING.scoring_key(), "pixel_acc": 0.9, "mean_acc": 0.8, "miou": miou,
            "fwiou": 0.7, "mdice": 0.6,
            "per_class": {"soil": {"iou": 0.9, "dice": 0.9, "acc": 0.9},
                          "worker": {"iou": worker_iou, "dice": 0.5, "acc": 0.5},
                          "truck": {"iou": None, "dice": None, "acc": None}},
            **(extra or {}),
        }
        out = self.root / "eval" / name
        out.mkdir(parents=True, exist_ok=True)
        # json.dumps writes NaN as the bare token NaN, as a careless evaluator might.
        (out / "metrics.json").write_text(json.dumps(metrics))
        return out

    def baseline(self, name: str, miou: float, data: str | None = None, split: str = "val") -> Path:
        """A reference predictor's output folder, as `segpipe baselines` writes it."""
        out = self.root / "baselines" / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({
            "baseline": name, "arch": f"baseline:{name}", "task": "semantic",
            "shards_manifest_sha256": data or self.manifest, "split": split, "miou": miou, "per_class": {}}))
        return out.parent

    def fused(self, name: str, pq: float, semantic: str, instance: str, data: str | None = None) -> Path:
        """A fused pair's result (segpipe fuse) naming two real checkpoints."""
        ck = {k: self.root / "checkpoints" / n for k, n in (("semantic", semantic), ("instance", instance))}
        metrics = {
            "arch": "fused", "task": "panoptic", "shards_manifest_sha256": data or self.manifest, "split": "val",
            "scoring": SCORING.scoring_key(),
            "checkpoints": {k: {"path": str(v), "sha256": sha256_file(v / WEIGHTS), "arch": "unet"} for k, v in ck.items()},
            "fusion": {"overlap_threshold": 0.5, "stuff_min_area": 64, "score_threshold": 0.5},
            "panoptic": {"pq": pq, "sq": 0.8, "rq": pq / 0.8, "per_class": {}},
        }
        out = self.root / "eval" / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics))
        return out

    def run(self, params: PromoteParams, candidates: list[Path], baselines: Path | None = None,
            report: Path | None = "default", registry: Path | None = None) -> dict:
        return promote.run(params, candidates, self.shards, SCORING, registry or self.registry,
                           self.report if report == "default" else report, baselines)

    def champion(self) -> str | None:
        return read_index(self.registry)["aliases"].get("champion")


@pytest.fixture
def params() -> PromoteParams:
    return PromoteParams(margin=0.01, min_value=0.1, protected_classes=["worker"], protected_tolerance=0.05,
                         protected_collections=[])


def test_first_promotion_then_only_better_candidates_move_the_champion(world, params):
    a = world.candidate("a", 0.50)
    report = world.run(params, [a])
    assert report["champion_after"]["version"] == "v1" and world.champion() == "v1"

    worse = world.candidate("worse", 0.45)
    tiny_gain = world.candidate("tiny_gain", 0.505)
    nan = world.candidate("nan", math.nan)
    left_over = world.candidate("left_over", 0.90, data="e" * 64)
    dropped_class = world.candidate("dropped_class", 0.80, worker_iou=0.40)
    below_min = world.candidate("below_min", 0.05)
    report = world.run(params, [worse, tiny_gain, nan, left_over, dropped_class, below_min])
    assert world.champion() == "v1"
    decisions = {Path(r["eval_dir"]).name: r["decision"] for r in report["candidates"]}
    assert decisions["worse"].startswith("rejected at margin")
    assert decisions["tiny_gain"].startswith("rejected at margin")
    assert decisions["nan"].startswith("rejected at metric: miou is missing or NaN")
    assert decisions["left_over"].startswith("rejected at current_data: computed on shard manifest eeeeeeeeeeee")
    assert "a result left over from an older run" in decisions["left_over"]
    assert decisions["dropped_class"].startswith("rejected at protected_classes: protected class 'worker'")
    assert decisions["below_min"].startswith("rejected at min_value")
    # The strongest comparable loser is kept as challenger (registered, not champion).
    assert "made challenger" in decisions["dropped_class"]
    assert read_index(world.registry)["aliases"]["challenger"] == "v2"
    # the champion's own registered score is on this data: nothing was re-scored
    assert report["champion_judged"]["how"] == "registered"

    good = world.candidate("good", 0.60, worker_iou=0.47)  # within the tolerance of 0.05
    report = world.run(params, [worse, good])
    assert world.champion() == "v3" and report["champion_before"]["version"] == "v1"
    index = read_index(world.registry)
    assert index["versions"][2]["source"]["eval_dir"] == str(good)
    assert index["aliases"]["challenger"] == "v4"  # the loser of this run that passed gates 1-5
    md = (world.report / "promotion.md").read_text()
    assert "promoted to champion" in md and "FAIL margin" in md and "as registered, on this same data" in md
    assert json.loads((world.report / "promotion.json").read_text())["champion_after"]["version"] == "v3"
    assert load("champion", registry=world.registry)[1].arch == "unet"


def test_a_champion_of_other_data_is_re_scored_once_per_data_version(world, params, monkeypatch):
    """After a new drop, the champion's registered score is of the old shards: promote scores it again
    on the current ones with the code every candidate was scored with, keeps that score in the
    registry, judges every gate against it, and reports both numbers."""
    from segpipe import scoring

    old = world.candidate("old", 0.9, data="o" * 64)  # scored on the shards before the drop
    from segpipe.registry import point_alias, register, transaction

    entry, _ = register(world.registry, world.checkpoint("old"), EvalResult.read(old))
    with transaction(world.registry) as index:
        point_alias(index, "champion", entry["version"], "promoted on the old data")
    calls = []
    real = scoring.score_checkpoint
    monkeypatch.setattr(scoring, "score_checkpoint", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    rescored = real(world.checkpoint("old"), __import__("segpipe.shards", fromlist=["x"]).open_shards(world.shards),
                    SCORING)["miou"]
    # a candidate just above the champion's figure on the current data (its old 0.9 is not comparable)
    better = world.candidate("better", rescored + 0.05)
    params = replace(params, min_value=0.0)
    report = world.run(params, [better])
    assert calls == [world.registry / "v1"]  # re-scored from the registry's own verified copy
    judged = report["champion_judged"]
    assert judged == {"version": "v1", "arch": "unet", "how": "re-scored", "registered": 0.9,
                      "registered_manifest": "o" * 64, "on_this_data": pytest.approx(rescored)}
    assert report["candidates"][0]["decision"] == "promoted to champion"
    assert report["candidates"][0]["champion_registered"] == 0.9
    assert report["candidates"][0]["champion_on_this_data"] == pytest.approx(rescored)
    md = (world.report / "promotion.md").read_text()
    assert "0.9000 as registered" in md and "the gates used the re-scored figure" in md
    v1 = read_index(world.registry)["versions"][0]
    assert [(s["shards_manifest_sha256"], s["how"]) for s in v1["scores"]] == [("o" * 64, "registered"),
                                                                               (world.manifest, "re-scored")]
    # the score is kept: judging against v1 on this data again does not score it again
    from segpipe.registry import set_alias

    set_alias(world.registry, "champion", "v1", "back, for the test")
    world.run(params, [world.candidate("worse", rescored - 0.1)])
    assert len(calls) == 1


def test_a_champion_that_cannot_be_re_scored_stops_the_promotion_naming_it(world, params):
    from segpipe.registry import register, set_alias

    register(world.registry, world.checkpoint("old"), EvalResult.read(world.candidate("old", 0.9, data="o" * 64)))
    set_alias(world.registry, "champion", "v1", "test")
    (world.registry / "v1" / WEIGHTS).write_bytes(b"tampered")
    index_before = (world.registry / "index.json").read_bytes()
    with pytest.raises(promote.PromoteError, match=r"the champion v1 cannot be re-scored .*nothing is promoted: "
                                                   r".*v1/model.safetensors: sha256"):
        world.run(params, [world.candidate("new", 0.99)])
    assert (world.registry / "index.json").read_bytes() == index_before


def test_protected_collections_refuse_a_regression_on_an_old_site(world):
    """The candidate is better overall but worse on the first site by more than the tolerance."""
    per = {"site1": {"miou": 0.60, "images": 10}, "site2": {"miou": 0.20, "images": 5}}
    world.candidate("champ", 0.50, extra={"per_collection": per})
    params = PromoteParams(protected_collections="all", protected_collection_tolerance=0.05)
    world.run(params, [world.root / "eval" / "champ"])
    worse_on_site1 = world.candidate("c1", 0.58, extra={"per_collection": {
        "site1": {"miou": 0.50, "images": 10}, "site2": {"miou": 0.70, "images": 5}}})
    within = world.candidate("c2", 0.55, extra={"per_collection": {
        "site1": {"miou": 0.57, "images": 10}, "site2": {"miou": 0.60, "images": 5}}})
    report = world.run(params, [worse_on_site1, within])
    rows = {Path(r["eval_dir"]).name: r["decision"] for r in report["candidates"]}
    assert rows["c1"].startswith("rejected at protected_collections: protected collection 'site1': miou 0.5000 < "
                                 "champion 0.6000 - tolerance 0.05")
    assert rows["c2"] == "promoted to champion"
    # a named list protects only those
    only2 = world.run(replace(params, protected_collections=["site2"]), [worse_on_site1])
    assert not only2["candidates"][0]["decision"].startswith("rejected at protected_collections")


def test_check_collections_names_each_failure():
    champ = {"per_collection": {"a": {"miou": 0.6}, "b": {"miou": None}}}
    cand = {"per_collection": {"a": {"miou": 0.5}, "b": {"miou": 0.3}}}
    assert check_collections(cand, champ, ["a", "b"], "miou", 0.2) == []
    (fail,) = check_collections(cand, champ, ["a", "b"], "miou", 0.05)
    assert "protected collection 'a'" in fail
    assert check_collections(cand, champ, ["c"], "miou", 0.05) == ["protected collection 'c' is not in the split"]


def test_best_of_several_passing_candidates_wins(world, params):
    cands = [world.candidate(n, v) for n, v in (("a", 0.5), ("b", 0.7), ("c", 0.6))]
    report = world.run(params, cands)
    assert read_index(world.registry)["versions"][0]["source"]["eval_dir"] == str(cands[1])
    rows = {Path(r["eval_dir"]).name: r["decision"] for r in report["candidates"]}
    assert rows["b"] == "promoted to champion" and rows["a"].startswith("passed every gate, but")
    assert rows["c"].endswith("made challenger")


def test_running_twice_creates_no_new_version(world, params):
    cands = [world.candidate("a", 0.5), world.candidate("b", 0.6)]
    first = world.run(params, cands)
    index_before = (world.registry / "index.json").read_text()
    second = world.run(params, cands)
    assert first["created"] == ["v1", "v2"] and second["created"] == []
    assert (world.registry / "index.json").read_text() == index_before
    assert "is the champion (v1)" in second["candidates"][1]["decision"]


def test_tampered_candidate_checkpoint_is_refused(world, params):
    a = world.candidate("a", 0.5)
    weights = world.root / "checkpoints" / "a" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    report = world.run(params, [a], report=None)
    assert report["champion_after"] is None and world.champion() is None
    assert "rejected at readable" in report["candidates"][0]["decision"]
    assert str(weights) in report["candidates"][0]["decision"]


def test_unreadable_candidates_are_reported_not_fatal(world, params):
    empty = world.root / "empty"
    empty.mkdir()
    broken = world.root / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text(json.dumps({"arch": "unet"}))
    report = world.run(params, [empty, broken], report=None)
    d = [r["decision"] for r in report["candidates"]]
    assert "metrics.json: not found" in d[0]
    assert "missing key(s) 'task', 'shards_manifest_sha256', 'split', 'checkpoint'" in d[1]


def test_mixed_tasks_rank_on_thing_miou(world, params):
    # The instance model's plain mIoU (things + one background class) is higher, but only the
    # thing-class mean is the same quantity for both tasks.
    sem = world.candidate("sem", 0.3, extra={"miou_things": 0.4})
    inst = world.candidate("inst", 0.8, task="instance", extra={"segm": {"AP": 0.9}, "miou_things": 0.2})
    report = world.run(params, [sem, inst], report=None)
    assert report["metric"] == "miou_things"
    assert Path(report["candidates"][0]["eval_dir"]).name == "sem"
    assert report["candidates"][0]["decision"] == "promoted to champion"
    # Instance-only runs rank on segm.AP; NaN AP never promotes.
    only = world.run(params, [world.candidate("i2", 0.1, task="instance", extra={"segm": {"AP": math.nan}})],
                     report=None, registry=world.root / "reg2")
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


def test_decide_is_pure_and_ties_go_to_the_first():
    data = Data("d" * 64, "val", "k")
    rows = [Candidate(Path(f"e{i}"), EvalResult.from_json(
        {"arch": "unet", "task": "semantic", "miou": 0.5, "shards_manifest_sha256": data.manifest, "split": "val",
         "scoring": "k", "checkpoint": {"path": f"c{i}", "sha256": str(i)}, "per_class": {}}, f"e{i}"))
            for i in range(2)]
    d = decide(rows, None, PromoteParams(), data)
    assert d["champion"] == 0 and d["challenger"] == 1


def _promote_in_process(args: tuple[str, list[str], str, str]) -> str:
    reg, cands, rep, shards = args
    report = promote.run(PromoteParams(), [Path(c) for c in cands], shards, SCORING, Path(reg), Path(rep))
    return report["champion_after"]["version"]


def test_concurrent_promotions_leave_a_valid_index(world):
    groups = [[str(world.candidate(f"g{g}c{i}", 0.3 + 0.05 * g + 0.01 * i, seed=10 * g + i)) for i in range(3)]
              for g in range(4)]
    # fork where it is safe (the children only read JSON, hash and copy files, and start in
    # milliseconds); spawn where this test process runs a Ray of an earlier test
    with pool_context().Pool(4) as pool:
        pool.map(_promote_in_process, [(str(world.registry), grp, str(world.root / f"rep{g}"), str(world.shards))
                                       for g, grp in enumerate(groups)])
    index = read_index(world.registry)  # validates the index
    shas = [v["checkpoint_sha256"] for v in index["versions"]]
    assert len(shas) == len(set(shas))
    assert sorted(int(v["version"][1:]) for v in index["versions"]) == list(range(1, len(shas) + 1))
    for v in index["versions"]:
        assert sha256_file(world.registry / v["path"] / WEIGHTS) == v["checkpoint_sha256"]
    # Whatever the interleaving, the best candidate of all ends up champion.
    champion = next(v for v in index["versions"] if v["version"] == index["aliases"]["champion"])
    assert champion["source"]["eval_dir"] == groups[3][2]


def test_cli(world, capsys):
    a = world.candidate("a", 0.5)
    promote.main(["--candidates", str(a), "--shards", str(world.shards), "--registry", str(world.registry),
                  "--report", str(world.report), "--set", "promote.min_value=0.6", "--set", "evaluate.batch_size=4",
                  "--set", "evaluate.num_overlays=0"])
    (line,) = capsys.readouterr().out.strip().splitlines()  # one line; the decisions are in the report
    assert line.startswith("promote: 1 candidate(s) judged on val of shard manifest") and "0 promoted" in line
    assert "champion none" in line and "rejected at min_value" in (world.report / "promotion.md").read_text()


def test_beats_baseline_gate_refuses_a_candidate_no_better_than_the_colour_lookup(world):
    params = PromoteParams(baseline_margin=0.02)
    world.baseline("majority", 0.06)
    folder = world.baseline("colour", 0.21)
    weak = world.candidate("weak", 0.22)  # beats colour, but not by the margin
    strong = world.candidate("strong", 0.40)
    report = world.run(params, [weak, strong], baselines=folder)
    rows = {Path(r["eval_dir"]).name: r for r in report["candidates"]}
    assert rows["strong"]["decision"].startswith("promoted")
    gate = next(g for g in rows["weak"]["gates"] if g["gate"] == "beats_baseline")
    assert not gate["passed"] and "colour 0.2100" in gate["detail"] and "baseline_margin 0.02" in gate["detail"]
    assert rows["weak"]["decision"].startswith("rejected at beats_baseline")
    assert "challenger" not in rows["weak"]["decision"]  # a challenger must beat the baselines too
    md = (world.report / "promotion.md").read_text()
    assert "colour 0.2100" in md and "FAIL beats_baseline" in md


def test_no_champion_when_every_candidate_loses_to_the_baseline(world):
    folder = world.baseline("colour", 0.30)
    report = world.run(PromoteParams(), [world.candidate("a", 0.25)], baselines=folder)
    assert report["champion_after"] is None and world.champion() is None


def test_baselines_of_other_data_are_not_comparable(world):
    folder = world.baseline("colour", 0.10, data="e" * 64)
    report = world.run(PromoteParams(), [world.candidate("a", 0.50)], baselines=folder)
    gate = next(g for g in report["candidates"][0]["gates"] if g["gate"] == "beats_baseline")
    assert not gate["passed"] and "not comparable" in gate["detail"]


def test_beats_baseline_is_not_applicable_to_a_metric_no_baseline_has(tmp_path):
    colour = EvalResult.from_json({"baseline": "colour", "arch": "baseline:colour", "task": "semantic",
                                   "shards_manifest_sha256": "d", "split": "val", "miou": 0.2}, "colour")
    ok, detail = promote.check_baselines({"shards_manifest_sha256": "d", "split": "val"}, 0.3, "segm.AP", [colour], 0.0)
    assert ok and "not applicable" in detail
    assert promote.check_baselines({}, 0.3, "miou", [], 0.0) == (True, "no baselines given")
    with pytest.raises(ValueError, match="no <baseline>/metrics.json"):
        promote.read_baselines(tmp_path)


# --------------------------------------------------------------------------------------
# Panoptic candidates: ranked apart on panoptic.pq, a fused pair registered as a bundle
# --------------------------------------------------------------------------------------


def test_panoptic_candidates_rank_apart_and_a_fused_pair_is_a_bundle(world, params):
    from segpipe.registry import checkpoint_dir, read_bundle

    sem = world.candidate("sem", 0.60)
    mf = world.candidate("mf", 0.50, extra={"panoptic": {"pq": 0.30}})
    world.candidate("inst", 0.40)
    pair = world.fused("fused", 0.35, "sem", "inst")
    report = world.run(params, [sem, mf, pair])
    index = read_index(world.registry)
    assert [c["eval_dir"] for c in report["candidates"]] == [str(sem), str(mf)]  # the fused pair is not in it
    assert report["candidates"][0]["decision"] == "promoted to champion"
    pan = report["panoptic"]
    assert pan["metric"] == "panoptic.pq" and [c["value"] for c in pan["candidates"]] == [0.30, 0.35]
    bundle = next(v for v in index["versions"] if v["version"] == index["aliases"]["panoptic-champion"])
    assert bundle["task"] == "panoptic" and bundle["fusion"]["stuff_min_area"] == 64
    assert pan["champion_after"] == {"version": bundle["version"], "arch": "fused", "pair": "unet + unet"}
    assert bundle["bundle"]["semantic"]["checkpoint_sha256"] == sha256_file(world.root / "checkpoints/sem" / WEIGHTS)
    assert bundle["bundle"]["instance"]["checkpoint_sha256"] == sha256_file(world.root / "checkpoints/inst" / WEIGHTS)
    assert index["aliases"]["panoptic-challenger"] == next(v["version"] for v in index["versions"]
                                                           if v["source"]["eval_dir"] == str(mf))
    directory = checkpoint_dir("panoptic-champion", world.registry)  # verifies every file of both members
    members = read_bundle(directory)["members"]
    assert load(directory / members["instance"])[1].arch == "unet"
    assert "## Panoptic ranking" in (world.report / "promotion.md").read_text()
    # tampering with either member is caught on load
    (directory / "instance" / WEIGHTS).write_bytes(b"x")
    with pytest.raises(ValueError, match="instance/model.safetensors: sha256"):
        checkpoint_dir("panoptic-champion", world.registry)


def test_a_bundle_champion_of_other_data_is_re_scored_as_a_fused_pair(world, params, tiny_checkpoint):
    sem = world.checkpoint("sem")
    world.checkpoint("inst", "mask_rcnn", box_head_dim=32, mask_head_channels=16, detects_things=True)
    old = world.fused("old_pair", 0.9, "sem", "inst", data="o" * 64)
    from segpipe.registry import add_bundle_version, point_alias, transaction

    with transaction(world.registry) as index:
        entry, _ = add_bundle_version(world.registry, index, EvalResult.read(old))
        point_alias(index, "panoptic-champion", entry["version"], "old data")
    new_pair = world.fused("new_pair", 0.95, "sem", "sem")  # any pair scored on the current data
    report = world.run(params, [world.candidate("sem", 0.6), new_pair])
    judged = report["panoptic"]["champion_judged"]
    assert judged["how"] == "re-scored" and judged["registered"] == 0.9 and judged["on_this_data"] is not None
    assert sem.is_dir()
    scores = read_index(world.registry)["versions"][0]["scores"]
    assert scores[-1]["how"] == "re-scored" and scores[-1]["metrics"]["task"] == "panoptic"


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_gto_tags_for_the_champion_and_the_panoptic_champion(world, params, monkeypatch, git_repo, git_cmd):
    git_repo(world.root)
    monkeypatch.chdir(world.root)  # the tags go into the repository promote runs in
    sem = world.candidate("sem", 0.60)
    world.candidate("inst", 0.40)
    pair = world.fused("fused", 0.35, "sem", "inst")
    tagged = replace(params, gto_tags=True)
    report = world.run(tagged, [sem, pair])
    champion, panoptic = report["champion_after"]["version"], report["panoptic"]["champion_after"]["version"]
    assert champion != panoptic
    assert report["git_tags"] == [f"segmenter@{champion}.0.0", "segmenter#prod#1",
                                  f"segmenter-panoptic@{panoptic}.0.0", "segmenter-panoptic#prod#1"]
    assert sorted(git_cmd(world.root, "tag", "--list").split()) == sorted(report["git_tags"])
    # nothing new promoted: no new tags
    assert world.run(tagged, [sem, pair])["git_tags"] == []


def test_a_fused_pair_whose_member_changed_is_not_readable(world):
    world.candidate("sem", 0.60)
    world.candidate("inst", 0.40)
    pair = world.fused("fused", 0.35, "sem", "inst")
    (world.root / "checkpoints" / "inst" / WEIGHTS).write_bytes(b"changed")
    c = promote.read_candidate(pair)
    assert c.error and "differs from the evaluated" in c.error and "inst" in c.error
