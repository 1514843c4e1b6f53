"""``segpipe train``: one architecture, Ray Train ``TorchTrainer`` fed by Ray Data.

Layers: pure helpers (params per architecture, resource planning, the confusion-matrix
validation score), the per-epoch verbs ``train_one_epoch`` / ``validate`` (plain PyTorch,
shared with the benchmark's baseline loop), ``train_loop_per_worker`` (what runs inside each Ray
worker), ``fit`` (the only function that touches ``TorchTrainer``), ``run`` and ``main``.

Output directory ``OUT``::

    OUT/checkpoint/      best checkpoint by validation score (segpipe.checkpoint layout)
    OUT/history.tsv      per-epoch learning curves (DVC plots)
    OUT/metrics.json     best score, epochs, throughput, start-up time (DVC metrics)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.files import atomic_dir, atomic_write_json, atomic_write_text
from segpipe.params import ParamsError, TrainParams, add_params_arguments, as_dict, build, from_args

# Keys of TrainParams that only make sense for the whole run, not per architecture.
RUN_LEVEL_KEYS = ("architectures", "overrides", "model")


# ----------------------------------------------------------------------------- pure helpers


def params_for(params: TrainParams, arch: str) -> TrainParams:
    """Apply ``train.overrides.<arch>`` on top of the section, validated like the file."""
    over = dict(params.overrides.get(arch) or {})
    bad = [k for k in over if k in RUN_LEVEL_KEYS]
    if bad:
        raise ParamsError(f"train.overrides.{arch}: {bad} cannot be overridden per architecture")
    merged = {**as_dict(params), **over}
    return build(TrainParams, merged, f"train.overrides.{arch}")


def model_kwargs_for(params: TrainParams, arch: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Explicit build kwargs: the builder's defaults, then ``train.model.<arch>``, then data facts."""
    from segpipe.models import default_kwargs

    defaults = default_kwargs(arch)
    kwargs = {**defaults, **(params.model.get(arch) or {})}
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ParamsError(f"train.model.{arch}: unknown key(s) {unknown}; valid: {sorted(defaults)}")
    if "ignore_index" in defaults:
        kwargs["ignore_index"] = int(manifest.get("ignore_index", 255))
    if "thing_ids" in defaults:
        kwargs["thing_ids"] = [int(c["id"]) for c in manifest["classes"] if c.get("isthing")]
    if "backbone_weights" in defaults and params.backbone_weights:
        kwargs["backbone_weights"] = params.backbone_weights
    return kwargs


def num_classes_of(manifest: dict[str, Any]) -> int:
    return max(int(c["id"]) for c in manifest["classes"]) + 1


def plan_cpus_per_worker(total_cpus: float, workers: int, cpus_per_worker: float, reserve: float = 0.5) -> float:
    """CPUs per training worker that leave ``reserve`` CPUs to Ray Data's read and map tasks.

    On 2 cores, 2 workers at 1 CPU each starve Ray Data and the job waits forever; this shrinks
    the request to fractional CPUs instead. A request that already fits is returned unchanged.
    """
    if workers * cpus_per_worker + reserve <= total_cpus:
        return cpus_per_worker
    fitted = (total_cpus - reserve) / workers
    if fitted < 0.1:
        raise ValueError(f"{workers} training workers do not fit on {total_cpus} CPUs with {reserve} reserved for data")
    return math.floor(fitted * 100) / 100


# ----------------------------------------------------------------------------- epoch verbs


def train_one_epoch(model: Any, batches: Any, optimizer: Any, scaler: Any, device: Any, amp: bool) -> dict[str, float]:
    """One pass over ``batches`` (prepared batches, see segpipe.data); returns mean loss and counts."""
    import torch

    from segpipe.data import collate_targets

    model.train()
    total, n_img, n_steps = 0.0, 0, 0
    t0 = time.perf_counter()
    for batch in batches:
        images, targets = collate_targets(batch, device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            losses = model(images, targets)
            loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} ({ {k: float(v) for k, v in losses.items()} })")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += float(loss.detach())
        n_img += images.shape[0]
        n_steps += 1
    dt = time.perf_counter() - t0
    return {"train_loss": total / max(n_steps, 1), "images": n_img, "seconds": dt}


def validate(model: Any, batches: Any, task: str, names: list[str], thing_ids: list[int], ignore: int, device: Any,
             score_threshold: float = 0.05, mask_threshold: float = 0.5, max_detections: int = 100) -> np.ndarray:
    """Confusion matrix over the validation batches (summable across workers).

    Semantic models: argmax maps against all classes. Instance models: detections rendered to a
    label map exactly as ``segpipe evaluate`` does, scored against things plus one background.
    """
    import torch

    from segpipe.data import collate_targets
    from segpipe.metrics.semantic import ConfusionMatrix, ThingsVsBackground
    from segpipe.stages.evaluate import render_instances, select_detections

    model.eval()
    things = ThingsVsBackground(names, thing_ids, ignore) if task == "instance" else None
    cm = things.matrix() if things else ConfusionMatrix(len(names), ignore)
    with torch.no_grad():
        for batch in batches:
            images, targets = collate_targets(batch, device)
            out = model(images)
            for b, t in enumerate(targets):
                gt = t["semantic"].cpu().numpy()
                if things is None:
                    cm.update(gt, out[b].argmax(0).cpu().numpy())
                    continue
                inst = select_detections(out[b], gt.shape[0], gt.shape[1], score_threshold, mask_threshold,
                                         max_detections)
                things.update(cm, gt, render_instances(inst, gt.shape[0], gt.shape[1], ignore))
    return cm.mat


def val_score(conf: np.ndarray, task: str, names: list[str], thing_ids: list[int], ignore: int) -> float:
    """mIoU (semantic) or thing mIoU (instance) of a ``validate`` matrix; NaN when nothing is scored."""
    from segpipe.metrics.semantic import ThingsVsBackground, compute

    score = compute(conf)["miou"] if task == "semantic" else ThingsVsBackground(names, thing_ids, ignore).thing_miou(conf)
    return float("nan") if score is None else float(score)


# ----------------------------------------------------------------------------- Ray worker


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: build, maybe resume, train, validate, report, checkpoint."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from segpipe.checkpoint import load_train_state, save_checkpoint
    from segpipe.data import validation_batches
    from segpipe.metrics.semantic import class_names
    from segpipe.models import build_model

    p = build(TrainParams, config["params"], "train (worker)")
    arch, task, meta_base = config["arch"], config["task"], config["meta"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = p.threads or max(1, int(round(config["cpus_per_worker"])))
    torch.set_num_threads(threads)
    torch.manual_seed(p.seed + rank)

    device = ray.train.torch.get_device()
    amp = p.use_gpu and p.mixed_precision and device.type == "cuda"
    model = build_model(arch, meta_base["num_classes"], **meta_base["model_kwargs"])
    optimizer = make_optimizer(model, p)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_schedule(p))
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    start_epoch, history, restarts = 1, [], []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            model.load_state_dict(_load_weights(Path(d)))
            last = load_train_state(Path(d), optimizer, scheduler, scaler)
            previous = json.loads((Path(d) / "meta.json").read_text())
        history = previous.get("history", [])
        restarts = [*previous.get("restarts", []), {"resumed_from_epoch": last}]
        start_epoch = last + 1
        if rank == 0:
            print(f"[{arch}] resumed from the checkpoint of epoch {last}; continuing at epoch {start_epoch}", flush=True)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": task == "instance"})

    node = ray.get_runtime_context().get_node_id()
    nodes = [node]
    if world > 1:
        nodes = [None] * world
        torch.distributed.all_gather_object(nodes, node)
    meta_base = {**meta_base, "worker_nodes": nodes}
    train_shard = ray.train.get_dataset_shard("train")
    val_batches = validation_batches(config["shards"], augment_config(p, meta_base), p.batch_size, rank, world)
    iter_kw = {"batch_size": p.batch_size, "device": device, "pin_memory": device.type == "cuda"}
    thing_ids = meta_base.get("thing_ids", [])
    names = class_names(meta_base["classes"], meta_base["num_classes"])
    for epoch in range(start_epoch, p.epochs + 1):
        if epoch == p.fail_at_epoch and rank == 0:
            marker = Path(config["fail_marker"])
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"injected failure at epoch {epoch}\n")
                raise RuntimeError(f"[{arch}] injected failure at epoch {epoch} (train.fail_at_epoch)")
        stats = train_one_epoch(model, train_shard.iter_torch_batches(**iter_kw), optimizer, scaler, device, amp)
        scheduler.step()
        score, conf = float("nan"), None
        if config["has_val"]:
            conf = validate(model, val_batches, task, names, thing_ids, meta_base["ignore_index"], device)
            if world > 1:
                t = torch.as_tensor(conf, device=device)
                torch.distributed.all_reduce(t)
                conf = t.cpu().numpy()
            score = val_score(conf, task, names, thing_ids, meta_base["ignore_index"])
        loss = stats["train_loss"]
        if world > 1:
            t = torch.tensor([loss, stats["images"], stats["seconds"]], device=device, dtype=torch.float64)
            torch.distributed.all_reduce(t)
            loss, n_img, secs = t[0].item() / world, t[1].item(), t[2].item() / world
        else:
            n_img, secs = stats["images"], stats["seconds"]
        row = {"epoch": epoch, "train_loss": round(loss, 6), "val_score": None if math.isnan(score) else round(score, 6),
               "images_per_s": round(n_img / max(secs, 1e-9), 3), "lr": optimizer.param_groups[0]["lr"]}
        history.append(row)
        metrics = {**row, "val_score": score if not math.isnan(score) else -loss}
        if rank == 0:
            print(f"[{arch}] epoch {epoch}/{p.epochs} loss {loss:.4f} val_{'miou' if task == 'semantic' else 'thing_miou'} "
                  f"{score:.4f} ({row['images_per_s']:.1f} img/s, {secs:.1f} s)", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                d = Path(tmp) / "ckpt"
                meta = {**meta_base, "epoch": epoch, "metrics": row, "history": history, "restarts": restarts}
                save_checkpoint(d, model, meta, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))
        else:
            ray.train.report(metrics)


def _load_weights(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def make_optimizer(model: Any, p: TrainParams) -> Any:
    import torch

    params = [q for q in model.parameters() if q.requires_grad]
    if p.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    if p.optimizer == "sgd":
        return torch.optim.SGD(params, lr=p.lr, momentum=0.9, weight_decay=p.weight_decay)
    raise ParamsError(f"train.optimizer: {p.optimizer!r} is not one of 'adamw', 'sgd'")


def lr_schedule(p: TrainParams) -> Any:
    """Linear warm-up, then cosine decay to 5% over the epochs (stepped once per epoch)."""

    def f(epoch: int) -> float:
        if epoch < p.warmup_epochs:
            return (epoch + 1) / (p.warmup_epochs + 1)
        span = max(1, p.epochs - p.warmup_epochs)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - p.warmup_epochs) / span)))

    return f


# ----------------------------------------------------------------------------- the Ray edge


def connect_ray(address: str | None) -> tuple[bool, bool]:
    """Connect to ``address`` / ``RAY_ADDRESS``, or start a local Ray.

    Returns (connected here, started a local instance here); what was connected here is
    disconnected by the caller, and a Ray initialised by the caller is left alone.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and has_ray_token():
        # Clusters started by `ray start` use token authentication and a driver must opt in
        # too; Ray reads this when it is first imported, so set it before the import.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return False, False
    # Ray's own per-report chatter (and, with the dashboard off, a state-API warning every
    # second from Train's placement-group cleaner) would bury the one progress line per epoch.
    quiet = {"log_to_driver": True, "logging_level": "warning",
             "logging_config": ray.LoggingConfig(encoding="TEXT", log_level="ERROR")}
    if address:
        ray.init(address=address, **quiet)
        return True, False
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **quiet)
    return True, True


def augment_config(p: TrainParams, meta: dict[str, Any]) -> Any:
    from segpipe.data import AugmentConfig

    return AugmentConfig(size=p.image_size, scale_range=p.scale_range, hflip=p.hflip, photometric=p.photometric,
                         ignore_index=meta["ignore_index"])


def has_ray_token() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


def fit(p: TrainParams, arch: str, shards: Path, storage: str, name: str, meta: dict[str, Any],
        cpus_per_worker: float) -> Any:
    """Build the Ray Data datasets and run ``TorchTrainer``; returns the Ray ``Result``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from segpipe.data import build_train_dataset
    from segpipe.shards import read_manifest

    has_val = bool(read_manifest(shards).get("splits", {}).get("val"))
    config = {"params": as_dict(p), "arch": arch, "task": meta["task"], "meta": meta, "has_val": has_val,
              "shards": str(Path(shards).resolve()), "cpus_per_worker": cpus_per_worker,
              "fail_marker": str(Path(storage) / name / "failed-once") if "://" not in storage
              else os.path.join(tempfile.gettempdir(), f"segpipe-{name}-failed-once")}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=p.workers, use_gpu=p.use_gpu, resources_per_worker={"CPU": cpus_per_worker},
            placement_strategy=p.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=p.num_to_keep, checkpoint_score_attribute="val_score", checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=p.max_failures),
        ),
        datasets={"train": build_train_dataset(shards, augment_config(p, meta), p.batch_size, cache=p.cache_shards)},
        # One worker reads the whole dataset; several split it (streaming_split) between them.
        dataset_config=ray.train.DataConfig(datasets_to_split="all" if p.workers > 1 else []),
    )
    return trainer.fit()


def run(params: TrainParams, arch: str, shards: Path, out: Path, ray_address: str | None = None) -> dict[str, Any]:
    """Train ``arch`` on ``shards``; write ``out/checkpoint``, ``out/history.tsv``, ``out/metrics.json``."""
    from segpipe.models import MODELS, task_of
    from segpipe.shards import manifest_hash, read_manifest

    if arch not in MODELS:
        raise ParamsError(f"--arch {arch!r}: unknown architecture; valid: {', '.join(MODELS)}")
    p = params_for(params, arch)
    shards, out = Path(shards), Path(out)
    manifest = read_manifest(shards)
    kwargs = model_kwargs_for(p, arch, manifest)
    thing_ids = [int(c["id"]) for c in manifest["classes"] if c.get("isthing")]
    meta = {
        "arch": arch, "task": task_of(arch), "model_kwargs": kwargs, "num_classes": num_classes_of(manifest),
        "classes": manifest["classes"], "thing_ids": thing_ids, "ignore_index": int(manifest.get("ignore_index", 255)),
        "image_size": p.image_size, "params": as_dict(p), "shards_manifest_sha256": manifest_hash(shards),
    }
    run_name = f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    storage = p.storage_path or str(out.resolve().parent / ".ray_results")
    t0 = time.perf_counter()
    connected, started = connect_ray(ray_address)
    import ray  # after connect_ray: it sets the auth mode that Ray reads on import

    try:
        total = float(ray.cluster_resources().get("CPU", 1))
        cpw = plan_cpus_per_worker(total, p.workers, p.cpus_per_worker) if started else p.cpus_per_worker
        if cpw != p.cpus_per_worker:
            print(f"[{arch}] {p.workers} worker(s) x {p.cpus_per_worker} CPU would starve Ray Data on {total:g} CPUs; "
                  f"using {cpw} CPU per worker", file=sys.stderr)
        result = fit(p, arch, shards, storage, run_name, meta, cpw)
    finally:
        if connected:
            ray.shutdown()
    wall = time.perf_counter() - t0
    if getattr(result, "error", None):
        raise RuntimeError(f"[{arch}] training failed: {result.error}")
    best = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_score", -math.inf))[0]
    with best.as_directory() as d:
        best_meta = json.loads((Path(d) / "meta.json").read_text())
        with result.checkpoint.as_directory() as last_dir:
            last_meta = json.loads((Path(last_dir) / "meta.json").read_text())
        history = last_meta["history"]
        with atomic_dir(out) as tmp:
            shutil.copytree(d, tmp / "checkpoint")
            atomic_write_json(tmp / "checkpoint" / "meta.json", final_meta(best_meta, last_meta))
            atomic_write_text(tmp / "history.tsv", history_tsv(history))
            summary = {
                "arch": arch, "best_epoch": best_meta["epoch"], "best_val_score": best_meta["metrics"]["val_score"],
                "final_train_loss": history[-1]["train_loss"], "epochs": len(history),
                "images_per_s": round(float(np.mean([h["images_per_s"] for h in history])), 3),
                "wall_s": round(wall, 1),
            }
            atomic_write_json(tmp / "metrics.json", summary)
    print(f"[{arch}] best epoch {summary['best_epoch']} val score {summary['best_val_score']}; wrote {out}")
    return summary


def final_meta(best_meta: dict[str, Any], last_meta: dict[str, Any]) -> dict[str, Any]:
    """The best checkpoint's meta, with the whole run's history and restarts from the last one.

    The best epoch may predate a crash and restart; its own meta then knows nothing of what came after.
    """
    return {**best_meta, "history": last_meta["history"], "restarts": last_meta.get("restarts", [])}


def history_tsv(history: list[dict[str, Any]]) -> str:
    cols = ["epoch", "train_loss", "val_score", "images_per_s", "lr"]
    lines = ["\t".join(cols)]
    for h in history:
        lines.append("\t".join("" if h.get(c) is None else str(h[c]) for c in cols))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="segpipe train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", required=True, help="architecture name (see segpipe.models.MODELS)")
    ap.add_argument("--shards", required=True, type=Path, help="shard directory (segpipe convert --out)")
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    ap.add_argument("--ray-address", default=None, help="existing Ray cluster (default: $RAY_ADDRESS, else local)")
    add_params_arguments(ap)
    args = ap.parse_args(argv)
    params = from_args(args, "train")
    run(params, args.arch, args.shards, args.out, args.ray_address)

