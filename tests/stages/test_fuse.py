"""``segpipe fuse``: the best semantic and the best instance model, fused and scored."""

from __future__ import annotations

import json

import pytest

from segpipe.metrics.semantic import MetricsInputError
from segpipe.params import EvaluateParams, FuseParams, FusionParams
from segpipe.results import EvalResult
from segpipe.stages import evaluate as ev
from segpipe.stages import fuse

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def result(name: str, task: str, manifest: str = "a", **metrics) -> EvalResult:
    data = {"arch": name, "task": task, "checkpoint": {"path": name, "sha256": "s"}, "per_class": {},
            "shards_manifest_sha256": manifest, "split": "val", **metrics}
    return EvalResult.from_json(data, f"{name}/metrics.json")


def test_best_pair_takes_the_best_of_each_task_on_the_same_shards():
    evals = {
        "fcn8s": result("fcn8s", "semantic", miou=0.4),
        "unet": result("unet", "semantic", miou=0.6),
        "deeplabv3": result("deeplabv3", "semantic", manifest="b", miou=0.9),  # other data: not a candidate
        "maskformer": result("maskformer", "semantic", miou=float("nan"), segm={"AP": 0.9}),
        "mask_rcnn": result("mask_rcnn", "instance", segm={"AP": 0.2}),
    }
    assert fuse.best_pair(evals, FuseParams(), "a", "val") == ("unet", "mask_rcnn")
    with pytest.raises(MetricsInputError, match="no instance evaluation"):  # only deeplabv3 was scored on "b"
        fuse.best_pair(evals, FuseParams(), "b", "val")
    with pytest.raises(MetricsInputError, match="no instance evaluation with a finite segm.AP"):
        fuse.best_pair({k: v for k, v in evals.items() if k != "mask_rcnn"}, FuseParams(), "a", "val")
    with pytest.raises(MetricsInputError, match="no semantic evaluation"):
        fuse.best_pair(evals, FuseParams(), "a", "test")


def test_fuse_scores_the_pair_and_records_both_checkpoints(eval_shards, tmp_path, tiny_checkpoint, capsys):
    from segpipe.checkpoint import weights_sha256

    unet = tiny_checkpoint("unet", shards=eval_shards, base_channels=4, depth=2)
    rcnn = tiny_checkpoint("mask_rcnn", shards=eval_shards, box_head_dim=32, mask_head_channels=16, detects_things=True)
    evals = tmp_path / "evals"
    params = EvaluateParams(batch_size=2, num_overlays=0)
    ev.run(params, unet, eval_shards, evals / "unet")
    ev.run(params, rcnn, eval_shards, evals / "mask_rcnn")
    fuse.main(["--evals", str(evals), "--shards", str(eval_shards), "--out", str(evals / "fused"),
               "--set", "evaluate.batch_size=2", "--set", "fuse.fusion.score_threshold=0.0"])
    assert "fused unet + mask_rcnn" in capsys.readouterr().out
    m = json.loads((evals / "fused" / "metrics.json").read_text())
    assert m["task"] == "panoptic" and m["arch"] == "fused" and m["images"] > 0
    assert m["checkpoints"]["semantic"] == {"eval": str(evals / "unet"), "arch": "unet", "path": str(unet),
                                            "sha256": weights_sha256(unet)}
    assert m["checkpoints"]["instance"]["sha256"] == weights_sha256(rcnn)
    assert m["fusion"]["score_threshold"] == 0.0 and m["fusion"]["stuff_min_area"] == 64
    assert m["scoring"] == params.scoring_key() and set(m["per_collection"]) == {"raw"}
    lines = (evals / "fused" / "per_class_pq.csv").read_text().splitlines()
    assert lines[0] == "class,pq" and len(lines) == 1 + sum(v["pq"] is not None for v in m["panoptic"]["per_class"].values())
    result = EvalResult.read(evals / "fused")
    assert result.kind == "fused" and set(result.verify()) == {"semantic", "instance"}
    # a second run skips its own output and gives the same numbers
    again = fuse.run(FuseParams(fusion=FusionParams(score_threshold=0.0)), params, evals, eval_shards, evals / "fused")
    assert again == m


def test_fuse_without_an_instance_model_says_why_and_promote_reports_it(eval_shards, tmp_path, tiny_checkpoint, capsys):
    from segpipe.stages import promote

    unet = tiny_checkpoint("unet", shards=eval_shards, base_channels=4, depth=2)
    evals = tmp_path / "evals"
    ev.run(EvaluateParams(batch_size=2, num_overlays=0), unet, eval_shards, evals / "unet")
    fuse.main(["--evals", str(evals), "--shards", str(eval_shards), "--out", str(tmp_path / "fused")])
    assert "no fused pair: no instance evaluation" in capsys.readouterr().err
    m = json.loads((tmp_path / "fused" / "metrics.json").read_text())
    assert m["task"] == "panoptic" and "no instance evaluation" in m["skipped"]
    assert (tmp_path / "fused" / "per_class_pq.csv").read_text() == "class,pq\n"
    c = promote.read_candidate(tmp_path / "fused")
    assert c.error and "no fused pair was evaluated" in c.error
