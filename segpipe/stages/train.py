"""``segpipe train``: one architecture, Ray Train ``TorchTrainer`` fed by Ray Data.

Layers: pure helpers (params per architecture, class weights, the schedule over a wall-clock
budget, the model a run is fine-tuned from, resource planning, which checkpoints to keep), the
verbs ``train_step`` / ``train_one_epoch`` / ``validate`` (plain PyTorch, shared with the
benchmarks' loops and the precision trial), ``train_loop_per_worker`` (what runs inside each Ray
Train worker), ``fit`` (the only function that touches ``TorchTrainer``), ``run`` and ``main``.

``train.workers: 0`` (the default) is Ray Train's local mode: the same training function and the
same ``ray.train`` calls run in this process, without a controller or worker actors; Ray then
keeps no checkpoint, so the function keeps its own in the run folder (best ``num_to_keep`` and
the latest) and resumes from them. ``workers >= 1`` starts that many worker actors (a cluster,
and ``max_failures`` restarts within a run).

A run stops when ``train.budget_s`` seconds of epoch loop are spent or ``train.epochs`` are
done, whichever comes first; the learning rate warms up, then decays linearly to zero at the end
of whichever comes first (budgeted training: Li, Yumer & Ramanan, ICLR 2020).

Output directory ``OUT``::

    OUT/checkpoint/      best checkpoint by validation score (segpipe.checkpoint layout)
    OUT/history.tsv      learning curves: one row per epoch, with elapsed seconds (DVC plots)
    OUT/metrics.json     best score, epochs and steps run, throughput, startup_s / train_s and its
                         phases, the precision chosen (and its trial), the parent model (DVC metrics)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    check_model_keys,
    from_args,
)
from segpipe.params import (
    arch_train_params as params_for,  # the stage's name for it (tune, benchmarks, tests)
)

if TYPE_CHECKING:  # at run time imported where used: Ray's controller imports this module and needs none of it
    from segpipe.shards import ShardSet


class TrainError(UserError, RuntimeError):
    """Training failed; the message names the architecture and the first cause (file, key, error)."""


class InitFromError(UserError, ValueError):
    """``train.init_from`` names a model that cannot start this run; the message names the key and the version."""


# Test aid: raise once in rank 0 at the start of this epoch, to exercise resuming (never a param).
FAIL_AT_EPOCH_ENV = "SEGPIPE_FAIL_AT_EPOCH"
# An epoch that would have less than this share of the last epoch's time left is not started.
SLIVER = 0.2


# ----------------------------------------------------------------------------- pure helpers


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
    check_model_keys(arch, params.model.get(arch) or {}, defaults)
    kwargs = {**defaults, **(params.model.get(arch) or {})}
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


def peak_lr_and_warmup(p: TrainParams, finetuning: bool) -> tuple[float, float]:
    """The schedule's peak learning rate and warm-up share. A fine-tuned run starts from weights that
    already fit: a lower peak (``lr x finetune_lr_scale``) keeps more of them, and a shorter warm-up
    (``finetune_warmup``) spends less of a short budget at a rate near zero (docs/training.md has the
    measurement behind the defaults)."""
    return (p.lr * p.finetune_lr_scale, p.finetune_warmup) if finetuning else (p.lr, p.warmup)


def init_from_key(params: TrainParams, arch: str) -> str:
    """The params key that sets ``arch``'s ``init_from``: its override if it has one, else the section's."""
    return f"train.overrides.{arch}.init_from" if "init_from" in (params.overrides.get(arch) or {}) \
        else "train.init_from"


@dataclass(frozen=True)
class InitFrom:
    """The model a run is fine-tuned from, resolved and verified by the driver before Ray starts.

    ``directory`` is absolute (Ray workers run in folders of their own) and must be reachable from
    every worker; ``sha256`` is that of its weights, verified again where they are read. ``version``
    and ``registry`` are None for a checkpoint folder named by path.
    """

    key: str
    ref: str
    directory: str
    sha256: str
    arch: str
    version: str | None = None
    registry: str | None = None

    @property
    def where(self) -> str:
        """``train.init_from = 'champion' (v3)``: what error messages name."""
        named = f" ({self.version})" if self.version and self.version != self.ref else ""
        return f"{self.key} = {self.ref!r}{named}"

    def parent(self) -> dict[str, Any]:
        """``CheckpointMeta.parent`` (what ``segpipe registry lineage`` follows)."""
        return {"ref": self.ref, "version": self.version, "sha256": self.sha256, "arch": self.arch,
                "registry": self.registry}


def resolve_init_from(p: TrainParams, arch: str, key: str) -> InitFrom | None:
    """``p.init_from`` resolved: a registry alias or version (its files' sha256 verified against the
    registry) or a checkpoint folder, of architecture ``arch``. None when it is empty.

    InitFromError names ``key`` and the version for an unknown alias or version, a tampered or
    unreadable checkpoint, or another architecture.
    """
    if not p.init_from:
        return None
    from segpipe import registry
    from segpipe.checkpoint import WEIGHTS, load_meta, weights_sha256

    ref = p.init_from
    where = f"{key} = {ref!r}"
    try:
        directory, expected = registry.resolve(ref, p.registry)
        version = None
        if expected is not None:
            version = registry.read_index(p.registry)["aliases"].get(ref, ref)
            where = f"{key} = {ref!r} ({version})" if version != ref else where
            registry.verify(directory, expected)
        meta = load_meta(directory)
        sha = expected[WEIGHTS] if expected is not None else weights_sha256(directory)
    except (UserError, OSError) as e:
        raise InitFromError(f"{where}: {e}") from None
    if meta.arch != arch:
        raise InitFromError(f"{where}: a {meta.arch} model cannot initialise {arch} (fine-tuning needs the same "
                            f"architecture; set init_from per architecture in train.overrides.<arch>.init_from)")
    return InitFrom(key, ref, str(Path(directory).resolve()), sha, meta.arch, version,
                    str(p.registry) if version else None)


def init_model(model: Any, arch: str, classes: Sequence[dict[str, Any]], init: InitFrom) -> dict[str, Any]:
    """Load ``init``'s weights into the freshly built ``model`` (whose class table is ``classes``):
    the weights file is verified against ``init.sha256`` as it is read, class rows are matched by
    name (``segpipe.models.adapt_state_dict``: new classes keep their fresh rows, classes that are
    gone are dropped), and every tensor must fit (``strict``). Returns the transfer report.

    InitFromError names the key and the version for a changed or unreadable checkpoint or one whose
    tensors do not fit.
    """
    from safetensors import SafetensorError

    from segpipe.checkpoint import load_meta, load_weights
    from segpipe.models import adapt_state_dict

    try:
        state = load_weights(init.directory, expected_sha256=init.sha256)
        parent_classes = list(load_meta(init.directory).classes)
        adapted, report = adapt_state_dict(arch, state, parent_classes, model.state_dict(), list(classes))
        model.load_state_dict(adapted, strict=True)
    except (UserError, ValueError, RuntimeError, OSError, SafetensorError) as e:
        raise InitFromError(f"{init.where}: {e}") from None
    return report.to_dict()


@dataclass
class Clock:
    """Seconds and steps of the epoch loop, carried across restarts (restored from the checkpoint)."""

    elapsed_before: float = 0.0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def run_fingerprint(params: dict[str, Any], manifest_sha256: str, code_sha256: str,
                    parent_sha256: str | None = None) -> str:
    """Identifies a run's inputs: a killed run is resumed only by a rerun with the same fingerprint.
    ``parent_sha256`` is the weights' of the model it is fine-tuned from: ``init_from: champion``
    names another model once the champion moves."""
    blob = json.dumps({"params": params, "data": manifest_sha256, "code": code_sha256, "parent": parent_sha256},
                      sort_keys=True)
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


def checkpoint_score(row: dict[str, Any]) -> float:
    """What ranks a run's checkpoints, higher is better: an epoch's validation score, or minus its
    training loss when it was not validated (``train.val_every``)."""
    score = row.get("val_score")
    return float(score) if score is not None and not math.isnan(score) else -float(row["train_loss"])


@dataclass(frozen=True)
class KeptCheckpoint:
    """A checkpoint that local mode keeps in the run folder itself (``checkpoint_<epoch>``)."""

    name: str
    epoch: int
    score: float


KEPT_NAME = re.compile(r"checkpoint_(\d{6})")


def kept_name(epoch: int) -> str:
    return f"checkpoint_{epoch:06d}"


def retained(kept: Sequence[KeptCheckpoint], num_to_keep: int) -> list[KeptCheckpoint]:
    """The checkpoints to keep: the best ``num_to_keep`` by score (the later of equal ones) and the
    latest (what a rerun resumes from), in epoch order."""
    best = sorted(kept, key=lambda k: (k.score, k.epoch), reverse=True)[:num_to_keep]
    latest = max(kept, key=lambda k: k.epoch, default=None)
    return sorted({*best, *([latest] if latest else [])}, key=lambda k: k.epoch)


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
    checkpoint then use up the budget, the next epoch ends before its first step, unreported, and the
    last checkpoint, already written, recorded no cause. Only the budget ends a run that way."""
    if progress.get("stopped_by"):
        return str(progress["stopped_by"])
    return "budget" if budget_s > 0 and int(progress.get("epochs", 0)) < epochs else "epochs"


# ----------------------------------------------------------------------------- epoch verbs


def train_step(model: Any, images: Any, targets: list[dict[str, Any]], optimizer: Any, scaler: Any, precision: str,
               channels_last: bool = False, grad_clip: float = 0.0) -> float:
    """One optimizer step on a collated batch (``segpipe.data.collate_targets``): forward under
    ``precision``'s autocast, backward (scaled for fp16), optional gradient clipping, update.
    Returns the loss; a non-finite loss is a FloatingPointError naming its terms."""
    import torch

    from segpipe.precision import autocast

    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(precision, images.device.type):
        losses = model(images, targets)
        loss = sum(losses.values())
    if not torch.isfinite(loss):
        terms = {k: float(v.detach()) for k, v in losses.items()}
        raise FloatingPointError(f"non-finite loss {float(loss.detach())} ({terms})")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


def time_settings(build: Callable[[], Any], p: TrainParams, batch: tuple[Any, list[dict[str, Any]]],
                  settings: Sequence[Any], warmup: int = 1, rounds: int = 2, drop_slower: float = 1.5) -> dict[Any, float]:
    """Training images/s of each of ``settings`` (``segpipe.precision.Setting``): a model from
    ``build()`` per setting, ``warmup`` untimed steps each, then ``rounds`` rounds of one timed step
    of every setting in turn (a host whose load changes slows all alike); the rate is from each
    setting's fastest step, the one least disturbed by other work on the host. A setting already
    ``drop_slower`` times slower than the fastest sits out the later rounds: it cannot win, and
    the trial counts toward the run's start-up."""
    import torch

    images, targets = batch
    device = images.device
    runs = []
    for s in settings:
        model = build().to(device).train()
        if s.channels_last:
            model = model.to(memory_format=torch.channels_last)
        runs.append((s, model, make_optimizer(model, p), torch.amp.GradScaler(device.type, enabled=s.precision == "fp16")))
    best, failed = {s: math.inf for s in settings}, set()
    for i in range(warmup + rounds):
        fastest = min(best.values())
        for s, model, optimizer, scaler in runs:
            if s in failed or best[s] > drop_slower * fastest:
                continue
            t0 = time.perf_counter()
            try:
                train_step(model, images, targets, optimizer, scaler, s.precision, s.channels_last, p.grad_clip)
            except FloatingPointError:  # a setting whose loss overflows is no candidate: rated 0
                failed.add(s)
                continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                best[s] = min(best[s], time.perf_counter() - t0)
    return {s: 0.0 if s in failed else round(images.shape[0] / t, 2) for s, t in best.items()}


def choose_setting(p: TrainParams, arch: str, meta: dict[str, Any], device: Any,
                   measure: Callable[..., dict[Any, float]] = time_settings) -> tuple[Any, dict[str, Any]]:
    """The precision and memory format of this run, and a record of how they were chosen:
    ``{"choice", "source": "explicit" | "trial" | "cache", "rates" (images/s), "seconds"}``.

    With more than one candidate (``segpipe.precision.candidates``) the choice is the fastest in a
    short timed trial (``measure``) of the run's architecture, crop and batch size on a synthetic
    batch, cached per host (``segpipe.precision``), so a host measures it once. The trial leaves
    the random state as it found it.
    """
    import torch

    from segpipe import precision as prec
    from segpipe.data import collate_targets, synthetic_batch
    from segpipe.models import build_model, spec_of

    settings = prec.candidates(p.precision, p.channels_last, device.type, prec.cpu_supports_bf16(),
                               device.type == "cuda" and torch.cuda.is_bf16_supported(), spec_of(arch).channels_last)
    if len(settings) == 1:
        return settings[0], {"choice": settings[0].name, "source": "explicit"}
    threads = torch.get_num_threads()
    key = prec.trial_key(arch, meta["num_classes"], meta["model_kwargs"], p.image_size, p.batch_size, threads,
                         settings, prec.host_description(device), torch.__version__)
    cached = prec.read_cached(prec.cache_path(), key)
    if cached is not None:
        return prec.Setting.parse(cached["choice"]), {**cached, "source": "cache"}
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        prepared = synthetic_batch(p.batch_size, p.image_size, meta["num_classes"], meta["thing_ids"],
                                   meta["ignore_index"], seed=0)
        batch = collate_targets(prepared, device)
        rates = measure(lambda: build_model(arch, meta["num_classes"], **meta["model_kwargs"]), p, batch, settings)
    choice = prec.pick_fastest(rates)
    entry = {"choice": choice.name, "rates": {s.name: r for s, r in rates.items()},
             "seconds": round(time.perf_counter() - t0, 2), "threads": threads, "batch_size": p.batch_size,
             "image_size": p.image_size}
    try:
        prec.write_cached(prec.cache_path(), key, entry)
    except OSError as e:  # a read-only home: measured again next time, nothing worse
        print(f"[{arch}] could not cache the precision trial in {prec.cache_path()}: {e}", file=sys.stderr)
    return choice, {**entry, "source": "trial"}


def train_one_epoch(model: Any, batches: Iterable[dict[str, Any]], optimizer: Any, scaler: Any, device: Any,
                    precision: str, schedule: Schedule, clock: Clock, base_lr: float, channels_last: bool = False,
                    agree: Callable[[float], float] | None = None, grad_clip: float = 0.0,
                    on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """One pass over ``batches`` (prepared batches, see segpipe.data) of ``train_step``, stopping early when the
    schedule is complete. The learning rate of every step follows the schedule; ``agree`` makes
    workers take the same stop decision (the largest progress of any); ``grad_clip`` > 0 clips the
    gradient norm; ``on_step(images, seconds)`` is called after each step with the epoch's images and
    seconds so far (the progress line). Returns the mean loss, images, steps and seconds, and
    ``stopped`` when the schedule ended the epoch."""

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
        total += train_step(model, images, targets, optimizer, scaler, precision, channels_last, grad_clip)
        n_img += images.shape[0]
        n_steps += 1
        clock.steps += 1
        if on_step is not None:
            on_step(n_img, time.perf_counter() - t0)
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
    base_lr: float  # the schedule's peak (train.lr, or lr x finetune_lr_scale when fine-tuning)
    start_epoch: int
    history: list[dict[str, Any]]
    restarts: list[dict[str, Any]]
    val_future: Any  # concurrent.futures.Future of this worker's prepared validation batches
    names: list[str]
    keep_in: str | None = None  # local mode: the run folder where rank 0 keeps checkpoints itself
    loop_started_at: float | None = None  # time.time() when this process's epoch loop started
    first_batch_s: float | None = None  # seconds this process waited for Ray Data's first batch

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
    from segpipe.models import build_model
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
    setting, trial = choose_setting(p, arch, meta, device) if rank == 0 else (None, None)
    if world > 1:  # every worker trains alike: rank 0's choice (its host's cache, or its trial)
        shared = [setting, trial]
        torch.distributed.broadcast_object_list(shared, src=0)
        setting, trial = shared
    precision, channels_last = setting.precision, setting.channels_last
    if rank == 0 and trial["source"] != "explicit":
        rates = ", ".join(f"{k} {v:g}" for k, v in trial.get("rates", {}).items())
        print(f"[{arch}] precision {setting.name} ({'measured' if trial['source'] == 'trial' else 'cached'}: "
              f"{rates} img/s)", flush=True)
    init = InitFrom(**config["init_from"]) if config.get("init_from") else None
    base_lr, warmup = peak_lr_and_warmup(p, init is not None)

    def fresh_model() -> tuple[Any, dict[str, Any] | None]:
        """The model as a run starts it: built, then the parent's weights (train.init_from) loaded."""
        model = build_model(arch, meta["num_classes"], **meta["model_kwargs"])
        return model, init_model(model, arch, meta["classes"], init) if init else None

    model, transfer = fresh_model()
    if transfer is not None and rank == 0:
        print(f"[{arch}] fine-tuning from {init.where}: {len(transfer['kept'])} classes kept, "
              f"{len(transfer['added'])} added, {len(transfer['dropped'])} dropped; peak lr {base_lr:g}", flush=True)
    optimizer = make_optimizer(model, p)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    clock, start_epoch, history, restarts = Clock(), 1, [], []
    with resume_from(config) as d:
        previous = None
        if d is not None:
            try:
                model.load_state_dict(load_weights(d))
                last = load_train_state(d, optimizer, scaler=scaler)
                previous = load_meta(d)
            except Exception as e:  # truncated by a full disk, or deleted: start afresh rather than crash-loop
                model, transfer = fresh_model()
                optimizer = make_optimizer(model, p)
                scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
                restarts = [{"unusable_checkpoint": f"{type(e).__name__}: {e}"[:300], "started_afresh": True}]
                if rank == 0:
                    print(f"[{arch}] the latest checkpoint is unusable ({type(e).__name__}: {e}); starting afresh",
                          flush=True)
    if previous is not None:
        history = list(previous.history)
        done = previous.run
        clock = Clock(elapsed_before=float(done.get("elapsed_s", 0.0)), steps=int(done.get("steps", 0)))
        # A worker failure restarts within this run; a new process picking up a killed run's checkpoints
        # (same inputs, hence the same run folder) resumes it.
        after = "worker failure" if previous.attempt == config["attempt"] else "interrupted run"
        restarts = [*previous.restarts, {"resumed_from_epoch": last, "steps": clock.steps, "after": after,
                                         "elapsed_s": round(clock.elapsed_before, 3)}]
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
    schedule = Schedule(p.budget_s, config["total_steps"], warmup)
    return WorkerRun(
        p=p, arch=arch, task=meta["task"],
        meta={**meta, "worker_nodes": nodes, "precision": precision, "channels_last": channels_last,
              "precision_trial": trial, "attempt": config["attempt"],
              "transfer": transfer, "lr_schedule": {"peak_lr": base_lr, "warmup": warmup}},
        rank=rank, world=world, device=device, precision=precision, channels_last=channels_last, model=model,
        optimizer=optimizer, scaler=scaler, schedule=schedule, clock=clock, base_lr=base_lr, start_epoch=start_epoch,
        history=history,
        restarts=restarts, val_future=val_future,
        names=class_names(meta["classes"], meta["num_classes"]), keep_in=config.get("keep_in") if rank == 0 else None,
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: epochs of train, validate, reduce, report, until the schedule ends."""
    import ray.train
    import ray.train.torch

    batch_size = int(config["params"]["batch_size"])
    device = ray.train.torch.get_device()
    train_shard = ray.train.get_dataset_shard("train")
    iter_kw = {"batch_size": batch_size, "device": device, "pin_memory": device.type == "cuda"}
    # Ray Data starts its pipeline while the model is built (and its precision measured).
    first = FirstBatch(train_shard.iter_torch_batches(**iter_kw))
    try:
        run = setup_worker(config)
    except BaseException:
        first.close()  # in local mode, a pipeline left running would outlive Ray's disconnect
        raise
    relay = config.get("progress") if run.rank == 0 else None  # the driver's progress line (segpipe.progress)
    limits = {"budget_s": run.p.budget_s, "total_epochs": run.p.epochs, "total_steps": config["total_steps"]}

    def on_step(images: int, seconds: float) -> None:
        relay.update(step=run.clock.steps, images_per_s=images * run.world / max(seconds, 1e-9),
                     used_s=run.clock.elapsed(), **limits)

    run.clock.started = time.perf_counter()  # the epoch loop starts now
    run.loop_started_at = time.time()
    for epoch in range(run.start_epoch, run.p.epochs + 1):
        if run.schedule.progress(run.clock.elapsed(), run.clock.steps) >= 1.0:
            break  # a resumed run whose schedule was already complete
        maybe_fail(config, epoch, run)
        started = run.clock.elapsed()
        batches = first.batches(run) if first is not None else iter(train_shard.iter_torch_batches(**iter_kw))
        first = None
        # Closed when the epoch ends, also when the schedule ends it early: Ray Data then stops its
        # pipeline now rather than at garbage collection (in local mode, after Ray has disconnected).
        with contextlib.closing(batches):
            stats = train_one_epoch(run.model, batches, run.optimizer, run.scaler, run.device, run.precision,
                                    run.schedule, run.clock, run.base_lr, run.channels_last,
                                    run.agree if run.world > 1 else None, run.p.grad_clip,
                                    on_step if relay is not None else None)
        if relay is not None:
            relay.update(epochs=epoch, step=run.clock.steps, used_s=run.clock.elapsed(), **limits)
        if stats["stopped"] and stats["steps"] == 0 and run.history:
            # the previous epoch's validation and checkpoint used up the budget before this epoch's
            # first step: no row for an epoch that did not train; the last checkpoint stands and
            # ``stop_cause`` names the budget (the steps are agreed, so every worker breaks here).
            # A run with no checkpoint yet reports this one, untrained, as its budget's result.
            break
        stopped_by = run.stop_reason(stats["stopped"], epoch, started)
        last = stopped_by is not None
        if not last and (not run.p.val_every or epoch % run.p.val_every):
            continue
        conf = None
        if config["has_val"] and run.p.val_every:
            conf = run.summed(validate(run.model, run.val_batches, run.task, run.names, run.meta["thing_ids"],
                                       run.meta["ignore_index"], run.device, run.p.val_detection))
        totals = run.summed(np.array([stats["train_loss"], stats["images"], stats["seconds"]], dtype=np.float64))
        score = report(run, epoch, totals, conf, stopped_by)
        if relay is not None and not math.isnan(score):
            relay.update(val=score, used_s=run.clock.elapsed())
        if last:
            break
    if first is not None:  # a resumed run whose schedule was already complete
        first.close()


class FirstBatch:
    """The first epoch's batches, the first of them fetched in a thread from the moment this is made:
    the wait for Ray Data's first batch overlaps the worker's set-up instead of following it."""

    def __init__(self, batches: Iterable[Any]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.iterator = iter(batches)
        self.future = ThreadPoolExecutor(1, thread_name_prefix="first-batch").submit(self._first)

    def _first(self) -> tuple[Any, float]:
        batch = next(self.iterator, None)
        return batch, time.perf_counter()

    def batches(self, run: WorkerRun) -> Iterator[Any]:
        """The epoch's batches; records in ``run.first_batch_s`` how long the loop waited for the first."""
        waited = time.perf_counter()
        batch, arrived = self.future.result()
        run.first_batch_s = round(max(0.0, arrived - waited), 3)
        if batch is None:
            return
        yield batch
        yield from self.iterator

    def close(self) -> None:
        """Stop the pipeline without taking a batch from it."""
        with contextlib.suppress(Exception):  # its error, if any, is not the one to report
            self.future.result()
        self.iterator.close()


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


def report(run: WorkerRun, epoch: int, totals: np.ndarray, conf: np.ndarray | None, stopped_by: str | None) -> float:
    """Append the epoch's history row; rank 0 saves and reports a checkpoint, the others the metrics.
    Returns the validation score (NaN when not validated)."""
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
    metrics = {**row, "val_score": checkpoint_score(row)}
    if run.rank != 0:
        ray.train.report(metrics)
        return score
    limit = f"{run.schedule.budget_s:g} s" if run.schedule.budget_s else f"{run.p.epochs} epochs"
    validated = f"val_{'miou' if run.task == 'semantic' else 'thing_miou'} {score:.4f}" \
        if not math.isnan(score) else "not validated (train.val_every)"
    from segpipe.progress import detail

    # the stage's log file: the console shows the progress line instead
    detail(f"[{run.arch}] epoch {epoch} step {run.clock.steps} {elapsed:.0f}/{limit} loss {loss:.4f} {validated} "
           f"({row['images_per_s']:.1f} img/s, {run.precision})")
    progress = {"elapsed_s": round(elapsed, 3), "steps": run.clock.steps, "epochs": epoch, "stopped_by": stopped_by,
                "loop_started_at": run.loop_started_at, "first_batch_s": run.first_batch_s,
                "reported_at": time.time()}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "ckpt"
        meta = {**run.meta, "epoch": epoch, "metrics": row, "history": run.history, "restarts": run.restarts,
                "run": progress}
        save_checkpoint(d, run.model, meta, optimizer=run.optimizer, scaler=run.scaler)
        if run.keep_in is not None:  # local mode: Ray keeps only the last report, in memory
            keep_checkpoint(run.keep_in, d, epoch, run.p.num_to_keep)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))
    return score


def keep_checkpoint(run_dir: str, checkpoint: Path, epoch: int, num_to_keep: int) -> list[KeptCheckpoint]:
    """Local mode's checkpoint manager: copy ``checkpoint`` into the run folder ``run_dir`` (a path
    or URI) as ``checkpoint_<epoch>``, whole or not at all (``segpipe.storage.output_dir``), then
    remove every kept checkpoint but the best ``num_to_keep`` and the latest. Returns those kept."""
    from segpipe.checkpoint import META
    from segpipe.storage import delete, output_dir, resolve

    run = resolve(run_dir, "train.storage_path")
    with output_dir(run.child(kept_name(epoch)), META) as staging:
        shutil.copytree(checkpoint, staging.path, dirs_exist_ok=True)
    kept = kept_checkpoints(run_dir)
    keep = retained(kept, num_to_keep)
    for k in set(kept) - set(keep):
        delete(run.child(k.name))
    return keep


def kept_checkpoints(run_dir: str) -> list[KeptCheckpoint]:
    """The complete checkpoints local mode kept in the run folder ``run_dir`` (path or URI), in epoch order."""
    from segpipe.checkpoint import META, TRAINING_FILES, is_complete
    from segpipe.storage import list_files, read_bytes, resolve

    run = resolve(run_dir, "train.storage_path")
    files: dict[str, set[str]] = {}
    for rel in list_files(run):
        folder, _, name = rel.partition("/")
        files.setdefault(folder, set()).add(name)
    kept = []
    for folder, names in sorted(files.items()):
        match = KEPT_NAME.fullmatch(folder)
        if not match or not set(TRAINING_FILES) <= names or (run.local and not is_complete(run.local_path() / folder)):
            continue
        try:
            meta = json.loads(read_bytes(run.child(folder, META)))
            kept.append(KeptCheckpoint(folder, int(match.group(1)), checkpoint_score(meta["metrics"])))
        except (OSError, ValueError, KeyError, TypeError):  # a meta cut short: not a checkpoint to resume from
            continue
    return kept


@contextlib.contextmanager
def local_copy(run_dir: str, name: str) -> Iterator[Path]:
    """The kept checkpoint ``name`` of ``run_dir`` as a local folder (downloaded from an object store)."""
    from segpipe.storage import list_files, read_bytes, resolve

    where = resolve(run_dir, "train.storage_path").child(name)
    if where.local:
        yield where.local_path()
        return
    with tempfile.TemporaryDirectory(prefix="segpipe-checkpoint-") as tmp:
        for rel in list_files(where):
            target = Path(tmp, *rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(read_bytes(where.child(*rel.split("/"))))
        yield Path(tmp)


@contextlib.contextmanager
def resume_from(config: dict[str, Any]) -> Iterator[Path | None]:
    """The checkpoint a worker resumes from: Ray's (a restarted worker, or a rerun of a killed run
    with the same inputs, hence the same run folder), or in local mode, where Ray keeps nothing
    across processes, the latest one kept in the run folder; None for a fresh start."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            yield Path(d)
        return
    kept = kept_checkpoints(config["keep_in"]) if config.get("keep_in") else []
    if not kept:
        yield None
        return
    with local_copy(config["keep_in"], kept[-1].name) as d:
        yield d


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
        cpus_per_worker: float, init: InitFrom | None = None, train_tables: list[Any] | None = None,
        marks: dict[str, float] | None = None, progress: Any = None, tune_trial: bool = False) -> Any:
    """Build the Ray Data datasets and run ``TorchTrainer``; returns the Ray ``Result``.
    ``train_tables``: the train split, already read and verified (``read_train_split``); ``marks``
    gets the time the dataset was ready; ``progress``: a ``segpipe.progress.ProgressRelay`` that
    rank 0 feeds the driver's progress line with. ``tune_trial``: this run is a trial of a Ray Tune
    search (``segpipe tune``): Ray's Train-to-Tune callback passes each report on to Tune. It needs
    worker actors (``p.workers >= 1``): Ray refuses ``ray.train`` calls in a Tune trial's own process,
    where local mode would run them."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from segpipe.data import build_train_dataset
    from segpipe.storage import resolve

    fail_at = os.environ.get(FAIL_AT_EPOCH_ENV)
    config = {"params": as_dict(p), "arch": arch, "meta": meta, "has_val": shards.rows("val") > 0,
              "shards": shards.to_dict(), "cpus_per_worker": cpus_per_worker,
              "total_steps": p.epochs * steps_per_epoch(shards.rows("train"), p.batch_size, max(1, p.workers)),
              "fail_at_epoch": int(fail_at) if fail_at else None, "progress": progress,
              "init_from": dataclasses.asdict(init) if init else None,
              "keep_in": resolve(storage, "train.storage_path").child(name).uri if p.workers == 0 else None,
              "attempt": f"{os.getpid()}-{time.time_ns()}",
              "fail_marker": resolve(storage, "train.storage_path").child(name, "failed-once").uri}
    callbacks = []
    if tune_trial:
        if not p.workers:
            raise TrainError(f"[{arch}] a Tune trial trains in worker actors (train.workers >= 1), not local mode")
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    train = build_train_dataset(shards, augment_config(p, meta), p.batch_size, cache=p.cache_shards,
                                tables=train_tables)
    if marks is not None:
        marks["dataset"] = time.time()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        # num_workers 0 is Ray Train's local mode: this function runs here, in the driver, and
        # Ray keeps no checkpoint (keep_in: the worker keeps its own in the run folder).
        scaling_config=ray.train.ScalingConfig(
            num_workers=p.workers, use_gpu=p.use_gpu, resources_per_worker={"CPU": cpus_per_worker},
            placement_strategy=p.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=p.num_to_keep, checkpoint_score_attribute="val_score", checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=p.max_failures),
            callbacks=callbacks,
        ),
        datasets={"train": train},
        # One worker reads the whole dataset; several split it (streaming_split) between them.
        dataset_config=ray.train.DataConfig(datasets_to_split="all" if p.workers > 1 else []),
    )
    return trainer.fit()


def run(params: TrainParams, arch: str, shards: Path | str | ShardSet, out: Path | str, ray_address: str | None = None,
        started_at: float | None = None, tune_trial: bool = False) -> dict[str, Any]:
    """Train ``arch`` on ``shards``; write ``out/checkpoint``, ``out/history.tsv``, ``out/metrics.json``.

    ``shards``, ``out`` and ``train.storage_path`` may be local paths or object-store URIs
    (``segpipe.storage``); on an object store ``metrics.json`` is written last.

    ``started_at`` (``time.time()`` of the process start, by default now) is where ``startup_s``
    is counted from: everything of the run that is not its epoch loop.

    ``tune_trial``: the run is a trial of ``segpipe tune`` (in a Tune trial's process, Ray already
    connected): its reports go to Tune (``fit``), and it shows no progress line of its own.
    """
    from segpipe.cluster import connect
    from segpipe.shards import ShardSet, open_shards, verify_split
    from segpipe.storage import delete, output_dir, resolve

    started_at = time.time() if started_at is None else started_at
    marks = {"run": time.time()}  # wall-clock times of the start-up's phases (startup_phases)
    p = params_for(params, arch)
    out = resolve(out, "--out")
    runs = resolve(p.storage_path, "train.storage_path") if p.storage_path else out.parent.child(".ray_results")
    shards = shards if isinstance(shards, ShardSet) else open_shards(resolve(shards, "--shards"))
    # Fail here, naming the file, rather than inside a Ray worker. With cache_shards the train
    # split is read (and verified) once, here, for the object store.
    train_tables = read_train_split(shards) if p.cache_shards else None
    for split in ("val",) if p.cache_shards else ("train", "val"):
        if shards.rows(split):
            verify_split(shards, split)
    # Before Ray starts (and, when it is set, importing torch before Ray: see plan)
    init = resolve_init_from(p, arch, init_from_key(params, arch))
    marks["verified"] = time.time()
    run_name = None
    from segpipe.progress import Progress

    try:
        with Progress(f"train {arch}", phase="starting Ray and the data", enabled=not tune_trial) as line, \
                connect(ray_address) as started:
            import ray  # after connect: it sets the auth mode that Ray reads when it initialises
            import ray.train

            from segpipe.data import warm_up_decoders

            # A Ray worker process starts and imports the decoders while this one imports torch and
            # the models: Ray Data's first tasks then find it ready (2 cores: the two overlap). Not in
            # a Tune trial: Tune would hold the task to the trial's placement group, sized for the trial.
            if not tune_trial:
                warm_up_decoders()
            marks["connected"] = time.time()
            meta, run_name = plan(p, arch, shards, init)
            marks["planned"] = time.time()
            try:
                cpw = p.cpus_per_worker
                if started and p.workers:
                    total = float(ray.cluster_resources().get("CPU", 1))
                    cpw = plan_cpus_per_worker(total, p.workers, p.cpus_per_worker)
                    if cpw != p.cpus_per_worker:
                        print(f"[{arch}] {p.workers} worker(s) x {p.cpus_per_worker} CPU would starve Ray Data on "
                              f"{total:g} CPUs; using {cpw} CPU per worker", file=sys.stderr)
                with line.relayed() if line.enabled else contextlib.nullcontext() as relay:
                    result = fit(p, arch, shards, runs.uri, run_name, meta, cpw, init, train_tables, marks, relay,
                                 tune_trial)
            except (ray.exceptions.RayError, ray.train.TrainingFailedError) as e:
                raise TrainError(f"[{arch}] training failed: {root_cause(e)}") from e
            except Exception as e:  # local mode: the training function's own error, raised here
                if p.workers:
                    raise
                raise TrainError(f"[{arch}] training failed: {type(e).__name__}: {e}") from e
    finally:
        if runs.local and run_name:
            # Checkpoints cut short (a full disk, a kill) are removed: they free the space and are never resumed from.
            prune_incomplete_checkpoints(runs.child(run_name).local_path())
    from segpipe.checkpoint import CheckpointMeta, load_meta, write_meta

    if getattr(result, "error", None):
        raise TrainError(f"[{arch}] training failed: {root_cause(result.error)}")
    # One after the other, never nested: when the best checkpoint is also the last they are one
    # object, and on object storage leaving the inner as_directory() deleted the download (Ray's
    # checkpoint_tmp_<uuid> folder, one per checkpoint object and process) the outer one still read.
    last_ckpt, best_ckpt = final_checkpoints(result, runs.child(run_name).uri if p.workers == 0 else None, arch)
    with last_ckpt as last_dir:
        last_meta = load_meta(last_dir)
    with best_ckpt as d:
        best_meta = load_meta(d)
        final = final_meta(best_meta.to_json(), last_meta.to_json(), p.budget_s, p.epochs)
        history, progress = final["history"], final["run"]
        with output_dir(out, "metrics.json") as staging:
            tmp = staging.path
            shutil.copytree(d, tmp / "checkpoint")
            write_meta(tmp / "checkpoint", CheckpointMeta.from_json(final))
            atomic_write_text(tmp / "history.tsv", history_tsv(history))
            marks["end"] = time.time()
            wall = marks["end"] - started_at
            train_s = float(progress["elapsed_s"])
            # this process's own start-up: the epoch loop of an earlier, killed process is not in its wall time
            own_train_s = train_s - earlier_processes_s(last_meta.restarts)
            summary = {
                "arch": arch, "best_epoch": best_meta.epoch, "best_val_score": best_meta.metrics["val_score"],
                "final_train_loss": history[-1]["train_loss"], "epochs": progress["epochs"],
                "steps": progress["steps"], "stopped_by": progress["stopped_by"], "budget_s": p.budget_s,
                "precision": best_meta.precision, "channels_last": best_meta.extra.get("channels_last"),
                "precision_trial": best_meta.extra.get("precision_trial"), "restarts": len(last_meta.restarts),
                "parent": best_meta.parent,
                "images_per_s": round(float(np.mean([h["images_per_s"] for h in history])), 3),
                "train_s": round(train_s, 1), "startup_s": round(wall - own_train_s, 1), "wall_s": round(wall, 1),
                "startup_phases": startup_phases(started_at, marks, last_meta.run),
            }
            atomic_write_json(tmp / "metrics.json", summary)
    # A finished run leaves nothing to resume: the next run with the same inputs starts afresh.
    delete(runs.child(run_name))
    kept = (f"best epoch {summary['best_epoch']} val score {summary['best_val_score']}"
            if summary["best_val_score"] is not None else f"last epoch {summary['best_epoch']} kept (no validation)")
    print(f"[{arch}] {kept}; "
          f"{summary['steps']} steps in {summary['train_s']} s, start-up {summary['startup_s']} s; wrote {out}")
    return summary


def plan(p: TrainParams, arch: str, shards: ShardSet, init: InitFrom | None) -> tuple[dict[str, Any], str]:
    """What the driver settles before the trainer starts: the checkpoint meta every worker starts
    with, and the run's name (``<arch>-<fingerprint>``, the same for the same inputs, so that a
    killed run's rerun resumes it). It imports torch and the models: ``run`` calls it once Ray is
    connected, so that a Ray worker starts meanwhile."""
    from segpipe.models import MODELS, spec_of

    if arch not in MODELS:
        raise ParamsError(f"--arch {arch!r}: unknown architecture; valid: {', '.join(MODELS)}")
    spec = spec_of(arch)
    meta = {
        "arch": arch, "task": spec.task, "model_kwargs": model_kwargs_for(p, arch, shards),
        "num_classes": shards.num_classes, "classes": list(shards.classes), "thing_ids": shards.thing_ids,
        "ignore_index": shards.ignore_index, "image_size": p.image_size, "params": as_dict(p),
        "shards_manifest_sha256": shards.manifest_sha256, "needs_instances": spec.outputs != {"semantic"},
        "parent": init.parent() if init else None,
    }
    fingerprint = run_fingerprint(as_dict(p), shards.manifest_sha256, code_sha256(), init.sha256 if init else None)
    return meta, f"{arch}-{fingerprint}"


def read_train_split(shards: ShardSet) -> list[Any]:
    """The train split's shards as tables, each verified against the manifest as it is read."""
    from segpipe.shards import read_shard

    return [read_shard(shards, f) for f in shards.files_of("train")] if shards.rows("train") else []


def earlier_processes_s(restarts: Iterable[dict[str, Any]]) -> float:
    """Seconds of epoch loop a run had behind it when this process resumed it (the last restart
    ``after`` an ``"interrupted run"``: a new process picking up a killed one's checkpoint); 0 for a
    run this process started. Worker failures restart within the process and count as its own."""
    resumed = [r for r in restarts if r.get("after") == "interrupted run"]
    return float(resumed[-1].get("elapsed_s", 0.0)) if resumed else 0.0


def startup_phases(started_at: float, marks: dict[str, float], progress: dict[str, Any]) -> dict[str, float]:
    """Where a run's seconds outside its epoch loop went, in order: the process start and imports
    until ``run``, reading and verifying the shards, connecting to Ray, ``plan`` (importing torch and
    the models, resolving init_from), the Ray Data dataset, the trainer until the epoch loop starts (Ray Train's controller and worker,
    the model, the precision trial), and from the last report to the end (the output written).
    ``first_batch_s`` is inside the epoch loop (``train_s``): Ray Data's first batch of this process."""
    loop = float(progress.get("loop_started_at") or marks["end"])
    reported = float(progress.get("reported_at") or marks["end"])
    phases = {"imports_s": marks["run"] - started_at, "shards_s": marks["verified"] - marks["run"],
              "ray_connect_s": marks["connected"] - marks["verified"], "plan_s": marks["planned"] - marks["connected"],
              "dataset_s": marks.get("dataset", marks["end"]) - marks["planned"],
              "trainer_s": loop - marks.get("dataset", loop), "finish_s": marks["end"] - reported,
              "first_batch_s": float(progress.get("first_batch_s") or 0.0)}
    return {k: round(v, 2) for k, v in phases.items()}


def final_checkpoints(result: Any, kept_in: str | None, arch: str) -> tuple[Any, Any]:
    """Context managers of the local folders of a finished run's last and best checkpoints: Ray's
    (worker actors), or those local mode kept in the run folder ``kept_in``."""
    if kept_in is None:
        best = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_score", -math.inf))[0]
        return result.checkpoint.as_directory(), best.as_directory()
    kept = kept_checkpoints(kept_in)
    if not kept:
        raise TrainError(f"[{arch}] training reported no checkpoint to {kept_in}")
    best = max(kept, key=lambda k: (k.score, k.epoch))
    return local_copy(kept_in, kept[-1].name), local_copy(kept_in, best.name)


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
