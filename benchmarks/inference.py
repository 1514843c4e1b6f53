"""``segpipe evaluate``'s two engines on one split: the same numbers, and images/s of each.

    .venv/bin/python benchmarks/inference.py [--images 200] [--size 256] [--archs unet mask_rcnn]

Synthesises N scenes into one split, and for each architecture (randomly initialised, the
default build kwargs, so each runs at its pipeline size) and each torch thread count in
``--threads`` evaluates it twice with ``segpipe.stages.evaluate.run``: ``evaluate.engine: local``
(this process) and ``ray`` (a Ray Data actor pool on a local Ray with this machine's CPUs, one
actor per that many CPUs: models run with the same thread count in both engines). The Ray
figure is given twice: with the Ray start-up counted (what a DVC stage pays) and without (a Ray
already running, as under ``segpipe with-ray``); actor start and model loading are always
counted. Each line says whether metrics.json and detections.json are equal between the engines.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--archs", nargs="+", default=["unet", "mask_rcnn"])
    ap.add_argument("--threads", nargs="+", type=int, default=[2, 1], help="torch threads per model")
    args = ap.parse_args()

    import ray
    import torch

    from segpipe.checkpoint import CheckpointMeta, save_checkpoint
    from segpipe.formats import coco
    from segpipe.models import build_model, default_kwargs
    from segpipe.params import ConvertParams, EvaluateParams, SynthParams
    from segpipe.shards import open_shards
    from segpipe.stages import convert, evaluate, synth

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synth.run(SynthParams(images=args.images, size=(args.size, args.size), workers=2, seed=0), root / "raw")
        source = coco.read([root / "raw" / "annotations" / "instances.json"], root / "raw" / "images",
                           root / "raw" / "masks")
        convert.run(ConvertParams(workers=2, val_fraction=0.0), source, root / "shards", progress=False)
        shards = open_shards(root / "shards")
        params = EvaluateParams(split="train", batch_size=args.batch_size, num_overlays=0)
        print(f"{shards.rows('train')} images of {args.size} x {args.size}, batch {args.batch_size}", flush=True)
        for arch, threads in ((a, t) for a in args.archs for t in args.threads):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            kwargs = default_kwargs(arch)
            if "thing_ids" in kwargs:
                kwargs["thing_ids"] = shards.thing_ids
            meta = CheckpointMeta(arch=arch, num_classes=shards.num_classes, classes=shards.classes,
                                  ignore_index=shards.ignore_index, model_kwargs=kwargs,
                                  shards_manifest_sha256=shards.manifest_sha256)
            ckpt = save_checkpoint(root / f"ckpt_{arch}", build_model(arch, shards.num_classes, **kwargs), meta)
            out = root / f"{arch}_{threads}"
            t0 = time.perf_counter()
            local = evaluate.run(params, ckpt, root / "shards", out / "local")
            t_local = time.perf_counter() - t0
            t0 = time.perf_counter()
            ray.init(include_dashboard=False, logging_level="warning")
            t_start = time.perf_counter() - t0
            try:
                t1 = time.perf_counter()
                on_ray = evaluate.run(dataclasses.replace(params, engine="ray"), ckpt, root / "shards", out / "ray")
                t_ray = time.perf_counter() - t1
            finally:
                ray.shutdown()
            n = local["images"]
            same = on_ray == local
            same_dets = (out / "ray" / "detections.json").read_bytes() == (out / "local" / "detections.json").read_bytes()
            print(f"{arch:>10}, {threads} thread(s) per model: local {n / t_local:6.2f} images/s ({t_local:.1f} s) | "
                  f"ray {n / t_ray:6.2f} images/s ({t_ray:.1f} s), {n / (t_ray + t_start):6.2f} with Ray's start-up "
                  f"({t_start:.1f} s) | ray / local {t_local / t_ray:.2f}x | metrics.json equal: {same}, "
                  f"detections.json equal: {same_dets}", flush=True)


if __name__ == "__main__":
    main()
