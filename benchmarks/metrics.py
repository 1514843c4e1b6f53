"""Metric speed: the confusion matrix, Boundary IoU, and ``segpipe metrics coco`` against pycocotools.

    .venv/bin/python benchmarks/metrics.py [--only confusion|boundary|coco]
        [--images 200] [--size 512] [--classes 20] [--repeats 5]                  # confusion matrix
        [--boundary-images 20] [--boundary-size 1024] [--boundary-classes 12]     # Boundary IoU
        [--coco-images 500] [--dets-per-image 100] [--coco-runs 5]              # COCO

Confusion matrix: both sides see the same label maps one image at a time (as evaluation feeds
them). The baseline is the bare ``np.bincount(K * gt + pred, minlength=K * K)``: no ignore
handling, no range checks (on uint8 maps it must widen first, or K * gt overflows).
``ConfusionMatrix.update`` skips ignored pixels and rejects out-of-range values. Two input dtypes:
uint8 (label PNGs, argmax cast down) and int64 (torch's argmax).

Boundary IoU: milliseconds per ``BoundaryIoU.update`` of one image (a blocky label map and a
shifted, noisy prediction), against the confusion matrix's update on the same pair.

COCO: ground truth of ``--coco-images`` synthetic images (COCO-sized, 6-10 objects of every
area range, a crowd region in every tenth image, some images without objects) and detections
from it (each object found 1-3 times, shifted and rescaled, plus low-scoring false positives, to
``--dets-per-image`` per image; 100 is COCO's and ``evaluate.max_detections``' cap). Whole
commands, each a fresh process reading the JSON files: ``segpipe metrics coco`` against a short
pycocotools script doing the same evaluation (COCO, loadRes, COCOeval, as written in pycocotools'
demo; the command validates its input first and pauses Python's garbage collector while it
parses and scores), in alternating order, run by run; the ratio is the median of the per-run time ratios (pycocotools / segpipe), of wall-clock
time and of CPU time (user + system over all threads: on a shared host, less sensitive to the
load of other processes; segpipe's IoU threads count in full). The 12 stats and the per-class AP
of both must agree to 1e-6. Then each command's phases, in this process, and COCOeval alone:
faster-coco-eval's against pycocotools' on the same parsed input.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segpipe.metrics.boundary import BoundaryIoU
from segpipe.metrics.semantic import ConfusionMatrix


def host() -> str:
    """CPU model and core count, for the record."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def interleaved_times(step_a, step_b, n: int, repeats: int) -> tuple[float, float]:
    """Total seconds of ``step_a(i)`` and ``step_b(i)`` over images ``i < n``, alternating image by
    image so that load from other processes hits both sides alike; the best of ``repeats``."""
    best_a = best_b = float("inf")
    for _ in range(repeats):
        ta = tb = 0.0
        for i in range(n):
            t0 = time.perf_counter()
            step_a(i)
            t1 = time.perf_counter()
            step_b(i)
            t2 = time.perf_counter()
            ta += t1 - t0
            tb += t2 - t1
        best_a, best_b = min(best_a, ta), min(best_b, tb)
    return best_a, best_b


# --------------------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------------------


def bench_confusion(n: int, s: int, k: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    gt = rng.integers(0, k, (n, s, s), dtype=np.uint8)
    pred = np.where(rng.random((n, s, s)) < 0.7, gt, rng.integers(0, k, (n, s, s), dtype=np.uint8))
    gt[:, :: 16] = 255  # ~6% ignored pixels, in every image
    mpix = n * s * s / 1e6

    ratios = []
    for name, conv in (("uint8", lambda a: a), ("int64", lambda a: a.astype(np.int64))):
        # int64 copies of 200 x 512 x 512 would need 800 MB: convert a few images and cycle
        g = [conv(gt[i]) for i in range(n)] if name == "uint8" else [conv(gt[i]) for i in range(min(n, 16))]
        p = [conv(pred[i]) for i in range(n)] if name == "uint8" else [conv(pred[i]) for i in range(min(n, 16))]
        m = len(g)

        base = np.zeros(256 * k, np.int64)
        cm = ConfusionMatrix(k, 255)

        def baseline_step(i, g=g, p=p, m=m, name=name, base=base):
            a, b = g[i % m], p[i % m]
            a = a.astype(np.int64) if name == "uint8" else a
            base[:] += np.bincount((k * a + b).ravel(), minlength=256 * k)

        def ours_step(i, g=g, p=p, m=m, cm=cm):
            cm.update(g[i % m], p[i % m])

        tb, to = interleaved_times(baseline_step, ours_step, n, repeats)
        assert np.array_equal(cm.mat, base.reshape(256, k)[:k, :k]), "confusion matrix differs from the baseline"
        ratios.append(to / tb)
        print(f"{name}: bincount baseline {mpix / tb:8.1f} Mpix/s   ConfusionMatrix.update {mpix / to:8.1f} Mpix/s"
              f"   time ratio {to / tb:.3f}")
    print(f"worst time ratio ConfusionMatrix / bincount ({n} x {s}x{s}, K={k}): {max(ratios):.3f}")


# --------------------------------------------------------------------------------------
# Boundary IoU
# --------------------------------------------------------------------------------------


def bench_boundary(n: int, s: int, k: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    cell = max(8, s // 16)
    pairs = []
    for _ in range(min(n, 8)):
        blocks = rng.integers(0, k, (s // cell + 1, s // cell + 1), dtype=np.uint8)
        gt = np.kron(blocks, np.ones((cell, cell), np.uint8))[:s, :s]
        pred = np.roll(gt, (3, -2), axis=(0, 1))
        pred[rng.random((s, s)) < 0.02] = rng.integers(0, k)
        gt[:, ::64] = 255
        pairs.append((gt, pred))
    acc, cm = BoundaryIoU(k, 255), ConfusionMatrix(k, 255)
    tc, tb = interleaved_times(lambda i: cm.update(*pairs[i % len(pairs)]),
                               lambda i: acc.update(*pairs[i % len(pairs)]), n, repeats)
    print(f"BoundaryIoU.update {1e3 * tb / n:6.1f} ms/image, ConfusionMatrix.update {1e3 * tc / n:6.1f} ms/image "
          f"({s} x {s}, K={k}, ratio {acc.ratio}); boundary_iou {acc.compute()['boundary_iou']:.4f}")


# --------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------

PYCOCOTOOLS_SCRIPT = '''
import contextlib, io, json, sys
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
gt, dt, iou_type, out = sys.argv[1:5]
with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO(gt)
    ev = COCOeval(coco_gt, coco_gt.loadRes(dt), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
precision = ev.eval["precision"]
per_class = {}
for k, cat in enumerate(ev.params.catIds):
    p = precision[:, :, k, 0, -1]
    p = p[p > -1]
    per_class[coco_gt.cats[cat]["name"]] = float(p.mean()) if p.size else None
json.dump({"stats": [float(v) for v in ev.stats], "per_class": per_class}, open(out, "w"))
'''


def _ellipse(rng, h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """An ``h x w`` uint8 mask of an axis-aligned ellipse (drawn on its box only)."""
    m = np.zeros((h, w), np.uint8)
    y0, y1 = max(0, int(cy - ry)), min(h, int(cy + ry) + 1)
    x0, x1 = max(0, int(cx - rx)), min(w, int(cx + rx) + 1)
    if y0 < y1 and x0 < x1:
        yy, xx = np.ogrid[y0:y1, x0:x1]
        m[y0:y1, x0:x1] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return m


def coco_dataset(n_images: int, dets_per_image: int, seed: int = 0) -> tuple[dict, list]:
    """Ground truth and detections made from it (see the module docstring)."""
    from pycocotools import mask as mask_utils

    def rle(m: np.ndarray) -> dict:
        r = mask_utils.encode(np.asfortranarray(m))
        return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode()}

    def box(r: dict) -> list[float]:
        return [float(v) for v in mask_utils.toBbox(r)]

    rng = np.random.default_rng(seed)
    # the synthetic dataset's thing classes
    cats = [{"id": i, "name": name} for i, name in enumerate(
        ["solar_panel_row", "pipe_segment", "trench", "excavator", "truck", "worker", "material_stack"], start=5)]
    cat_ids = [c["id"] for c in cats]
    images, anns, dets = [], [], []
    for iid in range(1, n_images + 1):
        h, w = int(rng.integers(240, 481)), int(rng.integers(320, 641))
        images.append({"id": iid, "height": h, "width": w, "file_name": f"{iid:06d}.jpg"})
        found = []
        n_objects = 0 if iid % 25 == 0 else int(rng.integers(6, 11))
        for _ in range(n_objects):
            radius = float(np.exp(rng.uniform(np.log(3), np.log(min(h, w) / 3))))  # small to large
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = radius * rng.uniform(0.6, 1.4), radius * rng.uniform(0.6, 1.4)
            m = _ellipse(rng, h, w, cy, cx, ry, rx)
            if not m.any():
                continue
            cat, r = int(rng.choice(cat_ids)), rle(m)
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cat, "iscrowd": 0,
                         "area": float(m.sum()), "bbox": box(r), "segmentation": r})
            for _ in range(int(rng.integers(1, 4))):
                s = rng.uniform(0.8, 1.25)
                d = _ellipse(rng, h, w, cy + rng.normal(0, ry / 6), cx + rng.normal(0, rx / 6), ry * s, rx * s)
                if d.any():
                    found.append((cat if rng.random() < 0.9 else int(rng.choice(cat_ids)), d,
                                  round(float(rng.uniform(0.3, 1.0)), 3)))
        if iid % 10 == 0:  # a crowd region, as uncompressed RLE like COCO's
            m = _ellipse(rng, h, w, h / 2, w / 2, h / 4, w / 4)
            flat = m.ravel(order="F")
            edges = np.flatnonzero(np.diff(flat)) + 1
            runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cat_ids[-1], "iscrowd": 1,
                         "area": float(m.sum()), "bbox": box(rle(m)),
                         "segmentation": {"size": [h, w], "counts": [0, *runs] if flat[0] else runs}})
        while len(found) < dets_per_image:  # false positives, scoring low
            radius = float(np.exp(rng.uniform(np.log(3), np.log(min(h, w) / 4))))
            d = _ellipse(rng, h, w, rng.uniform(0, h), rng.uniform(0, w), radius, radius * rng.uniform(0.5, 2))
            if d.any():
                found.append((int(rng.choice(cat_ids)), d, round(float(rng.uniform(0.05, 0.5)), 3)))
        for cat, d, score in found[:dets_per_image]:
            r = rle(d)
            dets.append({"image_id": iid, "category_id": cat, "score": score, "bbox": box(r), "segmentation": r})
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall-clock and CPU (user + system, all threads) seconds of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _segpipe_command() -> list[str]:
    script = Path(sys.executable).with_name("segpipe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "segpipe.cli"]


def _agree(ours: dict, ref: dict, iou_type: str, tol: float = 1e-6) -> float:
    """The largest difference between our 12 stats + per-class AP and pycocotools'; raises when
    one is defined on one side only."""
    from segpipe.metrics.coco import STAT_NAMES

    pairs = [(ours[iou_type][name], None if v == -1 else v) for name, v in zip(STAT_NAMES, ref["stats"])]
    pairs += [(ours["per_class"][name], v) for name, v in ref["per_class"].items()]
    worst = 0.0
    for a, b in pairs:
        if (a is None) != (b is None):
            raise AssertionError(f"{iou_type}: defined on one side only: {a} vs {b}")
        if a is not None:
            worst = max(worst, abs(a - b))
    if worst > tol:
        raise AssertionError(f"{iou_type}: segpipe and pycocotools differ by {worst:.3g} > {tol}")
    return worst


def coco_phases(gt_path: Path, dt_path: Path, iou_type: str, repeats: int = 3) -> dict[str, float]:
    """Best-of-``repeats`` seconds of the command's phases, in this process: reading the JSON,
    validating, the engine (faster-coco-eval), and pycocotools' COCOeval on the same input."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from segpipe.commands.metrics import read_json
    from segpipe.metrics.coco import run_cocoeval, validate_detections, validate_ground_truth

    best: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
        return out

    for _ in range(repeats):
        gt, dets = timed("read JSON", lambda: (read_json(gt_path), read_json(dt_path)))
        timed("validate", lambda gt=gt, dets=dets: (validate_ground_truth(gt, iou_type),
                                                   validate_detections(dets, gt, iou_type)))
        timed("faster-coco-eval", lambda gt=gt, dets=dets: run_cocoeval(gt, dets, iou_type))

        def reference(gt=gt, dets=dets):
            with contextlib.redirect_stdout(io.StringIO()):
                coco_gt = COCO()
                coco_gt.dataset = gt
                coco_gt.createIndex()
                ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iou_type)
                ev.evaluate()
                ev.accumulate()
                ev.summarize()

        timed("pycocotools", reference)  # last: loadRes writes into the dicts
    return best


def bench_coco(n_images: int, dets_per_image: int, runs: int) -> None:
    t0 = time.perf_counter()
    gt, dets = coco_dataset(n_images, dets_per_image)
    print(f"COCO data: {n_images} images, {len(gt['annotations'])} ground-truth annotations, "
          f"{len(dets)} detections ({dets_per_image} per image), made in {time.perf_counter() - t0:.1f} s")
    # both sides import from cached bytecode, as an installed environment does
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        gt_path, dt_path, ref_script = tmp_path / "gt.json", tmp_path / "dt.json", tmp_path / "pycocotools_eval.py"
        gt_path.write_text(json.dumps(gt))
        dt_path.write_text(json.dumps(dets))
        ref_script.write_text(PYCOCOTOOLS_SCRIPT)
        for iou_type in ("segm", "bbox"):
            ours_out, ref_out = tmp_path / f"ours_{iou_type}.json", tmp_path / f"ref_{iou_type}.json"
            ours = [*_segpipe_command(), "metrics", "coco", "--gt", str(gt_path), "--dt", str(dt_path),
                    "--iou-type", iou_type, "--out", str(ours_out)]
            ref = [sys.executable, str(ref_script), str(gt_path), str(dt_path), iou_type, str(ref_out)]
            _timed(ours, env), _timed(ref, env)  # warm-up: bytecode, page cache
            t_ours, t_ref = [], []
            for r in range(runs):
                if r % 2:
                    t_ref.append(_timed(ref, env))
                    t_ours.append(_timed(ours, env))
                else:
                    t_ours.append(_timed(ours, env))
                    t_ref.append(_timed(ref, env))
            worst = _agree(json.loads(ours_out.read_text()), json.loads(ref_out.read_text()), iou_type)
            wall = statistics.median(b[0] / a[0] for a, b in zip(t_ours, t_ref))
            cpu = statistics.median(b[1] / a[1] for a, b in zip(t_ours, t_ref))
            print(f"{iou_type}: segpipe metrics coco {statistics.median(t[0] for t in t_ours):.2f} s, pycocotools "
                  f"{statistics.median(t[0] for t in t_ref):.2f} s (medians of {runs}); median ratio pycocotools / "
                  f"segpipe {wall:.2f}x wall-clock, {cpu:.2f}x CPU time (user + system, all threads); "
                  f"12 stats and {len(gt['categories'])} per-class AP agree (max diff {worst:.1e})")
            phases = coco_phases(gt_path, dt_path, iou_type)
            print("  in one process (best of 3): " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())
                  + f"; COCOeval alone {phases['pycocotools'] / phases['faster-coco-eval']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["confusion", "boundary", "coco"])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--boundary-images", type=int, default=20)
    ap.add_argument("--boundary-size", type=int, default=1024)
    ap.add_argument("--boundary-classes", type=int, default=12)
    ap.add_argument("--coco-images", type=int, default=500)
    ap.add_argument("--dets-per-image", type=int, default=100)
    ap.add_argument("--coco-runs", type=int, default=5)
    args = ap.parse_args()
    print(f"host: {host()}")
    if args.only in (None, "confusion"):
        bench_confusion(args.images, args.size, args.classes, args.repeats)
    if args.only in (None, "boundary"):
        bench_boundary(args.boundary_images, args.boundary_size, args.boundary_classes, args.repeats)
    if args.only in (None, "coco"):
        bench_coco(args.coco_images, args.dets_per_image, args.coco_runs)


if __name__ == "__main__":
    main()
