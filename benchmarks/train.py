"""Training throughput per architecture, and the overhead of Ray Train + Ray Data.

1. Per architecture: training images/s at 256 x 256 on CPU (default backbones), a plain
   PyTorch step loop on prepared synthetic batches.
2. Overhead: the same model and shards trained for a few epochs by (a) a plain PyTorch loop that
   reads the shards in-process (decode + augment + train, serially) and (b) ``segpipe train``'s
   Ray Train + Ray Data path. Per-epoch train time after start-up is compared; Ray's start-up
   (cluster, workers, first batch) is reported apart. The last line is the ratio (Ray / plain).

    python benchmarks/train.py [--archs unet fcn8s ...] [--images 64] [--epochs 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from segpipe.data import AugmentConfig, prepare_rows
from segpipe.models import MODELS, build_model
from segpipe.params import SynthParams, TrainParams


def make_shards(root: Path, images: int, size: int) -> Path:
    from segpipe.formats.coco import read_collections
    from segpipe.params import ConvertParams
    from segpipe.stages import convert, synth

    raw, shards = root / "raw", root / "shards"
    synth.run(SynthParams(images=images, size=(size, size), seed=0), raw)
    convert.run(ConvertParams(val_fraction=0.0), read_collections(raw), shards, progress=False)
    return shards


def throughput(arch: str, num_classes: int, thing_ids: list[int], rows: list[dict], size: int, steps: int) -> float:
    """Images/s of plain training steps on prepared batches of ``size`` (first step excluded)."""
    from segpipe.data import collate_targets
    from segpipe.models import default_kwargs

    kw = {}
    if "thing_ids" in default_kwargs(arch):
        kw["thing_ids"] = thing_ids
    model = build_model(arch, num_classes, **kw).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = AugmentConfig(size=size)
    batch = prepare_rows(rows, cfg, True, np.random.default_rng(0))
    images, targets = collate_targets(batch)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return len(rows) * steps / sum(times[1:])


def plain_epochs(arch: str, shards: Path, p: TrainParams, meta: dict) -> list[float]:
    """Per-epoch seconds of a plain loop over the same shards (decode + augment in-process)."""
    import pyarrow.parquet as pq

    from segpipe.shards import shard_files
    from segpipe.stages.train import make_optimizer, train_one_epoch

    model = build_model(arch, meta["num_classes"], **meta["model_kwargs"])
    opt = make_optimizer(model, p)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cfg = AugmentConfig(size=p.image_size, scale_range=p.scale_range, hflip=p.hflip, photometric=p.photometric)
    rng = np.random.default_rng(0)

    def batches():
        for f in shard_files(shards, "train"):
            table = pq.read_table(f)
            rows = table.to_pylist()
            for i in range(0, len(rows), p.batch_size):
                yield prepare_rows(rows[i : i + p.batch_size], cfg, True, rng)

    out = []
    for _ in range(p.epochs):
        stats = train_one_epoch(model, batches(), opt, scaler, torch.device("cpu"), False)
        out.append(stats["seconds"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="*", default=list(MODELS))
    ap.add_argument("--overhead-arch", default="unet")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=128, help="training crop for the overhead run")
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)

    from segpipe.shards import iter_samples, read_manifest, shard_files
    from segpipe.stages import train as train_stage

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_shards(root, args.images, 256)
        manifest = read_manifest(shards)
        thing_ids = [c["id"] for c in manifest["classes"] if c["isthing"]]
        k = train_stage.num_classes_of(manifest)
        import pyarrow.parquet as pq

        rows = pq.read_table(shard_files(shards, "train")[0]).to_pylist()[:8]
        print(f"training throughput at 256x256, batch 8, {threads} threads, CPU")
        print(f"{'arch':<12} {'images/s':>9}")
        for arch in args.archs:
            ips = throughput(arch, k, thing_ids, rows, 256, args.steps)
            print(f"{arch:<12} {ips:>9.2f}", flush=True)

        p = dataclasses.replace(TrainParams(), epochs=args.epochs, image_size=args.size, batch_size=8, workers=1,
                                threads=threads, num_to_keep=1)
        meta = {"num_classes": k, "model_kwargs": train_stage.model_kwargs_for(p, args.overhead_arch, manifest)}
        plain = plain_epochs(args.overhead_arch, shards, p, meta)
        t0 = time.perf_counter()
        summary = train_stage.run(dataclasses.replace(p, architectures=[args.overhead_arch]), args.overhead_arch,
                                  shards, root / "out")
        wall = time.perf_counter() - t0
        hist = (root / "out" / "history.tsv").read_text().splitlines()[1:]
        ray_ips = [float(line.split("\t")[3]) for line in hist]
        n_train = sum(1 for _ in iter_samples(shards, verify=False, split="train"))
        ray_epochs = [n_train / v for v in ray_ips]
        plain_s = float(np.mean(plain[1:] if len(plain) > 1 else plain))
        ray_s = float(np.mean(ray_epochs[1:] if len(ray_epochs) > 1 else ray_epochs))
        startup = wall - sum(ray_epochs)
        print(f"\noverhead on {args.overhead_arch}, {n_train} train images at {args.size}x{args.size}, {args.epochs} epochs")
        print(f"plain PyTorch loop: {plain_s:.2f} s/epoch (epochs: {', '.join(f'{x:.2f}' for x in plain)})")
        print(f"Ray Train + Data  : {ray_s:.2f} s/epoch (epochs: {', '.join(f'{x:.2f}' for x in ray_epochs)})")
        print(f"Ray start-up and validation/checkpointing, apart: {startup:.1f} s of {wall:.1f} s wall ({summary['arch']})")
        print(f"ratio (Ray / plain, per epoch after start-up): {ray_s / plain_s:.2f}x")


if __name__ == "__main__":
    main()
