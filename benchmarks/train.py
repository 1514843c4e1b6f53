"""Training throughput per architecture and precision, and the overhead of Ray Train + Ray Data.

1. Per architecture: training images/s of plain PyTorch steps on prepared batches, in fp32
   against ``precision: auto`` (bf16 autocast on a CPU with native bf16, fp16 on CUDA), and
   ``auto`` with ``channels_last``; the ratios are auto / fp32. ``ModelSpec.channels_last``
   records where the last column wins.
2. Overhead: the same model and shards trained for a few epochs by (a) a plain PyTorch loop that
   reads the shards in-process (decode + augment + train, serially) and (b) ``segpipe train``'s
   Ray Train + Ray Data path. Per-epoch train time is compared; the stage's own ``startup_s``
   and ``train_s`` are reported apart. The last line is the ratio (Ray / plain).

    python benchmarks/train.py [--archs unet fcn8s ...] [--size 96] [--images 128] [--epochs 3]
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

from segpipe.data import AugmentConfig, collate_targets, prepare_rows
from segpipe.models import MODELS, build_model, default_kwargs
from segpipe.params import SynthParams, TrainParams
from segpipe.stages.train import autocast, cpu_supports_bf16, resolve_precision


def make_shards(root: Path, images: int, size: int) -> Path:
    from segpipe.formats.coco import read_collections
    from segpipe.params import ConvertParams
    from segpipe.stages import convert, synth

    raw, shards = root / "raw", root / "shards"
    synth.run(SynthParams(images=images, size=(size, size), seed=0), raw)
    convert.run(ConvertParams(val_fraction=0.1), read_collections(raw), shards, progress=False)
    return shards


def throughput(arch: str, num_classes: int, thing_ids: list[int], rows: list[dict], size: int, seconds: float,
               precision: str, channels_last: bool) -> float:
    """Images/s of plain training steps on one prepared batch of ``size`` crops (two warm-up steps excluded)."""
    kw = {"thing_ids": thing_ids} if "thing_ids" in default_kwargs(arch) else {}
    torch.manual_seed(0)
    model = build_model(arch, num_classes, **kw).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, targets = collate_targets(prepare_rows(rows, AugmentConfig(size=size), True, np.random.default_rng(0)))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with autocast(precision, "cpu"):
            loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return len(rows) * n / (time.perf_counter() - t0)


def plain_epochs(arch: str, shards, p: TrainParams, meta: dict) -> list[float]:
    """Per-epoch seconds of a plain loop over the same shards (decode + augment in-process)."""
    from segpipe.shards import read_shard
    from segpipe.stages.train import Clock, Schedule, make_optimizer, steps_per_epoch, train_one_epoch

    model = build_model(arch, meta["num_classes"], **meta["model_kwargs"])
    opt = make_optimizer(model, p)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cfg = AugmentConfig(size=p.image_size, scale_range=p.scale_range, hflip=p.hflip, photometric=p.photometric,
                        instances=False)
    rng = np.random.default_rng(0)
    precision = resolve_precision(p.precision, "cpu", cpu_supports_bf16())
    schedule = Schedule(0.0, p.epochs * steps_per_epoch(shards.rows("train"), p.batch_size, 1), p.warmup)
    clock = Clock()

    def batches():
        for f in shards.files_of("train"):
            rows = read_shard(shards, f).to_pylist()
            for i in range(0, len(rows), p.batch_size):
                yield prepare_rows(rows[i : i + p.batch_size], cfg, True, rng)

    out = []
    for _ in range(p.epochs):
        stats = train_one_epoch(model, batches(), opt, scaler, torch.device("cpu"), precision, schedule, clock, p.lr)
        out.append(stats["seconds"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="*", default=list(MODELS))
    ap.add_argument("--overhead-arch", default="unet")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per throughput figure")
    ap.add_argument("--size", type=int, default=96, help="training crop")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    auto = resolve_precision("auto", "cpu", cpu_supports_bf16())

    from segpipe.shards import open_shards, read_shard
    from segpipe.stages import train as train_stage

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = open_shards(make_shards(root, args.images, 256))
        rows = read_shard(shards, shards.files_of("train")[0]).to_pylist()[: args.batch]
        print(f"training throughput (images/s) at {args.size}x{args.size}, batch {args.batch}, {threads} threads, "
              f"CPU; auto = {auto}")
        print(f"{'arch':<12} {'fp32':>7} {'auto':>7} {'auto+CL':>8} {'auto/fp32':>10} {'CL/auto':>8}  spec CL")
        for arch in args.archs:
            f32 = throughput(arch, shards.num_classes, shards.thing_ids, rows, args.size, args.seconds, "fp32", False)
            amp = throughput(arch, shards.num_classes, shards.thing_ids, rows, args.size, args.seconds, auto, False)
            cl = throughput(arch, shards.num_classes, shards.thing_ids, rows, args.size, args.seconds, auto, True)
            print(f"{arch:<12} {f32:>7.1f} {amp:>7.1f} {cl:>8.1f} {amp / f32:>9.2f}x {cl / amp:>7.2f}x  "
                  f"{MODELS[arch].channels_last}", flush=True)

        p = dataclasses.replace(TrainParams(), epochs=args.epochs, budget_s=0.0, image_size=args.size,
                                batch_size=args.batch, workers=1, threads=threads, num_to_keep=1, overrides={})
        meta = {"num_classes": shards.num_classes,
                "model_kwargs": train_stage.model_kwargs_for(p, args.overhead_arch, shards)}
        plain = plain_epochs(args.overhead_arch, shards, p, meta)
        summary = train_stage.run(dataclasses.replace(p, architectures=[args.overhead_arch]), args.overhead_arch,
                                  shards, root / "out")
        hist = (root / "out" / "history.tsv").read_text().splitlines()[1:]
        ray_ips = [float(line.split("\t")[5]) for line in hist]
        n_train = shards.rows("train")
        ray_epochs = [n_train / v for v in ray_ips]
        plain_s = float(np.mean(plain[1:] if len(plain) > 1 else plain))
        ray_s = float(np.mean(ray_epochs[1:] if len(ray_epochs) > 1 else ray_epochs))
        print(f"\noverhead on {args.overhead_arch}, {n_train} train images at {args.size}x{args.size}, "
              f"{args.epochs} epochs, {auto}")
        print(f"plain PyTorch loop: {plain_s:.2f} s/epoch (epochs: {', '.join(f'{x:.2f}' for x in plain)})")
        print(f"Ray Train + Data  : {ray_s:.2f} s/epoch (epochs: {', '.join(f'{x:.2f}' for x in ray_epochs)})")
        print(f"segpipe train: startup_s {summary['startup_s']} s, train_s {summary['train_s']} s "
              f"(its own local Ray; with `segpipe with-ray` the start-up is shorter, see docs/benchmarks.md)")
        print(f"ratio (Ray / plain, per epoch after the first): {ray_s / plain_s:.2f}x")


if __name__ == "__main__":
    main()
