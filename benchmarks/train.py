"""Training throughput per architecture and precision setting, and the overhead of Ray Train + Ray Data.

1. Per architecture: training images/s of the stage's own training step
   (``segpipe.stages.train.train_step``) on one prepared batch of real shard rows, in fp32, bf16
   autocast and each with ``channels_last``, measured interleaved (one step of each setting in
   turn, ``--rounds`` rounds, the fastest step of each counts: ``time_settings``). ``auto`` is what
   ``train.precision: auto`` picks on this host: its short trial (``choose_setting``, a fresh cache)
   on a synthetic batch, and that setting's rate in the long measurement. Ratios are against fp32.
2. Overhead: the same model and shards trained for a few epochs by (a) a plain PyTorch loop that
   reads the shards in-process (decode + augment + train, serially) and (b) ``segpipe train``'s
   Ray Train + Ray Data path (the default local mode). Per-epoch train time is compared; the
   stage's own ``startup_s`` and ``train_s`` are reported apart. The last line is the ratio (Ray / plain).

    python benchmarks/train.py [--archs unet fcn8s ...] [--size 96] [--images 256] [--epochs 3] [--rounds 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from segpipe.data import AugmentConfig, collate_targets, prepare_rows
from segpipe.models import MODELS, build_model, default_kwargs
from segpipe.params import SynthParams, TrainParams
from segpipe.precision import Setting, candidates, cpu_supports_bf16


def make_shards(root: Path, images: int, size: int) -> Path:
    from segpipe.formats.coco import read_collections
    from segpipe.params import ConvertParams
    from segpipe.stages import convert, synth

    raw, shards = root / "raw", root / "shards"
    synth.run(SynthParams(images=images, size=(size, size), seed=0), raw)
    convert.run(ConvertParams(val_fraction=0.1), read_collections(raw), shards, progress=False)
    return shards


def rates(arch: str, num_classes: int, thing_ids: list[int], rows: list[dict], size: int, rounds: int,
          settings: list[Setting]) -> dict[Setting, float]:
    """Images/s of each setting on one prepared batch of ``rows`` at ``size`` (two untimed steps each)."""
    from segpipe.stages.train import time_settings

    kw = {"thing_ids": thing_ids} if "thing_ids" in default_kwargs(arch) else {}
    batch = collate_targets(prepare_rows(rows, AugmentConfig(size=size), True, np.random.default_rng(0)))
    torch.manual_seed(0)
    return time_settings(lambda: build_model(arch, num_classes, **kw), TrainParams(), batch, settings,
                         warmup=2, rounds=rounds, drop_slower=float("inf"))


def auto_choice(arch: str, shards, size: int, batch: int, cache: Path) -> tuple[Setting, float]:
    """What ``precision: auto`` picks on this host (a trial as a first run makes it), and its seconds."""
    from segpipe.stages.train import choose_setting, model_kwargs_for

    os.environ["XDG_CACHE_HOME"] = str(cache / arch)
    p = dataclasses.replace(TrainParams(), image_size=size, batch_size=batch, overrides={})
    meta = {"num_classes": shards.num_classes, "thing_ids": list(shards.thing_ids), "ignore_index": shards.ignore_index,
            "model_kwargs": model_kwargs_for(p, arch, shards)}
    setting, record = choose_setting(p, arch, meta, torch.device("cpu"))
    return setting, record["seconds"]


def plain_epochs(arch: str, shards, p: TrainParams, meta: dict, setting: Setting) -> list[float]:
    """Per-epoch seconds of a plain loop over the same shards (decode + augment in-process)."""
    from segpipe.shards import read_shard
    from segpipe.stages.train import Clock, Schedule, make_optimizer, steps_per_epoch, train_one_epoch

    model = build_model(arch, meta["num_classes"], **meta["model_kwargs"])
    if setting.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, p)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cfg = AugmentConfig(size=p.image_size, scale_range=p.scale_range, hflip=p.hflip, photometric=p.photometric,
                        instances=False)
    rng = np.random.default_rng(0)
    schedule = Schedule(0.0, p.epochs * steps_per_epoch(shards.rows("train"), p.batch_size, 1), p.warmup)
    clock = Clock()

    def batches():
        for f in shards.files_of("train"):
            rows = read_shard(shards, f).to_pylist()
            for i in range(0, len(rows), p.batch_size):
                yield prepare_rows(rows[i : i + p.batch_size], cfg, True, rng)

    out = []
    for _ in range(p.epochs):
        stats = train_one_epoch(model, batches(), opt, scaler, torch.device("cpu"), setting.precision, schedule, clock,
                                p.lr, setting.channels_last)
        out.append(stats["seconds"])
    return out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="*", default=list(MODELS))
    ap.add_argument("--overhead-arch", default="unet")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds per setting")
    ap.add_argument("--size", type=int, default=96, help="training crop")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    settings = candidates("auto", "auto", "cpu", cpu_supports_bf16(), False, False)

    from segpipe.shards import open_shards, read_shard
    from segpipe.stages import train as train_stage

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = open_shards(make_shards(root, args.images, 256))
        rows = read_shard(shards, shards.files_of("train")[0]).to_pylist()[: args.batch]
        print(f"training throughput (images/s) at {args.size}x{args.size}, batch {args.batch}, {threads} threads, "
              f"{cpu_model()}; {args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f}")
        names = [s.name.replace("+channels_last", "+CL") for s in settings]
        print(f"{'arch':<11} " + " ".join(f"{n:>8}" for n in names) + "  auto (trial s)       auto/fp32  best/fp32")
        for arch in args.archs:
            chosen, trial_s = auto_choice(arch, shards, args.size, args.batch, root / "cache")
            r = rates(arch, shards.num_classes, list(shards.thing_ids), rows, args.size, args.rounds, settings)
            fp32, best = r[settings[0]], max(r, key=r.get)
            print(f"{arch:<11} " + " ".join(f"{r[s]:>8.1f}" for s in settings)
                  + f"  {chosen.name.replace('+channels_last', '+CL'):<8} ({trial_s:>4.1f} s)"
                  f"  {r[chosen] / fp32:>8.2f}x  {r[best] / fp32:>8.2f}x ({best.name})", flush=True)
        os.environ.pop("XDG_CACHE_HOME", None)

        p = dataclasses.replace(TrainParams(), epochs=args.epochs, budget_s=0.0, image_size=args.size,
                                batch_size=args.batch, threads=threads, num_to_keep=1, overrides={})
        summary = train_stage.run(dataclasses.replace(p, architectures=[args.overhead_arch]), args.overhead_arch,
                                  shards, root / "out")
        setting = Setting(summary["precision"], bool(summary["channels_last"]))
        meta = {"num_classes": shards.num_classes,
                "model_kwargs": train_stage.model_kwargs_for(p, args.overhead_arch, shards)}
        plain = plain_epochs(args.overhead_arch, shards, p, meta, setting)
        hist = (root / "out" / "history.tsv").read_text().splitlines()[1:]
        ray_ips = [float(line.split("\t")[5]) for line in hist]
        n_train = shards.rows("train")
        ray_epochs = [n_train / v for v in ray_ips]
        plain_s = float(np.mean(plain[1:] if len(plain) > 1 else plain))
        ray_s = float(np.mean(ray_epochs[1:] if len(ray_epochs) > 1 else ray_epochs))
        print(f"\noverhead on {args.overhead_arch}, {n_train} train images at {args.size}x{args.size}, "
              f"{args.epochs} epochs, {setting.name}")
        print(f"plain PyTorch loop: {plain_s:.2f} s/epoch (epochs: {', '.join(f'{x:.2f}' for x in plain)})")
        print(f"Ray Train + Data  : {ray_s:.2f} s/epoch (epochs: {', '.join(f'{x:.2f}' for x in ray_epochs)})")
        print(f"segpipe train: startup_s {summary['startup_s']} s, train_s {summary['train_s']} s "
              f"(its own local Ray; benchmarks/startup.py measures start-up)")
        print(f"ratio (Ray / plain, per epoch after the first): {ray_s / plain_s:.2f}x")


if __name__ == "__main__":
    main()
