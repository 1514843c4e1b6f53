"""``segpipe evaluate``: the DVC files, end to end on a small synthetic shard set for a semantic and
an instance checkpoint, the same numbers from both engines, and the same label maps as predict."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe.metrics.semantic import BACKGROUND
from segpipe.models import normalize
from segpipe.params import ConvertParams, EvaluateParams, SynthParams
from segpipe.stages import evaluate as ev


@contextlib.contextmanager
def one_thread_models_on_ray():
    """A local Ray of two CPUs, models running with one torch thread in both engines (two actors)."""
    import ray

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)

# pycocotools' decode under numpy 2 (its own deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_confusion_rows_are_proportional_and_sum_to_the_budget():
    mat = np.array([[700, 300], [0, 1000]])
    rows = ev.confusion_rows(mat, ["a", "b"], rows=100)
    assert Counter(rows) == {("a", "a"): 35, ("a", "b"): 15, ("b", "b"): 50}
    assert ev.confusion_rows(np.zeros((2, 2), int), ["a", "b"]) == []


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    from segpipe.formats import coco
    from segpipe.stages import convert, synth

    root = tmp_path_factory.mktemp("eval")
    synth.run(SynthParams(images=6, size=(64, 80), workers=1, seed=3), root / "raw")
    src = coco.read([root / "raw" / "annotations" / "instances.json"], root / "raw" / "images", root / "raw" / "masks")
    manifest = convert.run(ConvertParams(workers=1, val_fraction=0.5), src, root / "shards", progress=False)
    assert manifest["splits"].get("val", 0) > 0
    return root, manifest


def _check_outputs(out: Path, m: dict, ckpt: Path, root: Path) -> None:
    from segpipe.checkpoint import weights_sha256
    from segpipe.shards import open_shards

    assert m == json.loads((out / "metrics.json").read_text())
    assert m["checkpoint"] == {"path": str(ckpt), "sha256": weights_sha256(ckpt)}
    assert m["shards_manifest_sha256"] == open_shards(root / "shards").manifest_sha256
    assert m["split"] == "val" and m["images"] > 0
    for key in ("pixel_acc", "mean_acc", "miou", "fwiou", "mdice"):
        assert m[key] is None or 0.0 <= m[key] <= 1.0
    lines = (out / "confusion.csv").read_text().splitlines()
    assert lines[0] == "actual,predicted" and len(lines) == 1 + ev.CONFUSION_ROWS
    counts = [line.split(",") for line in (out / "confusion_counts.csv").read_text().splitlines()[1:]]
    assert sum(int(c[2]) for c in counts) == m["pixels"]
    ious = dict(line.split(",") for line in (out / "per_class_iou.csv").read_text().splitlines()[1:])
    for name, iou in ious.items():
        assert float(iou) == pytest.approx(m["per_class"][name]["iou"], abs=1e-6)
    assert len(list((out / "overlays").glob("*.png"))) == min(2, m["images"])


@pytest.mark.slow
def test_semantic_checkpoint_end_to_end(shard_set, tmp_path, tiny_checkpoint):
    from segpipe.checkpoint import load_model
    from segpipe.inference import pad, padded_size
    from segpipe.metrics.semantic import ConfusionMatrix
    from segpipe.shards import iter_samples

    root, manifest = shard_set
    ckpt = tiny_checkpoint("unet", shards=root / "shards", base_channels=4, depth=2)
    out = tmp_path / "eval"
    ev.main(["--model", str(ckpt), "--shards", str(root / "shards"), "--out", str(out),
             "--set", "evaluate.batch_size=4", "--set", "evaluate.num_overlays=2"])
    m = json.loads((out / "metrics.json").read_text())
    _check_outputs(out, m, ckpt, root)
    assert "segm" not in m and json.loads((out / "detections.json").read_text()) == []
    # the same matrix computed image by image, unbatched, each image padded by replicating its edges
    model, meta = load_model(ckpt)
    cm = ConfusionMatrix(meta.num_classes, meta.ignore_index)
    with torch.no_grad():
        for s in iter_samples(root / "shards", split="val"):
            h, w = s["semantic"].shape
            logits = model(pad(normalize(s["image"]), *padded_size(h, w)))
            cm.update(s["semantic"], logits[0, :, :h, :w].argmax(0))
    assert m["pixels"] == int(cm.mat.sum())
    assert m["miou"] == pytest.approx(cm.compute([c["name"] for c in manifest["classes"]])["miou"])


@pytest.mark.slow
def test_instance_checkpoint_end_to_end(shard_set, tmp_path, tiny_checkpoint):
    root, manifest = shard_set
    ckpt = tiny_checkpoint("mask_rcnn", shards=root / "shards", box_head_dim=32, mask_head_channels=16)
    out = tmp_path / "eval"
    params = EvaluateParams(batch_size=2, num_overlays=2, score_threshold=0.0)
    m = ev.run(params, ckpt, root / "shards", out)
    _check_outputs(out, m, ckpt, root)
    things = [c["name"] for c in manifest["classes"] if c["isthing"]]
    assert set(m["per_class"]) == {*things, BACKGROUND}
    assert m["semantic_classes"] == "things+background"
    for iou_type in ("segm", "bbox"):
        assert list(m[iou_type])[:12] == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
                                          "ARs", "ARm", "ARl"]
        assert set(m[iou_type]["per_class"]) == set(things)
    dets = json.loads((out / "detections.json").read_text())
    assert isinstance(dets, list)
    # detections.json scores with the standalone command to the same numbers
    from segpipe.metrics.coco import evaluate_coco
    from segpipe.shards import iter_samples

    images, anns = [], []
    for i, s in enumerate(iter_samples(root / "shards", split="val"), 1):
        images.append({"id": i, "height": s["height"], "width": s["width"]})
        anns += ev.gt_annotations(s, i, len(anns) + 1, {c["id"] for c in manifest["classes"] if c["isthing"]})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c["id"], "name": c["name"]} for c in manifest["classes"] if c["isthing"]]}
    again = evaluate_coco(gt, dets, "segm")
    assert again["segm"]["AP"] == m["segm"]["AP"]


def test_baselines_are_fitted_on_train_and_scored_like_models(tiny_shards, tmp_path, capsys):
    from segpipe.baselines import fit_baselines
    from segpipe.metrics.semantic import ConfusionMatrix, compute
    from segpipe.params import EvaluateParams
    from segpipe.shards import iter_samples, open_shards

    out = tmp_path / "baselines"
    (tmp_path / "defaults.yaml").write_text("{}\n")
    ev.main(["--baselines", "--shards", str(tiny_shards), "--out", str(out), "--params", str(tmp_path / "defaults.yaml")])
    printed = capsys.readouterr().out
    assert "baseline majority on val" in printed and "baseline colour on val" in printed
    s = open_shards(tiny_shards)
    fitted = fit_baselines(((x["image"], x["semantic"]) for x in iter_samples(s, split="train")), s.num_classes,
                           s.ignore_index, EvaluateParams().colour_bits)
    for name in ("majority", "colour"):
        m = json.loads((out / name / "metrics.json").read_text())
        cm = ConfusionMatrix(s.num_classes, s.ignore_index)
        for x in iter_samples(s, split="val"):
            cm.update(x["semantic"], fitted[name].predict(x["image"]))
        assert m["miou"] == pytest.approx(compute(cm.mat)["miou"])
        assert m["baseline"] == name and m["shards_manifest_sha256"] == s.manifest_sha256 and m["split"] == "val"
        assert "miou_things" in m and (out / name / "per_class_iou.csv").read_text().startswith("class,iou\n")


def test_plan_chunks_cover_the_split_in_whole_batches_inside_each_shard(shard_set):
    from segpipe.shards import open_shards

    root, _ = shard_set
    s = open_shards(root / "shards")
    chunks = ev.plan_chunks(s, "val", 2)
    assert sum(c["stop"] - c["start"] for c in chunks) == s.rows("val")
    assert [c["first"] for c in chunks] == list(range(0, s.rows("val"), 2))
    assert all(c["stop"] <= s.files_of("val")[c["file"]].rows for c in chunks)


def test_detections_json_is_written_once_at_the_end_through_segpipe_files(shard_set, tmp_path, tiny_checkpoint,
                                                                       monkeypatch):
    from segpipe import files

    root, _ = shard_set
    ckpt = tiny_checkpoint("mask_rcnn", shards=root / "shards", box_head_dim=32, mask_head_channels=16, detects_things=True)
    written = []
    monkeypatch.setattr(ev, "atomic_write_json", lambda path, data: (written.append(path.name),
                                                                     files.atomic_write_json(path, data)))
    m = ev.run(EvaluateParams(batch_size=2, num_overlays=1, score_threshold=0.0), ckpt, root / "shards",
               tmp_path / "eval")
    assert written == ["detections.json", "metrics.json"]
    dets = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert dets and {d["image_id"] for d in dets} <= set(range(1, m["images"] + 1))


@pytest.mark.parametrize("arch, kwargs", [("unet", {"base_channels": 4, "depth": 2}),
                                          ("mask_rcnn", {"box_head_dim": 32, "mask_head_channels": 16,
                                                         "detects_things": True})])
def test_evaluate_scores_the_label_map_predict_writes(shard_set, tmp_path, tiny_checkpoint, arch, kwargs):
    """The map evaluate scores for an image is the one ``segpipe predict`` serves for it."""
    from PIL import Image

    from segpipe.commands import predict
    from segpipe.inference import DetectionSettings, Predictor
    from segpipe.params import PredictParams
    from segpipe.shards import iter_samples, open_shards

    root, _ = shard_set
    ckpt = tiny_checkpoint(arch, shards=root / "shards", **kwargs)
    samples = list(iter_samples(root / "shards", split="val"))[:2]
    threshold = 0.0  # every detection, so the maps hold many of them
    predictor = Predictor.load(ckpt, DetectionSettings(score_threshold=threshold))
    scorer = ev.ChunkScorer(predictor, open_shards(root / "shards").to_dict(), "val", 2, 0)
    (tmp_path / "in").mkdir()
    for s in samples:
        Image.fromarray(s["image"]).save(tmp_path / "in" / f"{s['image_id']}.png")
    predict.run(PredictParams(score_threshold=threshold), ckpt, tmp_path / "in", tmp_path / "out", progress=False)
    for s, pred in zip(samples, scorer.predict(samples)):
        served = np.asarray(Image.open(tmp_path / "out" / "labels" / f"{s['image_id']}.png"))
        assert served.shape == pred.labels.shape == s["semantic"].shape
        np.testing.assert_array_equal(served, pred.labels)
    if arch == "mask_rcnn":
        assert (pred.labels != 255).any()  # detections were rendered, not only "no detection"


@pytest.mark.slow
@pytest.mark.parametrize("arch, kwargs", [("unet", {"base_channels": 4, "depth": 2}),
                                          ("mask_rcnn", {"box_head_dim": 32, "mask_head_channels": 16,
                                                         "detects_things": True}),
                                          ("maskformer", {"num_queries": 8, "hidden_dim": 32, "dec_layers": 1,
                                                          "nheads": 2, "dim_feedforward": 32, "conv_dim": 32,
                                                          "mask_dim": 32, "thing_ids": [1, 2]})])
def test_ray_engine_gives_the_local_engines_metrics(shard_set, tmp_path, tiny_checkpoint, arch, kwargs):
    from segpipe.params import build

    root, _ = shard_set
    ckpt = tiny_checkpoint(arch, shards=root / "shards", **kwargs)
    # 1 per batch: several chunks; loose panoptic thresholds, so maskformer's random queries make segments
    params = build(EvaluateParams, {"batch_size": 1, "num_overlays": 2, "score_threshold": 0.0, "panoptic": {
        "maskformer": {"object_mask_threshold": 0.0, "overlap_threshold": 0.0}}}, "test")
    with one_thread_models_on_ray():
        local = ev.run(params, ckpt, root / "shards", tmp_path / "local")
        on_ray = ev.run(dataclasses.replace(params, engine="ray"), ckpt, root / "shards", tmp_path / "ray")
    assert on_ray == local
    if arch == "maskformer":
        assert local["panoptic"]["pq"] is not None
    for name in ("detections.json", "confusion_counts.csv", "per_class_iou.csv", "per_class_pq.csv"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    overlays = sorted(p.name for p in (tmp_path / "local" / "overlays").iterdir())
    assert len(overlays) == 2 and overlays == sorted(p.name for p in (tmp_path / "ray" / "overlays").iterdir())


# --------------------------------------------------------------------------------------
# Panoptic: MaskFormer natively, and the fused pair
# --------------------------------------------------------------------------------------

TINY_MASKFORMER = {"num_queries": 8, "hidden_dim": 32, "dec_layers": 1, "nheads": 2, "dim_feedforward": 32,
                   "conv_dim": 32, "mask_dim": 32}
LOOSE_PANOPTIC = {"maskformer": {"object_mask_threshold": 0.0, "overlap_threshold": 0.0}}


def _panoptic_checks(p: dict, csv: str) -> None:
    for key in ("pq", "sq", "rq", "pq_things", "sq_things", "rq_things", "pq_stuff", "sq_stuff", "rq_stuff"):
        assert key in p and (p[key] is None or 0.0 <= p[key] <= 1.0), key
    lines = csv.splitlines()
    assert lines[0] == "class,pq"
    scored = {n: v["pq"] for n, v in p["per_class"].items() if v["pq"] is not None}
    assert {n: pytest.approx(v, abs=1e-6) for n, v in scored.items()} == {
        line.rsplit(",", 1)[0]: float(line.rsplit(",", 1)[1]) for line in lines[1:]}


def test_maskformer_evaluation_adds_panoptic_metrics(shard_set, tmp_path, tiny_checkpoint):
    from segpipe.params import build

    root, _ = shard_set
    ckpt = tiny_checkpoint("maskformer", shards=root / "shards", thing_ids=[1, 2], **TINY_MASKFORMER)
    params = build(EvaluateParams, {"batch_size": 2, "num_overlays": 0, "panoptic": LOOSE_PANOPTIC}, "test")
    m = ev.run(params, ckpt, root / "shards", tmp_path / "eval")
    _panoptic_checks(m["panoptic"], (tmp_path / "eval" / "per_class_pq.csv").read_text())
    assert m["panoptic"]["pq"] is not None  # loose thresholds: segments were predicted and scored
    assert sum(v["tp"] + v["fp"] + v["fn"] for v in m["panoptic"]["per_class"].values()) > 0
    assert "segm" in m and m["task"] == "semantic"


def test_models_without_a_panoptic_output_write_an_empty_pq_table(shard_set, tmp_path, tiny_checkpoint):
    root, _ = shard_set
    ckpt = tiny_checkpoint("unet", shards=root / "shards", base_channels=4, depth=2)
    m = ev.run(EvaluateParams(batch_size=2, num_overlays=0), ckpt, root / "shards", tmp_path / "eval")
    assert "panoptic" not in m
    assert (tmp_path / "eval" / "per_class_pq.csv").read_text() == "class,pq\n"


def test_best_pair_takes_the_best_of_each_task_on_the_same_shards():
    from segpipe.params import FusionParams

    evals = {
        "fcn8s": {"task": "semantic", "miou": 0.4, "shards_manifest_sha256": "a", "split": "val"},
        "unet": {"task": "semantic", "miou": 0.6, "shards_manifest_sha256": "a", "split": "val"},
        "deeplabv3": {"task": "semantic", "miou": 0.9, "shards_manifest_sha256": "b", "split": "val"},  # other data
        "maskformer": {"task": "semantic", "miou": float("nan"), "segm": {"AP": 0.9}, "shards_manifest_sha256": "a",
                       "split": "val"},
        "mask_rcnn": {"task": "instance", "segm": {"AP": 0.2}, "shards_manifest_sha256": "a", "split": "val"},
    }
    assert ev.best_pair(evals, FusionParams(), "a", "val") == ("unet", "mask_rcnn")
    assert ev.best_pair(evals, FusionParams()) == ("deeplabv3", "mask_rcnn")
    with pytest.raises(ev.MetricsInputError, match="no instance evaluation with a finite segm.AP"):
        ev.best_pair({k: v for k, v in evals.items() if k != "mask_rcnn"}, FusionParams(), "a", "val")


def test_fuse_best_evaluates_the_pair_and_records_both_checkpoints(shard_set, tmp_path, tiny_checkpoint, capsys):
    from segpipe.checkpoint import weights_sha256

    root, _ = shard_set
    unet = tiny_checkpoint("unet", shards=root / "shards", base_channels=4, depth=2)
    rcnn = tiny_checkpoint("mask_rcnn", shards=root / "shards", box_head_dim=32, mask_head_channels=16,
                           detects_things=True)
    evals = tmp_path / "evals"
    params = EvaluateParams(batch_size=2, num_overlays=0)
    ev.run(params, unet, root / "shards", evals / "unet")
    ev.run(params, rcnn, root / "shards", evals / "mask_rcnn")
    ev.main(["--fuse-best", str(evals), "--shards", str(root / "shards"), "--out", str(evals / "fused"),
             "--set", "evaluate.batch_size=2", "--set", "evaluate.panoptic.fusion.score_threshold=0.0"])
    assert "fused unet + mask_rcnn" in capsys.readouterr().out
    m = json.loads((evals / "fused" / "metrics.json").read_text())
    assert m["task"] == "panoptic" and m["arch"] == "fused" and m["images"] > 0
    assert m["checkpoints"]["semantic"] == {"eval": str(evals / "unet"), "arch": "unet", "path": str(unet),
                                            "sha256": weights_sha256(unet)}
    assert m["checkpoints"]["instance"]["sha256"] == weights_sha256(rcnn)
    assert m["fusion"]["score_threshold"] == 0.0 and m["fusion"]["stuff_min_area"] == 64
    _panoptic_checks(m["panoptic"], (evals / "fused" / "per_class_pq.csv").read_text())
    # a second run skips its own output (task panoptic) and gives the same numbers
    again = ev.run_fused(dataclasses.replace(params, panoptic=dataclasses.replace(
        params.panoptic, fusion=dataclasses.replace(params.panoptic.fusion, score_threshold=0.0))),
        evals, root / "shards", evals / "fused")
    assert again == m


def test_fuse_best_without_an_instance_model_says_why_and_promote_reports_it(shard_set, tmp_path, tiny_checkpoint,
                                                                            capsys):
    from segpipe.stages import promote

    root, _ = shard_set
    unet = tiny_checkpoint("unet", shards=root / "shards", base_channels=4, depth=2)
    evals = tmp_path / "evals"
    ev.run(EvaluateParams(batch_size=2, num_overlays=0), unet, root / "shards", evals / "unet")
    ev.main(["--fuse-best", str(evals), "--shards", str(root / "shards"), "--out", str(tmp_path / "fused")])
    assert "no fused pair: no instance evaluation" in capsys.readouterr().err
    m = json.loads((tmp_path / "fused" / "metrics.json").read_text())
    assert m["task"] == "panoptic" and "no instance evaluation" in m["skipped"]
    assert (tmp_path / "fused" / "per_class_pq.csv").read_text() == "class,pq\n"
    c = promote.read_candidate(tmp_path / "fused")
    assert c.error and "no fused pair was evaluated" in c.error


@pytest.mark.slow
def test_fuse_best_gives_the_same_numbers_on_both_engines(shard_set, tmp_path, tiny_checkpoint):
    root, _ = shard_set
    unet = tiny_checkpoint("unet", shards=root / "shards", base_channels=4, depth=2)
    rcnn = tiny_checkpoint("mask_rcnn", shards=root / "shards", box_head_dim=32, mask_head_channels=16,
                           detects_things=True)
    evals = tmp_path / "evals"
    params = EvaluateParams(batch_size=1, num_overlays=0, score_threshold=0.0)  # 1 per batch: several chunks
    ev.run(params, unet, root / "shards", evals / "unet")
    ev.run(params, rcnn, root / "shards", evals / "mask_rcnn")
    with one_thread_models_on_ray():
        local = ev.run_fused(params, evals, root / "shards", tmp_path / "local")
        on_ray = ev.run_fused(dataclasses.replace(params, engine="ray"), evals, root / "shards", tmp_path / "ray")
    assert on_ray == local and local["panoptic"]["per_class"]
    assert (tmp_path / "ray" / "per_class_pq.csv").read_bytes() == (tmp_path / "local" / "per_class_pq.csv").read_bytes()
