"""``segpipe.scoring``: the pieces evaluate, fuse and promote's re-scoring share; the same label maps
as predict; the same numbers from both engines; metrics per source collection."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest

from segpipe import scoring
from segpipe.params import DetectionParams, EvaluateParams, FusionParams, build

# pycocotools' decode under numpy 2 (its own deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_confusion_rows_are_proportional_and_sum_to_the_budget():
    mat = np.array([[700, 300], [0, 1000]])
    rows = scoring.confusion_rows(mat, ["a", "b"], rows=100)
    assert Counter(rows) == {("a", "a"): 35, ("a", "b"): 15, ("b", "b"): 50}
    assert scoring.confusion_rows(np.zeros((2, 2), int), ["a", "b"]) == []


def test_plan_chunks_cover_the_split_in_whole_batches_inside_each_shard(eval_shards):
    from segpipe.shards import open_shards

    s = open_shards(eval_shards)
    chunks = scoring.plan_chunks(s, "val", 2)
    assert sum(c["stop"] - c["start"] for c in chunks) == s.rows("val")
    assert [c["first"] for c in chunks] == list(range(0, s.rows("val"), 2))
    assert all(c["stop"] <= s.files_of("val")[c["file"]].rows for c in chunks)


@pytest.mark.parametrize("arch, kwargs", [("unet", {"base_channels": 4, "depth": 2}),
                                          ("mask_rcnn", {"box_head_dim": 32, "mask_head_channels": 16,
                                                         "detects_things": True})])
def test_scoring_uses_the_label_map_predict_writes(eval_shards, tmp_path, tiny_checkpoint, arch, kwargs):
    """The map scored for an image is the one ``segpipe predict`` serves for it."""
    from PIL import Image

    from segpipe.commands import predict
    from segpipe.inference import Predictor
    from segpipe.params import PredictParams
    from segpipe.shards import iter_samples, open_shards

    ckpt = tiny_checkpoint(arch, shards=eval_shards, **kwargs)
    samples = list(iter_samples(eval_shards, split="val"))[:2]
    every = DetectionParams(score_threshold=0.0)  # every detection, so the maps hold many of them
    scorer = scoring.ChunkScorer(Predictor.load(ckpt, every), open_shards(eval_shards).to_dict(), "val", 2, 0)
    (tmp_path / "in").mkdir()
    for s in samples:
        Image.fromarray(s["image"]).save(tmp_path / "in" / f"{s['image_id']}.png")
    predict.run(PredictParams(detection=every), ckpt, tmp_path / "in", tmp_path / "out", progress=False)
    for s, pred in zip(samples, scorer.predict(samples)):
        served = np.asarray(Image.open(tmp_path / "out" / "labels" / f"{s['image_id']}.png"))
        assert served.shape == pred.labels.shape == s["semantic"].shape
        np.testing.assert_array_equal(served, pred.labels)
    if arch == "mask_rcnn":
        assert (pred.labels != 255).any()  # detections were rendered, not only "no detection"


@pytest.mark.slow
def test_ray_engine_gives_the_local_engines_numbers(eval_shards, tmp_path, tiny_checkpoint, ray_session,
                                                    tiny_maskformer, two_torch_threads):
    """One Ray, four cases: a semantic, an instance and a panoptic model, and a fused pair. Each is
    scored in this process and on a Ray Data actor pool (1 image per batch: several chunks), with the
    same metrics and files, on a pool of two actors (``two_torch_threads``)."""
    from segpipe.shards import open_shards

    shards = open_shards(eval_shards)
    params = build(EvaluateParams, {"batch_size": 1, "num_overlays": 2, "detection": {"score_threshold": 0.0},
                                    "panoptic": {"object_mask_threshold": 0.0, "overlap_threshold": 0.0}}, "test")
    models = {"unet": tiny_checkpoint("unet", shards=eval_shards, base_channels=4, depth=2),
              "mask_rcnn": tiny_checkpoint("mask_rcnn", shards=eval_shards, box_head_dim=32, mask_head_channels=16,
                                           detects_things=True),
              "maskformer": tiny_checkpoint("maskformer", shards=eval_shards, thing_ids=[1, 2], **tiny_maskformer)}
    for arch, ckpt in models.items():
        outs = {e: tmp_path / arch / e for e in ("local", "ray")}
        got = {e: scoring.score_checkpoint(ckpt, shards, build(EvaluateParams, {**_as(params), "engine": e}, "t"),
                                           out=outs[e]) for e in outs}
        assert got["ray"] == got["local"], arch
        for name in ("detections.json", "confusion_counts.csv", "per_class_iou.csv", "per_class_pq.csv",
                     "per_collection.csv"):
            assert (outs["ray"] / name).read_bytes() == (outs["local"] / name).read_bytes(), (arch, name)
        overlays = sorted(p.name for p in (outs["local"] / "overlays").iterdir())
        assert len(overlays) == 2 and overlays == sorted(p.name for p in (outs["ray"] / "overlays").iterdir())
        if arch == "maskformer":
            assert got["local"]["panoptic"]["pq"] is not None
    fused = {e: scoring.score_fused(models["unet"], models["mask_rcnn"], FusionParams(score_threshold=0.0),
                                    shards, build(EvaluateParams, {**_as(params), "engine": e}, "t"))
             for e in ("local", "ray")}
    assert fused["ray"] == fused["local"] and fused["local"]["panoptic"]["per_class"]


def _as(params: EvaluateParams) -> dict:
    from segpipe.params import as_dict

    return as_dict(params)


def test_metrics_per_collection_add_up_to_the_split(tmp_path, tiny_checkpoint):
    """Two source collections in one split: each gets its own numbers, computed as if it were scored
    alone, and the overall numbers are those of the whole split."""
    from segpipe.formats.coco import read_collections
    from segpipe.params import ConvertParams, SynthParams
    from segpipe.stages import convert, synth

    raw = tmp_path / "raw"
    synth.run(SynthParams(images=6, size=(64, 64), workers=1, seed=1), raw / "alpha")
    synth.run(SynthParams(images=5, size=(64, 64), workers=1, seed=2, palette="arid"), raw / "beta")
    convert.run(ConvertParams(workers=1, val_fraction=0.5), read_collections(raw), tmp_path / "both", progress=False)
    shutil.copytree(raw / "beta", tmp_path / "only" / "beta")  # a folder of one collection: the same ids and splits
    convert.run(ConvertParams(workers=1, val_fraction=0.5), read_collections(tmp_path / "only"), tmp_path / "beta",
                progress=False)
    from segpipe.shards import open_shards

    both, beta = open_shards(tmp_path / "both"), open_shards(tmp_path / "beta")
    assert set(both.collections) == {"alpha", "beta"} and set(beta.collections) == {"beta"}
    ckpt = tiny_checkpoint("mask_rcnn", shards=tmp_path / "both", box_head_dim=32, mask_head_channels=16,
                           detects_things=True)
    params = build(EvaluateParams, {"batch_size": 2, "num_overlays": 0, "detection": {"score_threshold": 0.0}}, "t")
    m = scoring.score_checkpoint(ckpt, both, params, out=tmp_path / "eval")
    per = m["per_collection"]
    assert sorted(per) == ["alpha", "beta"]
    assert sum(p["images"] for p in per.values()) == m["images"] == both.rows("val")
    alone = scoring.score_checkpoint(ckpt, beta, params)
    assert per["beta"]["images"] == alone["images"]
    for key in ("miou", "pixel_acc", "miou_things"):
        assert per["beta"][key] == pytest.approx(alone[key]), key
    assert per["beta"]["segm"]["AP"] == pytest.approx(alone["segm"]["AP"])
    rows = (tmp_path / "eval" / "per_collection.csv").read_text().splitlines()
    assert rows[0].startswith("collection,images,miou") and [r.split(",")[0] for r in rows[1:]] == ["alpha", "beta"]
    assert json.loads((tmp_path / "eval" / "detections.json").read_text()) is not None
