"""Does a trained model generalise to scenes of a generator seed it never saw?

Generates ``--images`` scenes with ``--seed`` (the default run trains on seed 0), converts them,
and evaluates the checkpoint on all of them; prints its mIoU there against the mIoU it reached on
the default run's validation split (``--reference``, an evaluate metrics.json), as a ratio.

    python benchmarks/unseen_seed.py --model models/train/unet/checkpoint \\
        --reference models/eval/unet/metrics.json [--seed 1] [--images 300]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from segpipe.params import ConvertParams, EvaluateParams, SynthParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    ap.add_argument("--reference", type=Path, required=True, help="its evaluate metrics.json on the default val split")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--images", type=int, default=300)
    args = ap.parse_args()

    from segpipe.formats.coco import read_collections
    from segpipe.stages import convert, evaluate, synth

    reference = json.loads(args.reference.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        raw, shards = Path(tmp) / "raw", Path(tmp) / "shards"
        synth.run(SynthParams(images=args.images, seed=args.seed), raw)
        # every image in one split: the model has seen none of them
        convert.run(ConvertParams(val_fraction=0.0), read_collections(raw), shards, progress=False)
        m = evaluate.run(EvaluateParams(split="train", num_overlays=0), args.model, shards, Path(tmp) / "eval")
    for key in ("miou", "miou_things", "pixel_acc"):
        if m.get(key) is not None and reference.get(key):
            print(f"{key}: {m[key]:.4f} on {m['images']} scenes of seed {args.seed} vs {reference[key]:.4f} "
                  f"on the val split: ratio {m[key] / reference[key]:.2f}")


if __name__ == "__main__":
    main()
