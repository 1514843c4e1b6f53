"""``segpipe evaluate``: the DVC files, end to end on a small synthetic shard set for a semantic, an
instance and a panoptic checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from segpipe import scoring
from segpipe.metrics.semantic import BACKGROUND
from segpipe.models import normalize
from segpipe.params import EvaluateParams, build
from segpipe.stages import evaluate as ev

# pycocotools' decode under numpy 2 (its own deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _check_outputs(out: Path, m: dict, ckpt: Path, shards: Path, params: EvaluateParams | None = None) -> None:
    from segpipe.checkpoint import weights_sha256
    from segpipe.shards import open_shards

    assert m == json.loads((out / "metrics.json").read_text())
    assert m["checkpoint"] == {"path": str(ckpt), "sha256": weights_sha256(ckpt)}
    assert m["shards_manifest_sha256"] == open_shards(shards).manifest_sha256
    assert m["split"] == "val" and m["images"] > 0 and m["scoring"] == (params or EvaluateParams()).scoring_key()
    for key in ("pixel_acc", "mean_acc", "miou", "fwiou", "mdice"):
        assert m[key] is None or 0.0 <= m[key] <= 1.0
    lines = (out / "confusion.csv").read_text().splitlines()
    assert lines[0] == "actual,predicted" and len(lines) == 1 + scoring.CONFUSION_ROWS
    counts = [line.split(",") for line in (out / "confusion_counts.csv").read_text().splitlines()[1:]]
    assert sum(int(c[2]) for c in counts) == m["pixels"]
    lines = (out / "per_class_iou.csv").read_text().splitlines()
    boundary = m["task"] == "semantic"  # Boundary IoU of semantic models' label maps
    assert lines[0] == ("class,iou,boundary_iou" if boundary else "class,iou")
    for line in lines[1:]:
        name, iou, *b = line.split(",")
        assert float(iou) == pytest.approx(m["per_class"][name]["iou"], abs=1e-6)
        if boundary and b[0]:
            assert float(b[0]) == pytest.approx(m["per_class"][name]["boundary_iou"], abs=1e-6)
    assert len(list((out / "overlays").glob("*.png"))) == min(2, m["images"])
    (collection,) = m["per_collection"]  # one collection: its numbers are the split's
    assert m["per_collection"][collection]["miou"] == m["miou"]
    assert (out / "per_collection.csv").read_text().startswith("collection,images,miou")


def test_semantic_checkpoint_end_to_end(eval_shards, tmp_path, tiny_checkpoint):
    from segpipe.checkpoint import load_model
    from segpipe.inference import pad, padded_size
    from segpipe.metrics.semantic import ConfusionMatrix
    from segpipe.shards import iter_samples, open_shards

    ckpt = tiny_checkpoint("unet", shards=eval_shards, base_channels=4, depth=2)
    out = tmp_path / "eval"
    ev.main(["--model", str(ckpt), "--shards", str(eval_shards), "--out", str(out),
             "--set", "evaluate.batch_size=4", "--set", "evaluate.num_overlays=2"])
    m = json.loads((out / "metrics.json").read_text())
    _check_outputs(out, m, ckpt, eval_shards)
    assert "segm" not in m and json.loads((out / "detections.json").read_text()) == []
    assert 0 <= m["boundary_iou"] <= 1 and m["per_collection"]["raw"]["boundary_iou"] == m["boundary_iou"]
    assert "panoptic" not in m and (out / "per_class_pq.csv").read_text() == "class,pq\n"
    # the same matrix computed image by image, unbatched, each image padded by replicating its edges
    model, meta = load_model(ckpt)
    cm = ConfusionMatrix(meta.num_classes, meta.ignore_index)
    with torch.no_grad():
        for s in iter_samples(eval_shards, split="val"):
            h, w = s["semantic"].shape
            logits = model(pad(normalize(s["image"]), *padded_size(h, w)))
            cm.update(s["semantic"], logits[0, :, :h, :w].argmax(0))
    assert m["pixels"] == int(cm.mat.sum())
    assert m["miou"] == pytest.approx(cm.compute([c["name"] for c in open_shards(eval_shards).classes])["miou"])


def test_instance_checkpoint_end_to_end_writes_detections_once(eval_shards, tmp_path, tiny_checkpoint, monkeypatch):
    from segpipe import files
    from segpipe.metrics.coco import evaluate_coco
    from segpipe.shards import iter_samples, open_shards

    classes = open_shards(eval_shards).classes
    ckpt = tiny_checkpoint("mask_rcnn", shards=eval_shards, box_head_dim=32, mask_head_channels=16, detects_things=True)
    out = tmp_path / "eval"
    written = []
    for module in (ev, scoring):
        monkeypatch.setattr(module, "atomic_write_json", lambda path, data: (written.append(path.name),
                                                                             files.atomic_write_json(path, data)))
    params = build(EvaluateParams, {"batch_size": 2, "num_overlays": 2, "detection": {"score_threshold": 0.0}}, "t")
    m = ev.run(params, ckpt, eval_shards, out)
    assert written == ["detections.json", "metrics.json"]  # each once, at the end
    _check_outputs(out, m, ckpt, eval_shards, params)
    things = [c["name"] for c in classes if c["isthing"]]
    assert set(m["per_class"]) == {*things, BACKGROUND}
    assert m["semantic_classes"] == "things+background"
    for iou_type in ("segm", "bbox"):
        assert list(m[iou_type])[:12] == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
                                          "ARs", "ARm", "ARl"]
        assert set(m[iou_type]["per_class"]) == set(things)
    assert "boundary_AP" in m["segm"] and "boundary_AP" not in m["bbox"] and "boundary_iou" not in m
    dets = json.loads((out / "detections.json").read_text())
    assert dets and {d["image_id"] for d in dets} <= set(range(1, m["images"] + 1))
    # detections.json scores with the standalone command to the same numbers
    images, anns = [], []
    for i, s in enumerate(iter_samples(eval_shards, split="val"), 1):
        images.append({"id": i, "height": s["height"], "width": s["width"]})
        anns += scoring.gt_annotations(s, i, len(anns) + 1, {c["id"] for c in classes if c["isthing"]})
    gt = {"images": images, "annotations": anns, "categories": [{"id": c["id"], "name": c["name"]} for c in classes
                                                                if c["isthing"]]}
    assert evaluate_coco(gt, dets, "segm")["segm"]["AP"] == m["segm"]["AP"]


def _panoptic_checks(p: dict, csv: str) -> None:
    for key in ("pq", "sq", "rq", "pq_things", "sq_things", "rq_things", "pq_stuff", "sq_stuff", "rq_stuff"):
        assert key in p and (p[key] is None or 0.0 <= p[key] <= 1.0), key
    lines = csv.splitlines()
    assert lines[0] == "class,pq"
    scored = {n: v["pq"] for n, v in p["per_class"].items() if v["pq"] is not None}
    assert {n: pytest.approx(v, abs=1e-6) for n, v in scored.items()} == {
        line.rsplit(",", 1)[0]: float(line.rsplit(",", 1)[1]) for line in lines[1:]}


def test_maskformer_evaluation_adds_panoptic_metrics(eval_shards, tmp_path, tiny_checkpoint, tiny_maskformer):
    ckpt = tiny_checkpoint("maskformer", shards=eval_shards, thing_ids=[1, 2], **tiny_maskformer)
    params = build(EvaluateParams, {"batch_size": 2, "num_overlays": 0, "panoptic": {
        "object_mask_threshold": 0.0, "overlap_threshold": 0.0}}, "test")
    m = ev.run(params, ckpt, eval_shards, tmp_path / "eval")
    _panoptic_checks(m["panoptic"], (tmp_path / "eval" / "per_class_pq.csv").read_text())
    assert m["panoptic"]["pq"] is not None  # loose thresholds: segments were predicted and scored
    assert sum(v["tp"] + v["fp"] + v["fn"] for v in m["panoptic"]["per_class"].values()) > 0
    assert "segm" in m and m["task"] == "semantic"
    (c,) = m["per_collection"]
    assert m["per_collection"][c]["panoptic"]["pq"] == m["panoptic"]["pq"]


def test_a_uri_of_an_unknown_scheme_is_refused_naming_the_argument(tmp_path, tiny_checkpoint, capsys):
    from segpipe.cli import main

    ckpt = tiny_checkpoint("unet", base_channels=4, depth=2)
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--model", str(ckpt), "--shards", "nope://bucket/shards", "--out", str(tmp_path / "x")])
    assert e.value.code == 1 and "--shards" in capsys.readouterr().err and not (tmp_path / "x").exists()
