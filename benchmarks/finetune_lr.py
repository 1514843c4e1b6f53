"""The fine-tuning defaults (``train.finetune_lr_scale``, ``train.finetune_warmup``), measured.

1. UNet trains from scratch on the default synthetic data for ``--parent-budget`` seconds (the
   parent; nothing is promoted).
2. A second site is generated (``segpipe synth --site site2``: arid ground, haze, warmer light,
   denser scenes) and converted with the default collection into one shard set.
3. On those shards, runs of ``--budget`` seconds each: from scratch, and fine-tuned from the parent
   at every ``--scales`` x ``--warmups`` (peak LR = train.lr x scale). Each model is scored by the
   evaluate code (``segpipe.scoring``) on the val split: mIoU overall and per collection.

Everything goes through the real ``segpipe train`` code (one local Ray for all runs).

    python benchmarks/finetune_lr.py [--images 2000] [--site-images 500] [--parent-budget 75] [--budget 25]
                                  [--parent-epochs N --epochs M] [--scales 1.0 0.3 0.1] [--warmups 0.02]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

from segpipe.params import ConvertParams, EvaluateParams, SynthParams, TrainParams


def make_data(root: Path, images: int, site_images: int) -> tuple[Path, Path]:
    """(default shards, default + site2 shards)."""
    from segpipe.formats.coco import read_collections
    from segpipe.stages import convert, synth
    from segpipe.synth.sites import site_preset

    synth.run(SynthParams(images=images), root / "raw" / "synth")
    convert.run(ConvertParams(), read_collections(root / "raw"), root / "shards", progress=False)
    site = dataclasses.replace(SynthParams(images=site_images, seed=1), **site_preset("site2"))
    synth.run(site, root / "raw" / "site2")
    convert.run(ConvertParams(), read_collections(root / "raw"), root / "shards2", progress=False)
    return root / "shards", root / "shards2"


def score(checkpoint: Path, shards) -> dict[str, float]:
    from segpipe.scoring import score_checkpoint

    m = score_checkpoint(checkpoint, shards, EvaluateParams())
    return {"all": m["miou"], **{k: v["miou"] for k, v in m["per_collection"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--site-images", type=int, default=500)
    ap.add_argument("--parent-budget", type=float, default=75.0)
    ap.add_argument("--budget", type=float, default=25.0)
    ap.add_argument("--parent-epochs", type=int, default=0,
                    help="train the parent for this many epochs instead of a budget (a shared host's load then "
                         "changes the time, not the work)")
    ap.add_argument("--epochs", type=int, default=0, help="the same for the other runs")
    ap.add_argument("--work", type=Path, help="keep the data and the parent here and reuse them on the next run")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    ap.add_argument("--warmups", type=float, nargs="+", default=[0.02])
    args = ap.parse_args()

    from segpipe.cluster import connect
    from segpipe.shards import open_shards

    base = dataclasses.replace(TrainParams(), architectures=["unet"], overrides={}, val_every=0)
    with tempfile.TemporaryDirectory(prefix="segpipe-finetune-") as tmp:
        root = args.work or Path(tmp)
        if (root / "shards2" / "manifest.json").is_file():
            first, both = root / "shards", root / "shards2"
        else:
            first, both = make_data(root, args.images, args.site_images)  # before Ray: its workers are forked
        shards = open_shards(both)
        with connect():
            rows = runs(args, base, root, first, shards)
    print_table(rows, shards)


def runs(args: argparse.Namespace, base: TrainParams, root: Path, first: Path, shards) -> list[tuple]:
    """(name, budget, steps, scores) of the parent, the from-scratch run and every fine-tuned run."""
    from segpipe.stages.train import run

    def limit(budget: float, epochs: int) -> dict:
        return {"budget_s": 0.0, "epochs": epochs} if epochs else {"budget_s": budget}

    if (root / "parent" / "metrics.json").is_file():
        import json

        parent = json.loads((root / "parent" / "metrics.json").read_text())
    else:
        parent = run(dataclasses.replace(base, **limit(args.parent_budget, args.parent_epochs)), "unet", first,
                     root / "parent")
    rows = [("parent (default site only)", parent["train_s"], parent["steps"],
             score(root / "parent" / "checkpoint", shards))]
    short = limit(args.budget, args.epochs)
    scratch = run(dataclasses.replace(base, **short), "unet", shards, root / "scratch")
    rows.append(("from scratch", scratch["train_s"], scratch["steps"], score(root / "scratch" / "checkpoint", shards)))
    for warmup in args.warmups:
        for scale in args.scales:
            p = dataclasses.replace(base, **short, init_from=str(root / "parent" / "checkpoint"),
                                    finetune_lr_scale=scale, finetune_warmup=warmup)
            out = root / f"ft-{scale}-{warmup}"
            s = run(p, "unet", shards, out)
            rows.append((f"fine-tuned, lr x {scale:g}, warm-up {warmup:g}", s["train_s"], s["steps"],
                         score(out / "checkpoint", shards)))
    return rows


def print_table(rows: list[tuple], shards) -> None:
    collections = sorted({k for *_, m in rows for k in m if k != "all"})
    print(f"\nUNet val mIoU on default + site2 shards ({shards.rows('val')} val images); "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| run | train s | steps | val mIoU | " + " | ".join(collections) + " |")
    print("|---|---|---|---|" + "---|" * len(collections))
    for name, seconds, steps, m in rows:
        print(f"| {name} | {seconds:g} | {steps} | {m['all']:.3f} | "
              + " | ".join(f"{m.get(c, float('nan')):.3f}" for c in collections) + " |")


if __name__ == "__main__":
    main()
