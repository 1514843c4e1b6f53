"""Fine-tuning the champion on a new drop against training from scratch, through the real train stage.

A site team adds a drop of a new site to the data it has. Either it fine-tunes the model it already
trusts (``train.init_from``) for a quarter of the budget, or it trains from scratch for the whole
budget. Both runs see the same shards (the default site + the new one) and are evaluated on the same
validation split: overall, and on the new collection alone (``per_collection``).

    python benchmarks/finetune.py [--arch unet] [--budget 140] [--images 2000] [--drop 300] [--json FILE]

1. the champion: ``--arch`` trained on ``--images`` default scenes for ``--budget`` seconds;
2. a drop of ``--drop`` scenes of a visibly different site (``segpipe synth --site site2``);
3. the shards: both collections (``data/raw/synth`` and ``data/raw/site2``), converted together;
4. fine-tuned: from the champion for ``--budget / 4`` seconds; from scratch: ``--budget`` seconds;
5. both evaluated on the validation split, and the champion too (what it scores before the drop).

Prints one table and the ratios fine-tuned / from scratch. Takes about 2.5 x budget plus
conversion and three evaluations (about 8 minutes at the defaults on 2 cores). Not part of `make test`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from segpipe.params import BUDGETS, MODEL_KWARGS, ConvertParams, EvaluateParams, SynthParams, TrainParams


def train(arch: str, shards: Path, out: Path, budget: float, init_from: str = "") -> dict:
    from segpipe.stages import train as train_stage

    over = {**BUDGETS[arch], "budget_s": budget, **({"init_from": init_from} if init_from else {})}
    p = dataclasses.replace(TrainParams(), architectures=[arch], overrides={arch: over},
                            model={arch: dict(MODEL_KWARGS[arch])})
    return train_stage.run(p, arch, shards, out)


def evaluate(checkpoint: Path, shards: Path, out: Path) -> dict:
    from segpipe.stages import evaluate as evaluate_stage

    return evaluate_stage.run(EvaluateParams(num_overlays=0), checkpoint, shards, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="unet")
    ap.add_argument("--budget", type=float, default=None, help="seconds (default: the arch's default budget)")
    ap.add_argument("--images", type=int, default=SynthParams().images)
    ap.add_argument("--drop", type=int, default=300)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="keep the data and models here (default: a temp dir)")
    args = ap.parse_args()
    budget = args.budget or float(BUDGETS[args.arch]["budget_s"])

    from segpipe.cluster import connect
    from segpipe.formats.coco import read_collections
    from segpipe.stages import convert, synth
    from segpipe.synth.sites import site_preset

    with tempfile.TemporaryDirectory() as tmp, connect():
        root = args.work or Path(tmp)
        raw = root / "raw"
        t0 = time.time()
        synth.run(SynthParams(images=args.images), raw / "synth")
        convert.run(ConvertParams(), read_collections(raw), root / "before", progress=False)
        champion = train(args.arch, root / "before", root / "champion", budget)
        print(f"champion: {champion['steps']} steps in {champion['train_s']} s", flush=True)
        synth.run(SynthParams(images=args.drop, seed=7, **site_preset("site2")), raw / "site2")
        convert.run(ConvertParams(), read_collections(raw), root / "after", progress=False)
        train(args.arch, root / "after", root / "finetuned", budget / 4,
              init_from=str(root / "champion" / "checkpoint"))
        train(args.arch, root / "after", root / "scratch", budget)
        rows = {}
        for name, run in (("champion (before the drop)", root / "champion"), ("fine-tuned, budget / 4", root / "finetuned"),
                          ("from scratch, budget", root / "scratch")):
            m = evaluate(run / "checkpoint", root / "after", root / "eval" / run.name)
            rows[name] = {"miou": m["miou"], "site2": m["per_collection"]["site2"]["miou"],
                          "synth": m["per_collection"]["synth"]["miou"],
                          "train_s": json.loads((run / "metrics.json").read_text())["train_s"]}
        wall = time.time() - t0

    print(f"\n{args.arch}: {args.images} default scenes + a drop of {args.drop} site2 scenes; budget {budget:g} s\n")
    print("| model | train s | val mIoU | site2 mIoU | synth mIoU |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['train_s']:.0f} | {r['miou']:.3f} | {r['site2']:.3f} | {r['synth']:.3f} |")
    t, s = rows["fine-tuned, budget / 4"], rows["from scratch, budget"]
    ratios = {k: t[k] / s[k] if s[k] else None for k in ("miou", "site2", "synth")}
    print(f"\nfine-tuned / from scratch: val mIoU {ratios['miou']:.2f}x, site2 {ratios['site2']:.2f}x, "
          f"synth {ratios['synth']:.2f}x, at {t['train_s'] / s['train_s']:.2f}x the training time ({wall:.0f} s in all)")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "budget_s": budget, "rows": rows, "ratios": ratios},
                                        indent=2))


if __name__ == "__main__":
    main()
