"""The data-quality commands on generated data, with a properly trained U-Net: the numbers and pictures
of docs/data-quality.md.

    .venv/bin/python benchmarks/data_quality.py [--out bench-quality] [--train-images 300] [--budget 150]
                                                [--width 16] [--depth 4] [--crop 96] [--threads 1]

1. Generates ``--train-images`` 128 px scenes (seed 0), converts them, and trains a U-Net (the
   project's model, loss and class weighting, ``train.model.unet``'s Dice term) with plain PyTorch
   for ``--budget`` seconds on random crops. The checkpoint is ``OUT/unet`` (reused by a rerun).
2. audit: 120 new scenes (seed 100), twice corrupted. *Tuning*: 5 % of the annotations get a
   random other thing class. *Held out*: 5 % get the thing class the model confuses them with most
   (from its confusion matrix on the validation split): the look-alike a tired labeller picks.
   Each time the label maps are repainted to match. Reports precision at K (K = the number
   changed) of both audit methods; the default was chosen on the tuning corruption only.
3. select: a pool of 180 ordinary scenes (seed 200) and 20 out-of-distribution ones (10 re-lit to
   0.6, 10 of the arid palette with warm light, seed 201); the share of the 20 in the top 20 of each
   strategy; and a pool of 30 frames each copied three times (how often a frame is picked twice).
4. drift: 100 re-lit scenes (lighting 0.6, seed 300) and 100 of the same generator (seed 301)
   against the training shards, with the model's confidence.

Writes ``OUT/results.json``, the audit and select outputs (``OUT/audit-heldout``, ``OUT/select``) and
the drift reports; prints every table. Single process; the host is named in the results.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.params import AuditParams, ConvertParams, DriftParams, SelectParams, SynthParams

SIZE = 128


def synth_collection(out: Path, images: int, seed: int, **site: Any) -> Path:
    from segpipe.stages import synth

    if not (out / "annotations" / "instances.json").is_file():
        synth.run(SynthParams(images=images, size=(SIZE, SIZE), seed=seed, workers=1, **site), out)
    return out


def convert_collection(raw: Path, out: Path, val_fraction: float = 0.0) -> Path:
    from segpipe.formats.coco import read_collection
    from segpipe.stages import convert

    if not (out / "manifest.json").is_file():
        convert.run(ConvertParams(workers=1, val_fraction=val_fraction), read_collection(raw), out, progress=False)
    return out


# --------------------------------------------------------------------------------------
# 1. A trained U-Net
# --------------------------------------------------------------------------------------


def train_unet(shards: Path, out: Path, budget_s: float, threads: int, width: int, depth: int, crop: int,
               seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """A U-Net (``width`` base channels, ``depth`` poolings) trained for ``budget_s`` seconds on the
    train split: random ``crop`` px crops, flips, batches of 16."""
    import torch

    from segpipe.checkpoint import CheckpointMeta, save_checkpoint
    from segpipe.models import build_model, default_kwargs, normalize
    from segpipe.params import MODEL_KWARGS
    from segpipe.shards import iter_samples, open_shards
    from segpipe.stages.train import class_weights

    if (out / "meta.json").is_file():
        return out, json.loads((out / "meta.json").read_text())["run"]
    torch.set_num_threads(threads)
    s = open_shards(shards)
    samples = list(iter_samples(s, split="train"))
    images = torch.from_numpy(np.stack([x["image"] for x in samples]))
    labels = torch.from_numpy(np.stack([x["semantic"] for x in samples]).astype(np.int64))
    kwargs = {**MODEL_KWARGS["unet"], "class_weights": class_weights(s.class_pixels["train"][:s.num_classes]),
              "ignore_index": s.ignore_index, "base_channels": width, "depth": depth}
    torch.manual_seed(seed)
    model = build_model("unet", s.num_classes, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    batch, steps, start = 16, 0, time.perf_counter()
    model.train()
    while time.perf_counter() - start < budget_s:
        idx = rng.integers(0, len(samples), batch)
        y0, x0 = (int(v) for v in rng.integers(0, SIZE - crop + 1, 2))
        x = images[idx, y0:y0 + crop, x0:x0 + crop]
        y = labels[idx, y0:y0 + crop, x0:x0 + crop]
        if rng.random() < 0.5:
            x, y = x.flip(2), y.flip(2)
        loss = sum(model(normalize(x), [{"semantic": t} for t in y]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    run = {"steps": steps, "seconds": round(time.perf_counter() - start, 1), "train_images": len(samples),
           "threads": threads, "base_channels": width, "depth": depth, "crop": crop}
    meta = CheckpointMeta(arch="unet", num_classes=s.num_classes, classes=tuple(s.classes),
                          model_kwargs={**default_kwargs("unet"), **kwargs}, ignore_index=s.ignore_index,
                          image_size=crop, epoch=1, shards_manifest_sha256=s.manifest_sha256, run=run)
    save_checkpoint(out, model.eval(), meta)
    return out, run


def confusion(checkpoint: Path, shards: Path, split: str) -> np.ndarray:
    """Pixel confusion matrix (rows: label, columns: prediction) of the model on a split."""
    from segpipe.inference import Predictor
    from segpipe.shards import iter_samples, open_shards

    s = open_shards(shards)
    p = Predictor.load(checkpoint)
    k = s.num_classes
    out = np.zeros((k, k), np.int64)
    for sample in iter_samples(s, split=split):
        pred = p.images([sample["image"]])[0].labels.astype(np.int64)
        sem = sample["semantic"].astype(np.int64)
        keep = sem < k
        out += np.bincount(sem[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
    return out


# --------------------------------------------------------------------------------------
# 2. audit on corrupted labels
# --------------------------------------------------------------------------------------


def corrupt(clean: Path, out: Path, swap: dict[int, int]) -> Path:
    """A copy of a synth collection whose annotations ``swap`` (id -> new class) have another
    class, in instances.json and in the label maps (the instance's visible pixels)."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(clean, out)
    coco = json.loads((clean / "annotations" / "instances.json").read_text())
    images = {i["id"]: i for i in coco["images"]}
    for ann in coco["annotations"]:
        if ann["id"] not in swap:
            continue
        img = images[ann["image_id"]]
        h, w = img["height"], img["width"]
        seg = ann["segmentation"]
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        mask = mask_utils.decode(rle).astype(bool)
        path = out / "masks" / (Path(img["file_name"]).stem + ".png")
        label = np.array(Image.open(path))
        label[mask & (label == ann["category_id"])] = swap[ann["id"]]
        Image.fromarray(label).save(path)
        ann["category_id"] = swap[ann["id"]]
    (out / "annotations" / "instances.json").write_text(json.dumps(coco))
    return out


def audit_precision(checkpoint: Path, raw: Path, shards: Path, out: Path, swap: dict[int, int],
                    method: str, top: int = 0) -> dict[str, Any]:
    from segpipe.commands import audit
    from segpipe.quality import precision_at_k

    t0 = time.perf_counter()
    audit.run(AuditParams(method=method, top=top), checkpoint, shards, out, progress=False)
    with open(out / "suspects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ranked = [int(r["annotation_id"]) if r["annotation_id"] else None for r in rows]
    annotations = [r for r in rows if r["annotation_id"]]
    ann_ranked = [int(r["annotation_id"]) for r in annotations]
    return {"method": method, "changed": len(swap), "regions": len(rows), "annotations": len(annotations),
            "precision_at_k": round(precision_at_k(ranked, swap), 3),
            "precision_at_k_annotations_only": round(precision_at_k(ann_ranked, swap), 3),
            "seconds": round(time.perf_counter() - t0, 1)}


def audit_bench(checkpoint: Path, train_shards: Path, root: Path) -> dict[str, Any]:
    from segpipe.synth.classes import CLASSES

    clean = synth_collection(root / "audit-clean", 120, 100)
    coco = json.loads((clean / "annotations" / "instances.json").read_text())
    anns = [a for a in coco["annotations"] if not a["iscrowd"]]
    things = [c.id for c in CLASSES if c.isthing]
    rng = np.random.default_rng(0)
    n = max(1, round(0.05 * len(anns)))
    results: dict[str, Any] = {"annotations": len(anns)}

    chosen = rng.choice(len(anns), n, replace=False)
    random_swap = {anns[i]["id"]: int(rng.choice([c for c in things if c != anns[i]["category_id"]])) for i in chosen}
    conf = confusion(checkpoint, train_shards, "val").astype(np.float64)
    np.fill_diagonal(conf, -1)
    lookalike = {c: int(max((t for t in things if t != c), key=lambda t: conf[c, t])) for c in things}
    chosen = rng.choice(len(anns), n, replace=False)
    lookalike_swap = {anns[i]["id"]: lookalike[anns[i]["category_id"]] for i in chosen}
    results["lookalike"] = {next(c.name for c in CLASSES if c.id == a): next(c.name for c in CLASSES if c.id == b)
                            for a, b in lookalike.items()}
    for name, swap in (("tuning", random_swap), ("heldout", lookalike_swap)):
        raw = corrupt(clean, root / f"audit-{name}-raw", swap)
        shards = root / f"audit-{name}-shards"
        shutil.rmtree(shards, ignore_errors=True)
        convert_collection(raw, shards)
        results[name] = [audit_precision(checkpoint, raw, shards, root / f"audit-{name}-{m}", swap, m,
                                         top=8 if (name == "heldout" and m == AuditParams().method) else 0)
                         for m in ("confident_learning", "self_confidence")]
    return results


# --------------------------------------------------------------------------------------
# 3. select
# --------------------------------------------------------------------------------------


def select_bench(checkpoint: Path, root: Path) -> dict[str, Any]:
    from segpipe.commands import select

    ordinary = synth_collection(root / "pool-ordinary", 180, 200)
    relit = synth_collection(root / "pool-relit", 10, 201, lighting=0.6)
    arid = synth_collection(root / "pool-arid", 10, 202, palette="arid", warmth=0.3)
    pool = root / "pool"
    if not pool.exists():
        pool.mkdir()
        for prefix, src in (("ordinary", ordinary), ("relit", relit), ("arid", arid)):
            for p in sorted((src / "images").iterdir()):
                shutil.copy(p, pool / f"{prefix}_{p.name}")
    k, results = 20, {"pool": 200, "out_of_distribution": 20, "k": 20}
    for strategy in ("diverse", "entropy", "margin"):
        t0 = time.perf_counter()
        out = root / ("select" if strategy == "diverse" else f"select-{strategy}")
        select.run(SelectParams(), checkpoint, pool, k, out, strategy=strategy, progress=False)
        with open(out / "selected.csv", newline="") as f:
            names = [Path(r["file"]).name for r in csv.DictReader(f)]
        results[strategy] = {"ood_share": sum(not n.startswith("ordinary_") for n in names) / k,
                             "relit": sum(n.startswith("relit_") for n in names),
                             "arid": sum(n.startswith("arid_") for n in names),
                             "seconds": round(time.perf_counter() - t0, 1)}
    dups = root / "pool-dups"
    if not dups.exists():
        dups.mkdir()
        for p in sorted((ordinary / "images").iterdir())[:30]:
            for c in range(3):
                shutil.copy(p, dups / f"{c}_{p.name}")
    for strategy in ("diverse", "entropy"):
        out = root / f"select-dups-{strategy}"
        select.run(SelectParams(), checkpoint, dups, 30, out, strategy=strategy, progress=False)
        with open(out / "selected.csv", newline="") as f:
            names = [Path(r["file"]).name.split("_", 1)[1] for r in csv.DictReader(f)]
        results[f"duplicates_{strategy}"] = {"picked": len(names), "distinct": len(set(names))}
    return results


# --------------------------------------------------------------------------------------
# 4. drift
# --------------------------------------------------------------------------------------


def drift_bench(checkpoint: Path, shards: Path, root: Path) -> dict[str, Any]:
    from segpipe.commands import drift
    from segpipe.files import atomic_write_json
    from segpipe.quality import format_drift_table

    drops = {"relit": synth_collection(root / "drop-relit", 100, 300, lighting=0.6),
             "same": synth_collection(root / "drop-same", 100, 301)}
    results = {}
    for name, drop in drops.items():
        report = drift.run(DriftParams(), shards, drop, model_ref=checkpoint)
        atomic_write_json(root / f"drift-{name}.json", report)
        results[name] = {"drifted": report["drifted_features"],
                         "table": format_drift_table(report["features"], report["skipped"])}
    return results


def host() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f} at start"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-quality"))
    ap.add_argument("--train-images", type=int, default=300)
    ap.add_argument("--budget", type=float, default=150.0, help="training seconds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a loaded 2-core host: 1)")
    ap.add_argument("--width", type=int, default=16, help="U-Net base channels (train's default: 16)")
    ap.add_argument("--depth", type=int, default=4, help="U-Net poolings (train's default: 4)")
    ap.add_argument("--crop", type=int, default=96, help="training crop, pixels (train's default: 96)")
    args = ap.parse_args()
    root = args.out
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"host": host()}

    raw = synth_collection(root / "train-raw", args.train_images, 0)
    shards = convert_collection(raw, root / "train-shards", val_fraction=0.1)
    checkpoint, run = train_unet(shards, root / "unet", args.budget, args.threads, args.width, args.depth, args.crop)
    conf = confusion(checkpoint, shards, "val")
    iou = np.diag(conf) / np.maximum(conf.sum(0) + conf.sum(1) - np.diag(conf), 1)
    results["model"] = {**run, "val_miou": round(float(iou[conf.sum(1) > 0].mean()), 3)}
    print(f"U-Net: {run}, val mIoU {results['model']['val_miou']}")

    for name, bench in (("audit", lambda: audit_bench(checkpoint, shards, root)),
                        ("select", lambda: select_bench(checkpoint, root)),
                        ("drift", lambda: drift_bench(checkpoint, shards, root))):
        t0 = time.perf_counter()
        results[name] = bench()
        print(f"\n== {name} ({time.perf_counter() - t0:.0f} s)")
        if name == "drift":
            for drop, r in results[name].items():
                print(f"-- {drop} drop: drifted {r['drifted'] or 'nothing'}\n{r['table']}")
        else:
            print(json.dumps(results[name], indent=1))
    (root / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
