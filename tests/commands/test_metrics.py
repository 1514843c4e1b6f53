"""``segpipe metrics semantic|coco``: files in, the documented JSON out (Boundary IoU beside mIoU,
Boundary AP on request), errors naming the file."""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segpipe.commands.metrics import main
from segpipe.metrics.boundary import BoundaryIoU
from segpipe.metrics.coco import STAT_NAMES

# pycocotools' decode under numpy 2 (its own deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _png(path: Path, arr, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8), mode=mode).save(path)


def _pair(tmp_path):
    _png(tmp_path / "gt" / "a.png", [[0, 1], [1, 1]])
    _png(tmp_path / "pred" / "a.png", [[0, 0], [1, 1]])
    _png(tmp_path / "gt" / "b.png", [[0, 0, 0], [1, 1, 255], [0, 1, 0]])
    _png(tmp_path / "pred" / "b.png", [[0, 0, 1], [1, 0, 2], [0, 1, 0]])
    return tmp_path / "gt", tmp_path / "pred"


def test_semantic_writes_the_documented_json(tmp_path):
    gt, pred = _pair(tmp_path)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps([{"id": i, "name": n, "isthing": i > 0, "color": [i, i, i]}
                                   for i, n in enumerate(["ground", "worker", "cone"])]))
    out = tmp_path / "m.json"
    main(["semantic", "--gt", str(gt), "--pred", str(pred), "--num-classes", "3",
          "--classes", str(classes), "--out", str(out)])
    m = json.loads(out.read_text())
    assert {"pixel_acc", "mean_acc", "miou", "boundary_iou", "fwiou", "mdice", "per_class"} <= set(m)
    # a: [[1,0],[1,2]]; b: [[4,1,0],[1,2,0],[0,0,0]]  -> [[5,1,0],[2,4,0],[0,0,0]]
    assert m["pixel_acc"] == pytest.approx(9 / 12)
    assert m["per_class"]["ground"]["iou"] == pytest.approx(5 / (6 + 7 - 5))
    assert m["per_class"]["worker"]["iou"] == pytest.approx(4 / (6 + 5 - 4))
    assert m["per_class"]["cone"] == {"iou": None, "dice": None, "acc": None, "boundary_iou": None}
    assert m["miou"] == pytest.approx((5 / 8 + 4 / 7) / 2)
    # in images this small every pixel is within d = 1 of the edge: boundary IoU is the IoU
    assert m["per_class"]["ground"]["boundary_iou"] == pytest.approx(5 / 8)
    assert m["per_class"]["worker"]["boundary_iou"] == pytest.approx(4 / 7)
    assert m["boundary_iou"] == pytest.approx(m["miou"])


def test_semantic_boundary_iou_and_ratio(tmp_path, capsys):
    rng = np.random.default_rng(0)
    acc = {r: BoundaryIoU(3, 255, r) for r in (0.02, 0.1)}
    for i in range(3):
        gt = np.kron(rng.integers(0, 3, (8, 8)), np.ones((8, 8), np.int64)).astype(np.uint8)
        pred = np.roll(gt, 2, axis=1)
        gt[10] = 255
        _png(tmp_path / "gt" / f"{i}.png", gt)
        _png(tmp_path / "pred" / f"{i}.png", pred)
        for a in acc.values():
            a.update(gt, pred)
    for ratio, a in acc.items():
        out = tmp_path / f"m{ratio}.json"
        main(["semantic", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"), "--num-classes", "3",
              "--boundary-ratio", str(ratio), "--out", str(out)])
        m = json.loads(out.read_text())
        want = a.compute()
        assert m["boundary_iou"] == pytest.approx(want["boundary_iou"])
        assert {n: c["boundary_iou"] for n, c in m["per_class"].items()} == pytest.approx(want["per_class"])
        assert f"boundary_iou {want['boundary_iou']:.4f}" in capsys.readouterr().out
    assert json.loads((tmp_path / "m0.02.json").read_text())["boundary_iou"] < m["boundary_iou"]
    with pytest.raises(SystemExit):
        main(["semantic", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"), "--num-classes", "3",
              "--boundary-ratio", "0", "--out", str(tmp_path / "x.json")])
    assert "--boundary-ratio must be a finite number > 0, got 0.0" in capsys.readouterr().err


def test_semantic_palette_pngs_read_as_indices(tmp_path):
    arr = np.array([[0, 1], [2, 2]], np.uint8)
    for d in ("gt", "pred"):
        im = Image.fromarray(arr, mode="P")
        im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3))
        (tmp_path / d).mkdir()
        im.save(tmp_path / d / "x.png")
    out = tmp_path / "m.json"
    main(["semantic", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"), "--num-classes", "3",
          "--out", str(out)])
    assert json.loads(out.read_text())["miou"] == 1.0


@pytest.mark.parametrize("setup, message", [
    (lambda t: (t / "pred" / "b.png").unlink(), r"pred: no prediction for 1 ground-truth file\(s\), e.g. b.png"),
    (lambda t: _png(t / "pred" / "c.png", [[0]]), r"without ground truth, e.g. c.png"),
    (lambda t: _png(t / "pred" / "a.png", [[0, 0, 1], [1, 1, 1]]), r"pred/a.png: size 3x2 != ground truth 2x2"),
    (lambda t: _png(t / "gt" / "a.png", [[0, 9], [1, 1]]), r"pred/a.png .*gt/a.png\): ground truth value 9"),
    (lambda t: _png(t / "pred" / "a.png", [[0, 3], [1, 1]]), r"pred/a.png .*prediction value 3"),
    (lambda t: Image.new("RGB", (2, 2)).save(t / "pred" / "a.png"), r"pred/a.png: PNG mode 'RGB'"),
])
def test_semantic_errors_name_the_file(tmp_path, capsys, setup, message):
    gt, pred = _pair(tmp_path)
    setup(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["semantic", "--gt", str(gt), "--pred", str(pred), "--num-classes", "3", "--out", str(tmp_path / "m.json")])
    assert e.value.code == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "m.json").exists()


def test_semantic_bad_classes_file(tmp_path, capsys):
    gt, pred = _pair(tmp_path)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps([{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]))
    with pytest.raises(SystemExit):
        main(["semantic", "--gt", str(gt), "--pred", str(pred), "--num-classes", "3", "--classes", str(classes),
              "--out", str(tmp_path / "m.json")])
    assert "classes.json: no entry for class id(s) [2]" in capsys.readouterr().err


def _coco_data():
    rng = np.random.default_rng(0)
    images, anns, dets = [], [], []
    for iid in (1, 2, 3):
        images.append({"id": iid, "height": 40, "width": 50})
        for k in range(3):
            m = np.zeros((40, 50), np.uint8)
            y, x = rng.integers(0, 30), rng.integers(0, 40)
            m[y:y + 10, x:x + 10] = 1
            rle = mask_util.encode(np.asfortranarray(m))
            rle = {"size": [40, 50], "counts": rle["counts"].decode()}
            box = [float(x), float(y), 10.0, 10.0]
            cat = 1 + k % 2
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cat, "iscrowd": 0,
                         "area": 100.0, "bbox": box, "segmentation": rle})
            if rng.random() < 0.7:
                dets.append({"image_id": iid, "category_id": cat, "score": float(rng.random()),
                             "bbox": [box[0] + 1, box[1], 10.0, 10.0], "segmentation": rle})
    cats = [{"id": 1, "name": "worker"}, {"id": 2, "name": "excavator"}, {"id": 5, "name": "cone"}]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _pycocotools_ap(gt, dets, iou_type):
    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO()
        c.dataset = copy.deepcopy(gt)
        c.createIndex()
        ev = COCOeval(c, c.loadRes(copy.deepcopy(dets)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0]


def test_coco_command(tmp_path, capsys):
    gt, dets = _coco_data()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    for iou_type in ("segm", "bbox"):
        out = tmp_path / f"{iou_type}.json"
        main(["coco", "--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "dt.json"),
              "--iou-type", iou_type, "--out", str(out)])
        m = json.loads(out.read_text())
        assert set(m) == {iou_type, "per_class"}
        assert list(m[iou_type]) == list(STAT_NAMES)
        assert m[iou_type]["AP"] == pytest.approx(_pycocotools_ap(gt, dets, iou_type), abs=1e-6)
        assert set(m["per_class"]) == {"worker", "excavator", "cone"}
    main(["coco", "--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "dt.json"), "--iou-type", "segm",
          "--boundary-ap", "--out", str(tmp_path / "b.json")])
    b = json.loads((tmp_path / "b.json").read_text())
    assert list(b["segm"]) == [*STAT_NAMES, "boundary_AP"] and 0 < b["segm"]["boundary_AP"] <= b["segm"]["AP"]
    assert f"boundary_AP {b['segm']['boundary_AP']:.4f}" in capsys.readouterr().out
    main(["coco", "--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "dt.json"), "--iou-type", "segm",
          "--boundary-ratio", "0.2", "--out", str(tmp_path / "b2.json")])
    assert json.loads((tmp_path / "b2.json").read_text())["segm"]["boundary_AP"] >= b["segm"]["boundary_AP"]
    with pytest.raises(SystemExit):
        main(["coco", "--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "dt.json"), "--iou-type", "bbox",
              "--boundary-ap", "--out", str(tmp_path / "x.json")])
    assert "--boundary-ap / --boundary-ratio need --iou-type segm" in capsys.readouterr().err
    assert gc.isenabled()  # paused while scoring only, errors included (the one below)
    dets[3]["segmentation"]["size"] = [1, 1]
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    with pytest.raises(SystemExit):
        main(["coco", "--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "dt.json"),
              "--iou-type", "segm", "--out", str(tmp_path / "x.json")])
    assert "dt.json: detection #3" in capsys.readouterr().err
    assert gc.isenabled()
