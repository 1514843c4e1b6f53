"""``segpipe evaluate``: batching at native resolution, instance rendering, the DVC files, and
end to end on a small synthetic shard set for a semantic and an instance checkpoint."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from segpipe.checkpoint import save_checkpoint
from segpipe.metrics.semantic import BACKGROUND
from segpipe.models import build_model, default_kwargs, normalize
from segpipe.params import ConvertParams, EvaluateParams, SynthParams
from segpipe.stages import evaluate as ev

# pycocotools' decode under numpy 2 (its own deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


class PerPixel(nn.Module):
    """Logits depend on the pixel only, so padding must not change them."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 4


def test_batched_padded_prediction_equals_per_image():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((37, 50), (64, 20), (33, 33))]
    model = PerPixel().eval()
    batched = ev.predict_semantic(model, images, 3)
    for im, pred in zip(images, batched):
        assert pred.shape == im.shape[:2] and pred.dtype == np.uint8
        ref = model(normalize(im)).argmax(1)[0].numpy()
        np.testing.assert_array_equal(pred, ref)
    assert ev.pad_batch(images).shape == (3, 3, 64, 64)


def test_render_instances_best_score_wins_and_uncovered_is_none():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True  # score 0.9, class 1
    masks[1, :3, :3] = True  # score 0.5, class 2
    inst = {"labels": np.array([1, 2]), "scores": np.array([0.9, 0.5]), "masks": masks, "boxes": np.zeros((2, 4))}
    out = ev.render_instances(inst, 4, 4, 255)
    assert out[0, 0] == 1 and out[2, 2] == 2 and out[0, 2] == 2 and out[3, 3] == 255


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


def _checkpoint(root: Path, manifest: dict, arch: str, **kwargs) -> Path:
    from segpipe.shards import manifest_hash

    torch.manual_seed(0)
    classes = manifest["classes"]
    k = max(c["id"] for c in classes) + 1
    model = build_model(arch, k, **kwargs)
    meta = {"arch": arch, "task": "instance" if arch == "mask_rcnn" else "semantic", "num_classes": k,
            "classes": classes, "ignore_index": manifest.get("ignore_index", 255),
            "model_kwargs": {**default_kwargs(arch), **kwargs},
            "shards_manifest_sha256": manifest_hash(root / "shards"), "image_size": 64}
    return save_checkpoint(root / f"ckpt_{arch}", model, meta)


def _check_outputs(out: Path, m: dict, ckpt: Path, root: Path) -> None:
    from segpipe.checkpoint import weights_sha256
    from segpipe.shards import manifest_hash

    assert m == json.loads((out / "metrics.json").read_text())
    assert m["checkpoint"] == {"path": str(ckpt), "sha256": weights_sha256(ckpt)}
    assert m["shards_manifest_sha256"] == manifest_hash(root / "shards")
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
def test_semantic_checkpoint_end_to_end(shard_set, tmp_path):
    from segpipe.checkpoint import load_model
    from segpipe.metrics.semantic import ConfusionMatrix
    from segpipe.shards import iter_samples

    root, manifest = shard_set
    ckpt = _checkpoint(root, manifest, "unet", base_channels=4, depth=2)
    out = tmp_path / "eval"
    ev.main(["--model", str(ckpt), "--shards", str(root / "shards"), "--out", str(out),
             "--set", "evaluate.batch_size=4", "--set", "evaluate.num_overlays=2"])
    m = json.loads((out / "metrics.json").read_text())
    _check_outputs(out, m, ckpt, root)
    assert "segm" not in m and json.loads((out / "detections.json").read_text()) == []
    # the same matrix computed image by image, unbatched
    model, meta = load_model(ckpt)
    cm = ConfusionMatrix(meta["num_classes"], meta["ignore_index"])
    with torch.no_grad():
        for s in iter_samples(root / "shards", split="val"):
            cm.update(s["semantic"], model(normalize(s["image"])).argmax(1)[0])
    assert m["pixels"] == int(cm.mat.sum())
    assert m["miou"] == pytest.approx(cm.compute([c["name"] for c in manifest["classes"]])["miou"])


@pytest.mark.slow
def test_instance_checkpoint_end_to_end(shard_set, tmp_path):
    root, manifest = shard_set
    ckpt = _checkpoint(root, manifest, "mask_rcnn", box_head_dim=32, mask_head_channels=16)
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
