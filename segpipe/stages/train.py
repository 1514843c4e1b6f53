"""``segpipe train``: one architecture, Ray Train ``TorchTrainer`` fed by Ray Data.

Layers: pure helpers (params per architecture, class weights, precision, the schedule over a
wall-clock budget, resource planning), the per-epoch verbs ``train_one_epoch`` / ``validate``
(plain PyTorch, shared with the benchmarks' loops), ``train_loop_per_worker`` (what runs inside
each Ray worker), ``fit`` (the only function that touches ``TorchTrainer``), ``run`` and ``main``.

A run stops when ``train.budget_s`` seconds of epoch loop are spent or ``train.epochs`` are
done, whichever comes first; the learning rate warms up, then decays linearly to zero at the end
of whichever comes first (budgeted training: Li, Yumer & Ramanan, ICLR 2020).

Output directory ``OUT``::

    OUT/checkpoint/      best checkpoint by validation score (segpipe.checkpoint layout)
    OUT/history.tsv      learning curves: one row per epoch, with elapsed seconds (DVC plots)
    OUT/metrics.json     best score, epochs and steps run, throughput, startup_s / train_s (DVC metrics)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.errors import UserError
from segpipe.files import atomic_write_json, atomic_write_text
from segpipe.params import (
    DetectionParams,
    ParamsError,
    TrainParams,
    add_params_arguments,
    as_dict,
    build,
    from_args,
)

if TYPE_CHECKING:  # at run time imported where used: Ray's controller imports this module and needs none of it
    from segpipe.shards import ShardSet


class TrainError(UserError, RuntimeError):
    """Training failed; the message names the architecture and the first cause (file, key, error)."""


# Keys of TrainParams that only make sense for the whole run, not per architecture.
RUN_LEVEL_KEYS = ("architectures", "overrides", "model")
# Test aid: raise once in rank 0 at the start of this epoch, to exercise resuming (never a param).
FAIL_AT_EPOCH_ENV = "SEGPIPE_FAIL_AT_EPOCH"
# An epoch that would have less than this share of the last epoch's time left is not started.
SLIVER = 0.2


# ----------------------------------------------------------------------------- pure helpers


def params_for(params: TrainParams, arch: str) -> TrainParams:
    """Apply ``train.overrides.<arch>`` on top of the section, validated like the file."""
    over = dict(params.overrides.get(arch) or {})
    bad = [k for k in over if k in RUN_LEVEL_KEYS]
    if bad:
        raise ParamsError(f"train.overrides.{arch}: {bad} cannot be overridden per architecture")
    merged = {**as_dict(params), **over}
    return build(TrainParams, merged, f"train.overrides.{arch}")


def class_weights(pixels: Sequence[int], power: float = 0.5) -> list[float]:
    """Cross-entropy weights from per-class pixel counts: ``(median frequency / frequency) ** power``
    (median-frequency balancing, softened by the square root). Classes with no pixels get 1."""
    counts = np.asarray(pixels, dtype=np.float64)
    present = counts > 0
    if not present.any():
        return [1.0] * len(counts)
    freq = counts / counts.sum()
    median = float(np.median(freq[present]))
    w = np.ones_like(freq)
    w[present] = (median / freq[present]) ** power
    return [round(float(x), 4) for x in w]


def model_kwargs_for(params: TrainParams, arch: str, shards: ShardSet) -> dict[str, Any]:
    """Explicit build kwargs: the builder's defaults, then ``train.model.<arch>``, then data facts
    (ignore index, thing ids, class weights from the train split's pixel counts)."""
    from segpipe.models import default_kwargs

    defaults = default_kwargs(arch)
    kwargs = {**defaults, **(params.model.get(arch) or {})}
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ParamsError(f"train.model.{arch}: unknown key(s) {unknown}; valid: {sorted(defaults)}")
    if "ignore_index" in defaults:
        kwargs["ignore_index"] = shards.ignore_index
    if "thing_ids" in defaults:
        kwargs["thing_ids"] = shards.thing_ids
    if "backbone_weights" in defaults and params.backbone_weights:
        kwargs["backbone_weights"] = params.backbone_weights
    if "class_weights" in defaults and params.class_weighting == "sqrt_inverse" and kwargs["class_weights"] is None:
        pixels = list(shards.class_pixels.get("train", ()))
        if len(pixels) != shards.num_classes:
            raise ParamsError(f"train.class_weighting: {shards.root} has no per-class pixel counts of the train "
                              "split (converted by an older segpipe: convert again, or set class_weighting: none)")
        kwargs["class_weights"] = class_weights(pixels)
    return kwargs


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


def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str, device_type: str, cpu_bf16: bool) -> str:
    """The precision a run uses: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + GradScaler).

    ``auto`` is fp16 on CUDA and bf16 on CPUs with native bf16, else fp32. An explicit request the
    device cannot honour is an error naming ``train.precision``.
    """
    if requested == "auto":
        if device_type == "cuda":
            return "fp16"
        return "bf16" if cpu_bf16 else "fp32"
    if requested == "fp16" and device_type != "cuda":
        raise ParamsError("train.precision = 'fp16' needs a CUDA device (use bf16, fp32 or auto on CPU)")
    if requested == "bf16" and device_type == "cpu" and not cpu_bf16:
        raise ParamsError("train.precision = 'bf16': this CPU has no native bf16 (AVX512-BF16/AMX); use fp32 or auto")
    return requested


@dataclass(frozen=True)
class Schedule:
    """How far a run is, in [0, 1], and the learning-rate factor there.

    Progress is the larger of the share of the budget spent (when ``budget_s`` > 0) and the share
    of the steps done (when ``total_steps`` > 0), so the run ends, and the learning rate reaches
    zero, at whichever limit comes first: linear warm-up over the first ``warmup`` of the run,
    then linear decay to zero.
    """

    budget_s: float
    total_steps: int
    warmup: float = 0.05

    def progress(self, elapsed_s: float, steps: int) -> float:
        p = steps / self.total_steps if self.total_steps > 0 else 0.0
        if self.budget_s > 0:
            p = max(p, elapsed_s / self.budget_s)
        return min(max(p, 0.0), 1.0)

    def lr_factor(self, progress: float) -> float:
        if progress < self.warmup:
            return progress / self.warmup
        return max(0.0, (1.0 - progress) / (1.0 - self.warmup))


def steps_per_epoch(rows: int, batch_size: int, workers: int) -> int:
    """Optimizer steps per epoch of each worker (Ray Data splits rows equally; the last batch may be short)."""
    return math.ceil((rows // workers) / batch_size) if rows >= workers else 0


@dataclass
class Clock:
    """Seconds and steps of the epoch loop, carried across restarts (restored from the checkpoint)."""

    elapsed_before: float = 0.0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def run_fingerprint(params: dict[str, Any], manifest_sha256: str, code_sha256: str) -> str:
    """Identifies a run's inputs: a killed run is resumed only by a rerun with the same fingerprint."""
    blob = json.dumps({"params": params, "data": manifest_sha256, "code": code_sha256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def code_sha256(package: Path | None = None) -> str:
    """sha256 over the source files of the segpipe package (what a train stage runs)."""
    package = package or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(package.rglob("*.py")):
        h.update(f.relative_to(package).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def val_score(conf: np.ndarray, task: str, names: list[str], thing_ids: list[int], ignore: int) -> float:
    """mIoU (semantic) or thing mIoU (instance) of a ``validate`` matrix; NaN when nothing is scored."""
    from segpipe.metrics.semantic import ThingsVsBackground, compute

    score = compute(conf)["miou"] if task == "semantic" else ThingsVsBackground(names, thing_ids, ignore).thing_miou(conf)
    return float("nan") if score is None else float(score)


def history_tsv(history: list[dict[str, Any]]) -> str:
    cols = ["epoch", "steps", "elapsed_s", "train_loss", "val_score", "images_per_s", "lr"]
    lines = ["\t".join(cols)]
    for h in history:
        lines.append("\t".join("" if h.get(c) is None else str(h[c]) for c in cols))
    return "\n".join(lines) + "\n"


def final_meta(best_meta: dict[str, Any], last_meta: dict[str, Any], budget_s: float, epochs: int) -> dict[str, Any]:
    """The best checkpoint's meta, with the whole run's history, restarts and progress from the last
    one, and why the run stopped (``stop_cause``).

    The best epoch may predate a crash and restart; its own meta then knows nothing of what came after.
    """
    progress = last_meta.get("run", {})
    return {**best_meta, "history": last_meta["history"], "restarts": last_meta.get("restarts", []),
            "run": {**progress, "stopped_by": stop_cause(progress, budget_s, epochs)}}


def stop_cause(progress: dict[str, Any], budget_s: float, epochs: int) -> str:
    """Why a run ended: ``progress["stopped_by"]`` of its last checkpoint, or, when that is empty
    and a budget was set, the budget. The workers decide after each epoch's training; when that epoch's validation and
    checkpoint then use up the budget, the loop ends before another epoch and the last checkpoint,
    already written, recorded no cause. Only the budget ends a run that way."""
    if progress.get("stopped_by"):
        return str(progress["stopped_by"])
    return "budget" if budget_s > 0 and int(progress.get("epochs", 0)) < epochs else "epochs"


# ----------------------------------------------------------------------------- epoch verbs


def autocast(precision: str, device_type: str) -> Any:
    """The autocast context of ``precision`` (a no-op for fp32)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def train_one_epoch(model: Any, batches: Iterable[dict[str, Any]], optimizer: Any, scaler: Any, device: Any,
                    precision: str, schedule: Schedule, clock: Clock, base_lr: float, channels_last: bool = False,
                    agree: Callable[[float], float] | None = None, grad_clip: float = 0.0) -> dict[str, Any]:
    """One pass over ``batches`` (prepared batches, see segpipe.data), stopping early when the
    schedule is complete. The learning rate of every step follows the schedule; ``agree`` makes
    workers take the same stop decision (the largest progress of any); ``grad_clip`` > 0 clips the
    gradient norm. Returns the mean loss, images, steps and seconds, and ``stopped`` when the
    schedule ended the epoch."""
    import torch

    from segpipe.data import collate_targets

    model.train()
    total, n_img, n_steps, stopped = 0.0, 0, 0, False
    t0 = time.perf_counter()
    for batch in batches:
        progress = schedule.progress(clock.elapsed(), clock.steps)
        if agree is not None:
            progress = agree(progress)
        if progress >= 1.0:
            stopped = True
            break
        for group in optimizer.param_groups:
            group["lr"] = base_lr * schedule.lr_factor(progress)
        images, targets = collate_targets(batch, device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(precision, device.type):
            losses = model(images, targets)
            loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} ({ {k: float(v) for k, v in losses.items()} })")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], grad_clip)
        scaler.step(optimizer)
        scaler.update()
        total += float(loss.detach())
        n_img += images.shape[0]
        n_steps += 1
        clock.steps += 1
    progress = schedule.progress(clock.elapsed(), clock.steps)
    stopped = stopped or (agree(progress) if agree is not None else progress) >= 1.0
    return {"train_loss": total / max(n_steps, 1), "images": n_img, "steps": n_steps,
            "seconds": time.perf_counter() - t0, "stopped": stopped}


def validate(model: Any, batches: Any, task: str, names: list[str], thing_ids: list[int], ignore: int, device: Any,
             detection: DetectionParams) -> np.ndarray:
    """Confusion matrix over the validation batches (summable across workers), in fp32.

    Label maps come from ``segpipe.inference.predict_images``, the entry point ``segpipe evaluate``
    runs: argmax maps (semantic models) scored against all classes, or detections selected by
    ``detection`` (``train.val_detection``) and rendered to a label map
    (instance models), scored against things plus one background.
    """
    from segpipe.inference import Request, predict_images
    from segpipe.metrics.semantic import ConfusionMatrix, ThingsVsBackground

    model = getattr(model, "module", model)  # unwrapped: the workers' shares of val differ, so no collective forward
    model.eval()
    things = ThingsVsBackground(names, thing_ids, ignore) if task == "instance" else None
    cm = things.matrix() if things else ConfusionMatrix(len(names), ignore)
    request = Request(frozenset({"semantic" if things is None else "instances"}), len(names), ignore,
                      detection)
    for batch in batches:
        for gt, pred in zip(batch["semantic"], predict_images(model, list(batch["image"]), request, device)):
            if things is None:
                cm.update(gt, pred.labels)
            else:
                things.update(cm, gt, pred.labels)
    return cm.mat


# ----------------------------------------------------------------------------- Ray worker


@dataclass
class WorkerRun:
    """Everything one Ray Train worker holds across epochs."""

    p: TrainParams
    arch: str
    task: str
    meta: dict[str, Any]
    rank: int
    world: int
    device: Any
    precision: str
    channels_last: bool
    model: Any
    optimizer: Any
    scaler: Any
    schedule: Schedule
    clock: Clock
    start_epoch: int
    history: list[dict[str, Any]]
    restarts: list[dict[str, Any]]
    val_future: Any  # concurrent.futures.Future of this worker's prepared validation batches
    names: list[str]

    @property
    def val_batches(self) -> list[dict[str, np.ndarray]]:
        return self.val_future.result()

    def agree(self, value: float) -> float:
        """The largest ``value`` over all workers (every worker calls it at the same step)."""
        if self.world == 1:
            return value
        import torch

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def stop_reason(self, schedule_done: bool, epoch: int, epoch_started: float) -> str | None:
        """``"budget"`` or ``"epochs"`` when the run ends after ``epoch``, else None. A run also
        ends when another epoch would have only a sliver of budget left: it would mostly wait for
        its first batch."""
        budget, now = self.schedule.budget_s, self.clock.elapsed()
        sliver = budget > 0 and self.agree(float(budget - now < SLIVER * (now - epoch_started))) >= 1.0
        if sliver or (schedule_done and budget > 0 and now >= budget):
            return "budget"
        return "epochs" if schedule_done or epoch == self.p.epochs else None

    def summed(self, values: np.ndarray) -> np.ndarray:
        """``values`` summed over all workers."""
        if self.world == 1:
            return values
        import torch

        t = torch.as_tensor(values, device=self.device)
        torch.distributed.all_reduce(t)
        return t.cpu().numpy()


def setup_worker(config: dict[str, Any]) -> WorkerRun:
    """Build the model, optimizer and schedule; restore them from Ray's latest checkpoint if any."""
    from concurrent.futures import ThreadPoolExecutor

    import ray
    import ray.train
    import ray.train.torch
    import torch

    from segpipe.checkpoint import load_meta, load_train_state, load_weights
    from segpipe.data import validation_batches
    from segpipe.metrics.semantic import class_names
    from segpipe.models import build_model, spec_of
    from segpipe.shards import ShardSet

    p = build(TrainParams, config["params"], "train (worker)")
    arch, meta = config["arch"], config["meta"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # 0 = the node's cores shared by the workers on it: Ray Data's decode tasks are light, and on
    # 2 cores 2 threads train 1.4x faster than the 1 the worker's CPU share would give (measured).
    torch.set_num_threads(p.threads or max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    torch.manual_seed(p.seed + rank)
    device = ray.train.torch.get_device()
    precision = resolve_precision(p.precision, device.type, cpu_supports_bf16())
    channels_last = spec_of(arch).channels_last and precision != "fp32"
    model = build_model(arch, meta["num_classes"], **meta["model_kwargs"])
    optimizer = make_optimizer(model, p)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    clock, start_epoch, history, restarts = Clock(), 1, [], []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        try:
            with ckpt.as_directory() as d:
                model.load_state_dict(load_weights(Path(d)))
                last = load_train_state(Path(d), optimizer, scaler=scaler)
                previous = load_meta(Path(d))
        except Exception as e:  # truncated by a full disk, or deleted: start afresh rather than crash-loop
            model = build_model(arch, meta["num_classes"], **meta["model_kwargs"])
            optimizer, scaler = make_optimizer(model, p), torch.amp.GradScaler(device.type, enabled=precision == "fp16")
            restarts = [{"unusable_checkpoint": f"{type(e).__name__}: {e}"[:300], "started_afresh": True}]
            if rank == 0:
                print(f"[{arch}] the latest checkpoint is unusable ({type(e).__name__}: {e}); starting afresh",
                      flush=True)
        else:
            history = list(previous.history)
            done = previous.run
            clock = Clock(elapsed_before=float(done.get("elapsed_s", 0.0)), steps=int(done.get("steps", 0)))
            # A worker failure restarts within this run; a new process picking up a killed run's checkpoints
            # (same inputs, hence the same run folder) resumes it.
            after = "worker failure" if previous.attempt == config["attempt"] else "interrupted run"
            restarts = [*previous.restarts, {"resumed_from_epoch": last, "steps": clock.steps,
                                                        "after": after}]
            start_epoch = last + 1
            if rank == 0:
                print(f"[{arch}] resumed from the checkpoint of epoch {last} after a {after} (step {clock.steps}, "
                      f"{clock.elapsed_before:.1f} s trained); continuing at epoch {start_epoch}", flush=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": meta["task"] == "instance"})
    node = ray.get_runtime_context().get_node_id()
    nodes = [node]
    if world > 1:
        nodes = [None] * world
        torch.distributed.all_gather_object(nodes, node)
    shards = ShardSet.from_dict(config["shards"])
    # Decoding the val split overlaps the first epoch's wait for Ray Data's first batch.
    val_future = ThreadPoolExecutor(1, thread_name_prefix="val-prep").submit(
        validation_batches, shards, augment_config(p, meta), p.batch_size, rank, world) \
        if p.val_every and config["has_val"] else _done([])
    schedule = Schedule(p.budget_s, config["total_steps"], p.warmup)
    return WorkerRun(
        p=p, arch=arch, task=meta["task"],
        meta={**meta, "worker_nodes": nodes, "precision": precision, "attempt": config["attempt"]}, rank=rank,
        world=world, device=device, precision=precision, channels_last=channels_last, model=model,
        optimizer=optimizer, scaler=scaler, schedule=schedule, clock=clock, start_epoch=start_epoch, history=history,
        restarts=restarts, val_future=val_future,
        names=class_names(meta["classes"], meta["num_classes"]),
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: epochs of train, validate, reduce, report, until the schedule ends."""
    import ray.train

    run = setup_worker(config)
    train_shard = ray.train.get_dataset_shard("train")
    iter_kw = {"batch_size": run.p.batch_size, "device": run.device, "pin_memory": run.device.type == "cuda"}
    run.clock.started = time.perf_counter()  # the epoch loop starts now
    for epoch in range(run.start_epoch, run.p.epochs + 1):
        if run.schedule.progress(run.clock.elapsed(), run.clock.steps) >= 1.0:
            break  # a resumed run whose schedule was already complete
        maybe_fail(config, epoch, run)
        started = run.clock.elapsed()
        stats = train_one_epoch(run.model, train_shard.iter_torch_batches(**iter_kw), run.optimizer, run.scaler,
                                run.device, run.precision, run.schedule, run.clock, run.p.lr, run.channels_last,
                                run.agree if run.world > 1 else None, run.p.grad_clip)
        stopped_by = run.stop_reason(stats["stopped"], epoch, started)
        last = stopped_by is not None
        if not last and (not run.p.val_every or epoch % run.p.val_every):
            continue
        conf = None
        if config["has_val"] and run.p.val_every:
            conf = run.summed(validate(run.model, run.val_batches, run.task, run.names, run.meta["thing_ids"],
                                       run.meta["ignore_index"], run.device, run.p.val_detection))
        totals = run.summed(np.array([stats["train_loss"], stats["images"], stats["seconds"]], dtype=np.float64))
        report(run, epoch, totals, conf, stopped_by)
        if last:
            break


def _done(value: Any) -> Any:
    from concurrent.futures import Future

    future: Future = Future()
    future.set_result(value)
    return future


def maybe_fail(config: dict[str, Any], epoch: int, run: WorkerRun) -> None:
    """The test aid behind SEGPIPE_FAIL_AT_EPOCH: fail once, in rank 0, at that epoch."""
    if epoch != config.get("fail_at_epoch") or run.rank != 0:
        return
    from segpipe.storage import exists, resolve, write_bytes

    marker = resolve(config["fail_marker"], "fail marker")  # in the run's storage: seen by every node
    if not exists(marker):
        write_bytes(marker, f"injected failure at epoch {epoch}\n".encode())
        raise RuntimeError(f"[{run.arch}] injected failure at epoch {epoch} ({FAIL_AT_EPOCH_ENV})")


def report(run: WorkerRun, epoch: int, totals: np.ndarray, conf: np.ndarray | None, stopped_by: str | None) -> None:
    """Append the epoch's history row; rank 0 saves and reports a checkpoint, the others the metrics."""
    import ray.train

    from segpipe.checkpoint import save_checkpoint

    loss, n_img, secs = totals[0] / run.world, totals[1], totals[2] / run.world
    score = val_score(conf, run.task, run.names, run.meta["thing_ids"], run.meta["ignore_index"]) \
        if conf is not None else float("nan")
    elapsed = run.clock.elapsed()
    row = {"epoch": epoch, "steps": run.clock.steps, "elapsed_s": round(elapsed, 2), "train_loss": round(float(loss), 6),
           "val_score": None if math.isnan(score) else round(score, 6),
           "images_per_s": round(float(n_img) / max(float(secs), 1e-9), 3),
           "lr": run.optimizer.param_groups[0]["lr"]}
    run.history.append(row)
    metrics = {**row, "val_score": score if not math.isnan(score) else -float(loss)}
    if run.rank != 0:
        ray.train.report(metrics)
        return
    limit = f"{run.schedule.budget_s:g} s" if run.schedule.budget_s else f"{run.p.epochs} epochs"
    validated = f"val_{'miou' if run.task == 'semantic' else 'thing_miou'} {score:.4f}" \
        if not math.isnan(score) else "not validated (train.val_every)"
    print(f"[{run.arch}] epoch {epoch} step {run.clock.steps} {elapsed:.0f}/{limit} loss {loss:.4f} {validated} "
          f"({row['images_per_s']:.1f} img/s, {run.precision})", flush=True)
    progress = {"elapsed_s": round(elapsed, 3), "steps": run.clock.steps, "epochs": epoch, "stopped_by": stopped_by}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "ckpt"
        meta = {**run.meta, "epoch": epoch, "metrics": row, "history": run.history, "restarts": run.restarts,
                "run": progress}
        save_checkpoint(d, run.model, meta, optimizer=run.optimizer, scaler=run.scaler)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))


def make_optimizer(model: Any, p: TrainParams) -> Any:
    import torch

    params = [q for q in model.parameters() if q.requires_grad]
    # the fused kernels (CPU and CUDA) update all parameters in one pass instead of one tensor at a time
    if p.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=p.lr, momentum=0.9, weight_decay=p.weight_decay, fused=True)


def augment_config(p: TrainParams, meta: dict[str, Any]) -> Any:
    from segpipe.data import AugmentConfig

    return AugmentConfig(size=p.image_size, scale_range=p.scale_range, hflip=p.hflip, photometric=p.photometric,
                         ignore_index=meta["ignore_index"], instances=meta["needs_instances"])


# ----------------------------------------------------------------------------- the Ray edge


def fit(p: TrainParams, arch: str, shards: ShardSet, storage: str, name: str, meta: dict[str, Any],
        cpus_per_worker: float) -> Any:
    """Build the Ray Data datasets and run ``TorchTrainer``; returns the Ray ``Result``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from segpipe.data import build_train_dataset, warm_up_decoders
    from segpipe.storage import resolve

    warm_up_decoders()
    fail_at = os.environ.get(FAIL_AT_EPOCH_ENV)
    config = {"params": as_dict(p), "arch": arch, "meta": meta, "has_val": shards.rows("val") > 0,
              "shards": shards.to_dict(), "cpus_per_worker": cpus_per_worker,
              "total_steps": p.epochs * steps_per_epoch(shards.rows("train"), p.batch_size, p.workers),
              "fail_at_epoch": int(fail_at) if fail_at else None,
              "attempt": f"{os.getpid()}-{time.time_ns()}",
              "fail_marker": resolve(storage, "train.storage_path").child(name, "failed-once").uri}
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


def run(params: TrainParams, arch: str, shards: Path | str | ShardSet, out: Path | str, ray_address: str | None = None,
        started_at: float | None = None) -> dict[str, Any]:
    """Train ``arch`` on ``shards``; write ``out/checkpoint``, ``out/history.tsv``, ``out/metrics.json``.

    ``shards``, ``out`` and ``train.storage_path`` may be local paths or object-store URIs
    (``segpipe.storage``); on an object store ``metrics.json`` is written last.

    ``started_at`` (``time.time()`` of the process start, by default now) is where ``startup_s``
    is counted from: everything of the run that is not its epoch loop.
    """
    from segpipe.checkpoint import CheckpointMeta, load_meta, write_meta
    from segpipe.models import MODELS, spec_of
    from segpipe.shards import ShardSet, open_shards, verify_split
    from segpipe.storage import delete, output_dir, resolve

    started_at = time.time() if started_at is None else started_at
    if arch not in MODELS:
        raise ParamsError(f"--arch {arch!r}: unknown architecture; valid: {', '.join(MODELS)}")
    p = params_for(params, arch)
    out = resolve(out, "--out")
    runs = resolve(p.storage_path, "train.storage_path") if p.storage_path else out.parent.child(".ray_results")
    shards = shards if isinstance(shards, ShardSet) else open_shards(resolve(shards, "--shards"))
    for split in ("train", "val"):  # fail here, naming the file, rather than inside a Ray worker
        if shards.rows(split):
            verify_split(shards, split)
    spec = spec_of(arch)
    meta = {
        "arch": arch, "task": spec.task, "model_kwargs": model_kwargs_for(p, arch, shards),
        "num_classes": shards.num_classes, "classes": list(shards.classes), "thing_ids": shards.thing_ids,
        "ignore_index": shards.ignore_index, "image_size": p.image_size, "params": as_dict(p),
        "shards_manifest_sha256": shards.manifest_sha256, "needs_instances": spec.outputs != {"semantic"},
    }
    fingerprint = run_fingerprint(as_dict(p), shards.manifest_sha256, code_sha256())
    run_name = f"{arch}-{fingerprint}"
    storage = runs.uri
    from segpipe.cluster import connect

    try:
        with connect(ray_address) as started:
            import ray  # after connect: it sets the auth mode that Ray reads when it initialises
            import ray.train

            try:
                total = float(ray.cluster_resources().get("CPU", 1))
                cpw = plan_cpus_per_worker(total, p.workers, p.cpus_per_worker) if started else p.cpus_per_worker
                if cpw != p.cpus_per_worker:
                    print(f"[{arch}] {p.workers} worker(s) x {p.cpus_per_worker} CPU would starve Ray Data on "
                          f"{total:g} CPUs; using {cpw} CPU per worker", file=sys.stderr)
                result = fit(p, arch, shards, storage, run_name, meta, cpw)
            except (ray.exceptions.RayError, ray.train.TrainingFailedError) as e:
                raise TrainError(f"[{arch}] training failed: {root_cause(e)}") from e
    finally:
        if runs.local:
            # Checkpoints cut short (a full disk, a kill) are removed: they free the space and are never resumed from.
            prune_incomplete_checkpoints(runs.child(run_name).local_path())
    if getattr(result, "error", None):
        raise TrainError(f"[{arch}] training failed: {root_cause(result.error)}")
    best = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_score", -math.inf))[0]
    # One after the other, never nested: when the best checkpoint is also the last they are one
    # object, and on object storage leaving the inner as_directory() deleted the download (Ray's
    # checkpoint_tmp_<uuid> folder, one per checkpoint object and process) the outer one still read.
    with result.checkpoint.as_directory() as last_dir:
        last_meta = load_meta(last_dir)
    with best.as_directory() as d:
        best_meta = load_meta(d)
        final = final_meta(best_meta.to_json(), last_meta.to_json(), p.budget_s, p.epochs)
        history, progress = final["history"], final["run"]
        with output_dir(out, "metrics.json") as staging:
            tmp = staging.path
            shutil.copytree(d, tmp / "checkpoint")
            write_meta(tmp / "checkpoint", CheckpointMeta.from_json(final))
            atomic_write_text(tmp / "history.tsv", history_tsv(history))
            wall = time.time() - started_at
            train_s = float(progress["elapsed_s"])
            summary = {
                "arch": arch, "best_epoch": best_meta.epoch, "best_val_score": best_meta.metrics["val_score"],
                "final_train_loss": history[-1]["train_loss"], "epochs": progress["epochs"],
                "steps": progress["steps"], "stopped_by": progress["stopped_by"], "budget_s": p.budget_s,
                "precision": best_meta.precision, "restarts": len(last_meta.restarts),
                "images_per_s": round(float(np.mean([h["images_per_s"] for h in history])), 3),
                "train_s": round(train_s, 1), "startup_s": round(wall - train_s, 1), "wall_s": round(wall, 1),
            }
            atomic_write_json(tmp / "metrics.json", summary)
    # A finished run leaves nothing to resume: the next run with the same inputs starts afresh.
    delete(runs.child(run_name))
    kept = (f"best epoch {summary['best_epoch']} val score {summary['best_val_score']}"
            if summary["best_val_score"] is not None else f"last epoch {summary['best_epoch']} kept (no validation)")
    print(f"[{arch}] {kept}; "
          f"{summary['steps']} steps in {summary['train_s']} s, start-up {summary['startup_s']} s; wrote {out}")
    return summary


def prune_incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """Remove the checkpoint folders of a Ray run folder that are not complete segpipe checkpoints
    (``segpipe.checkpoint.is_complete``); returns them."""
    from segpipe.checkpoint import is_complete

    removed = []
    for d in sorted(Path(run_dir).glob("checkpoint_*")) if Path(run_dir).is_dir() else []:
        if not is_complete(d):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def root_cause(error: BaseException) -> str:
    """The last line of the innermost traceback Ray carries for a worker failure (e.g.
    ``segpipe.shards.ShardError: data/shards/val/part-00000.parquet: checksum does not match ...``)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip() and not ln.strip().startswith("...")]
    errors = [ln for ln in lines if ln.split(":", 1)[0].rsplit(".", 1)[-1].endswith(("Error", "Exception"))]
    return (errors or lines or [type(error).__name__])[-1]


def process_started_at() -> float:
    """``time.time()`` at which this process started (the CLI counts start-up from there)."""
    import psutil

    return psutil.Process().create_time()


def main(argv: list[str] | None = None) -> None:
    from segpipe.lifetime import die_with_parent, terminate_as_interrupt

    started_at = process_started_at()
    # Killed with its parent (dvc repro, a Prefect task): stop the Ray it started, write nothing.
    die_with_parent(os.getppid(), signal.SIGTERM)
    terminate_as_interrupt()
    ap = argparse.ArgumentParser(prog="segpipe train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", required=True, help="architecture name (see segpipe.models.MODELS)")
    ap.add_argument("--shards", required=True, help="shard folder or URI (segpipe convert --out; s3://, gs://, file://)")
    ap.add_argument("--out", required=True, help="output folder or URI (s3://, gs://, file://)")
    ap.add_argument("--ray-address", default=None, help="existing Ray cluster (default: $RAY_ADDRESS, else local)")
    add_params_arguments(ap)
    args = ap.parse_args(argv)
    params = from_args(args, "train")
    run(params, args.arch, args.shards, args.out, args.ray_address, started_at=started_at)
