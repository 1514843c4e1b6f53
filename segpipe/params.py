"""Typed parameters: one frozen dataclass per ``params.yaml`` section.

Loading rejects unknown keys and wrong types and names the key and the file.
A stage receives only its own section::

    p = load_section("synth", SynthParams, Path("params.yaml"), overrides=["synth.images=8"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from segpipe.errors import UserError

T = TypeVar("T")


class ParamsError(UserError, ValueError):
    """A params file or override is invalid; the message names the key and the file."""


# --------------------------------------------------------------------------------------
# Range checks: each dataclass states its own, so every way of building one (params.yaml,
# --set, train.overrides.<arch>, code) rejects a bad value before any work, naming the key.
# --------------------------------------------------------------------------------------


class RangeError(ParamsError):
    """A value of the right type outside its valid range; ``key`` is the offending field."""

    def __init__(self, key: str, value: Any, rule: str) -> None:
        super().__init__(f"{key} = {value!r}: {rule}")
        self.key = key


def require(params: Any, checks: list[tuple[str, bool, str]]) -> None:
    """Raise RangeError for the first ``(key, ok, rule)`` whose ``ok`` is false."""
    for key, ok, rule in checks:
        if not ok:
            raise RangeError(key, getattr(params, key), rule)


def _fraction(x: float) -> bool:
    return 0.0 <= x < 1.0


def _unit(x: float) -> bool:
    return 0.0 <= x <= 1.0


# --------------------------------------------------------------------------------------
# Sections. params.yaml states every default again, for users to read and edit;
# tests/test_params.py pins the two equal, so they cannot drift.
# --------------------------------------------------------------------------------------

MIN_IMAGE_SIZE = 32  # smaller images or crops cannot hold a scene's objects (and stride 32 maps)


@dataclass(frozen=True)
class SynthParams:
    images: int = 2000
    size: tuple[int, int] = (256, 256)
    seed: int = 0
    workers: int = 2  # processes; 0 = all cores
    jpeg_quality: int = 92
    rle_fraction: float = 0.15  # share of instances written as RLE (half compressed, half list)
    crowd_fraction: float = 0.04  # share of images with an iscrowd region
    ignore_band: int = 1  # pixels of 255 on some object borders; 0 disables
    # The site (segpipe/synth/sites.py; `segpipe synth --site NAME` sets all five): the defaults are
    # the default pipeline's site, byte for byte.
    palette: str = "default"  # ground palette: default (temperate) or arid (sand, sparse scrub, few ponds)
    lighting: float = 1.0  # exposure multiplier of every scene (0.7: overcast or dusk)
    warmth: float = 0.0  # white balance: > 0 warmer (red up, blue down), < 0 cooler
    haze: float = 0.0  # share of each pixel veiled by bright bluish haze (0 = clear air)
    density: float = 1.0  # multiplier of the 3-12 objects per scene

    # segpipe.synth.sites.GROUNDS' names, pinned equal by a test: params.py, a dep of every stage,
    # imports no generator code
    PALETTES: typing.ClassVar[tuple[str, ...]] = ("default", "arid")

    def __post_init__(self) -> None:
        require(self, [
            ("images", self.images >= 1, "must be >= 1"),
            ("size", MIN_IMAGE_SIZE <= min(self.size) and max(self.size) <= 16384,
             f"must be two sizes in [{MIN_IMAGE_SIZE}, 16384]"),
            ("seed", self.seed >= 0, "must be >= 0"),
            ("workers", self.workers >= 0, "must be >= 0 (0 = all cores)"),
            ("jpeg_quality", 1 <= self.jpeg_quality <= 95, "must be in [1, 95]"),
            ("rle_fraction", _unit(self.rle_fraction), "must be in [0, 1]"),
            ("crowd_fraction", _unit(self.crowd_fraction), "must be in [0, 1]"),
            ("ignore_band", 0 <= self.ignore_band <= 8, "must be in [0, 8] pixels"),
            ("palette", self.palette in self.PALETTES, f"must be one of {', '.join(self.PALETTES)}"),
            ("lighting", 0.2 <= self.lighting <= 2.0, "must be in [0.2, 2]"),
            ("warmth", -0.5 <= self.warmth <= 0.5, "must be in [-0.5, 0.5]"),
            ("haze", 0.0 <= self.haze <= 0.8, "must be in [0, 0.8]"),
            # 12 objects x 4 fits the 254 instances and 255 paints a scene can hold
            ("density", 0.0 < self.density <= 4.0, "must be in (0, 4]"),
        ])


@dataclass(frozen=True)
class ConvertParams:
    val_fraction: float = 0.05
    test_fraction: float = 0.0
    rows_per_shard: int = 256
    workers: int = 2
    max_image_pixels: int = 200_000_000  # larger images are quarantined as decompression bombs
    tile_size: int = 0  # 0 = no tiling; otherwise tile images larger than this
    tile_overlap: int = 64
    tile_min_area: int = 16  # instances clipped below this many pixels are dropped
    strict: bool = False

    def __post_init__(self) -> None:
        require(self, [
            ("val_fraction", _fraction(self.val_fraction), "must be in [0, 1)"),
            ("test_fraction", _fraction(self.test_fraction), "must be in [0, 1)"),
            ("test_fraction", self.val_fraction + self.test_fraction < 1,
             f"val_fraction + test_fraction must leave images for training (val_fraction is {self.val_fraction})"),
            ("rows_per_shard", self.rows_per_shard >= 1, "must be >= 1"),
            ("workers", self.workers >= 0, "must be >= 0 (0 = all cores)"),
            ("max_image_pixels", self.max_image_pixels >= 1, "must be >= 1"),
            ("tile_size", self.tile_size >= 0, "must be 0 (no tiling) or a tile's side in pixels"),
            ("tile_overlap", self.tile_overlap >= 0 and (self.tile_size == 0 or self.tile_overlap < self.tile_size),
             "must be >= 0 and below tile_size"),
            ("tile_min_area", self.tile_min_area >= 0, "must be >= 0"),
        ])


@dataclass(frozen=True)
class DetectionParams:
    """How an instance model's raw detections become kept ones (``segpipe.inference.select_detections``):
    score >= ``score_threshold``, mask probability >= ``mask_threshold``, at most ``max_detections``
    per image. Evaluate, train validation and predict each have their own (COCO's AP wants a low score
    threshold; a prediction shown to a person wants a higher one)."""

    score_threshold: float = 0.05
    mask_threshold: float = 0.5
    max_detections: int = 100

    def __post_init__(self) -> None:
        require(self, [
            ("score_threshold", _unit(self.score_threshold), "must be in [0, 1]"),
            ("mask_threshold", _unit(self.mask_threshold), "must be in [0, 1]"),
            ("max_detections", self.max_detections >= 1, "must be >= 1"),
        ])


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CLASS_WEIGHTINGS = ("none", "sqrt_inverse")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
OPTIMIZERS = ("adamw", "sgd")
ENGINES = ("local", "ray")  # where evaluate runs its model: this process, or a Ray Data actor pool


ARCHITECTURES = ("fcn32s", "fcn16s", "fcn8s", "unet", "deeplabv3", "maskformer", "mask_rcnn")
# The default run's per-architecture training (train.overrides): budgets that fit all seven into
# `make pipeline`'s 15 minutes on a 2-core CPU (docs/benchmarks.md has the learning curves behind them).
# Stride-32 ResNet backbones learn faster from larger crops at a lower rate; validating costs a
# short run seconds of its budget, so those keep their last checkpoint and evaluate scores it.
_RESNET = {"image_size": 128, "batch_size": 8, "lr": 1e-3, "val_every": 0}
BUDGETS: dict[str, dict[str, Any]] = {
    # FCN-32s trains on whole 256 px scenes: a 128 px crop gives it a 4 x 4 score grid whose every
    # cell reads the zero padding; evaluation's whole scenes give 8 x 8 (two runs each at 45 s:
    # val mIoU 0.150 against 0.131, 6.5 classes above 0.01 IoU against 5).
    "fcn32s": {"budget_s": 45.0, **_RESNET, "image_size": 256, "batch_size": 4},
    "fcn16s": {"budget_s": 45.0, **_RESNET},
    "fcn8s": {"budget_s": 55.0, **_RESNET},
    "unet": {"budget_s": 140.0, "val_every": 2},
    "deeplabv3": {"budget_s": 40.0, **_RESNET},
    "maskformer": {"budget_s": 50.0, **_RESNET},
    "mask_rcnn": {"budget_s": 125.0, **_RESNET, "lr": 5e-4, "grad_clip": 10.0},
}


# Build kwargs of the default run (train.model): per-pixel models add a soft Dice term to the
# class-weighted cross-entropy, as nnU-Net does.
MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "fcn32s": {"dice_weight": 0.5},
    "fcn16s": {"dice_weight": 0.5},
    "fcn8s": {"dice_weight": 0.5},
    "unet": {"dice_weight": 0.5},
    "deeplabv3": {"dice_weight": 0.5},
    "maskformer": {},
    "mask_rcnn": {},
}


@dataclass(frozen=True)
class TrainParams:
    architectures: list[str] = field(default_factory=lambda: list(ARCHITECTURES))
    epochs: int = 100  # an upper bound when budget_s is set; the reproducible mode when it is 0
    budget_s: float = 50.0  # wall-clock budget of the epoch loop in seconds; 0 = none (epochs decide)
    batch_size: int = 16
    image_size: int = 96  # training crops (evaluation runs on whole images)
    # 0 = Ray Train's local mode: the training function runs in the `segpipe train` process (one
    # machine: seconds less start-up); >= 1 = that many worker actors (a cluster; max_failures restarts)
    workers: int = 0
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # Ray placement group strategy
    use_gpu: bool = False
    # auto: the fastest of the candidate precisions in a short timed trial on this host (cached)
    precision: str = "auto"
    # auto: measured with precision auto, else ModelSpec.channels_last under mixed precision
    channels_last: bool | str = "auto"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    warmup: float = 0.05  # share of the run (of the budget, or of the steps) spent warming up
    grad_clip: float = 0.0  # clip the gradient norm to this; 0 = no clipping
    val_every: int = 1  # validate (and checkpoint) every N epochs and at the end; 0 = never validate
    val_detection: DetectionParams = field(default_factory=DetectionParams)  # instance models' validation
    class_weighting: str = "sqrt_inverse"  # cross-entropy class weights from train pixel counts
    seed: int = 0
    # The generated default data has one ground scale and fixed lighting: random scaling and colour
    # jitter only slow learning there (UNet val mIoU 0.49 with [0.75, 1.25] and 0.2 against 0.56 without,
    # at 120 s). Real site imagery wants them: scale_range [0.75, 1.25], photometric 0.2.
    scale_range: tuple[float, float] = (1.0, 1.0)
    hflip: bool = True
    photometric: float = 0.0  # strength of brightness/contrast/saturation jitter
    num_to_keep: int = 2
    max_failures: int = 1
    storage_path: str = ""  # "" = .ray_results beside the --out folder; may be a URI (s3://, gs://, ...)
    threads: int = 0  # torch intra-op threads per worker; 0 = the node's cores / the workers on it
    cache_shards: bool = True  # keep the encoded train split in Ray's object store across epochs
    backbone_weights: str = ""  # optional local file with backbone weights
    # Fine-tuning: "" (from scratch) | champion | challenger | vN | a checkpoint folder; per
    # architecture in overrides.<arch>.init_from. The architecture must match.
    init_from: str = ""
    registry: str = "models/registry"  # where init_from's aliases and versions are looked up
    finetune_lr_scale: float = 0.3  # with init_from: peak learning rate = lr x this
    finetune_warmup: float = 0.02  # with init_from: warm-up share of the run (instead of warmup)
    model: dict[str, dict[str, Any]] = field(default_factory=lambda: {a: dict(k) for a, k in MODEL_KWARGS.items()})
    overrides: dict[str, dict[str, Any]] = field(default_factory=lambda: {a: dict(o) for a, o in BUDGETS.items()})

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        require(self, [
            ("architectures", bool(self.architectures), "must name at least one architecture"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("budget_s", self.budget_s >= 0, "must be >= 0 seconds (0 = no budget)"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("image_size", self.image_size >= MIN_IMAGE_SIZE, f"must be >= {MIN_IMAGE_SIZE}"),
            ("workers", self.workers >= 0, "must be >= 0 (0 = Ray Train local mode, in this process)"),
            ("cpus_per_worker", self.cpus_per_worker > 0, "must be > 0"),
            ("placement_strategy", self.placement_strategy in PLACEMENT_STRATEGIES,
             f"must be one of {', '.join(PLACEMENT_STRATEGIES)}"),
            ("precision", self.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
            ("channels_last", self.channels_last in (True, False, "auto"), "must be auto, true or false"),
            ("lr", self.lr > 0, "must be > 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
            ("warmup", _fraction(self.warmup), "must be in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 = no clipping)"),
            ("val_every", self.val_every >= 0, "must be >= 0 (0 = no validation while training)"),
            ("class_weighting", self.class_weighting in CLASS_WEIGHTINGS,
             f"must be one of {', '.join(CLASS_WEIGHTINGS)}"),
            ("seed", self.seed >= 0, "must be >= 0"),
            ("scale_range", 0 < lo <= hi, "must be [low, high] with 0 < low <= high"),
            ("photometric", _unit(self.photometric), "must be in [0, 1]"),
            ("num_to_keep", self.num_to_keep >= 1, "must be >= 1"),
            ("max_failures", self.max_failures >= 0, "must be >= 0"),
            ("threads", self.threads >= 0, "must be >= 0 (0 = the worker's CPU share)"),
            ("registry", bool(self.registry), "must name the registry folder"),
            ("finetune_lr_scale", self.finetune_lr_scale > 0, "must be > 0"),
            ("finetune_warmup", _fraction(self.finetune_warmup), "must be in [0, 1)"),
        ])


# Search-space distributions (``tune.space.<arch>.<key>: {NAME: [ARGS]}``) and what their
# arguments must be; segpipe/tune.py turns each into its ray.tune sampler.
DISTRIBUTIONS = {
    "uniform": "[low, high] with low < high",
    "loguniform": "[low, high] with 0 < low < high",
    "quniform": "[low, high, q] with low < high and q > 0",
    "randint": "[low, high] integers with low < high (high excluded)",
    "choice": "[value, ...]: a non-empty list",
}
# Keys of TrainParams a search may not vary: the run-level mappings, and what decides where and
# how a trial runs rather than what it learns.
UNTUNABLE = ("architectures", "overrides", "model", "workers", "cpus_per_worker", "placement_strategy", "use_gpu",
             "storage_path", "registry", "num_to_keep", "max_failures", "init_from", "backbone_weights", "val_every")
# What a search ranks trials by: the train stage's per-epoch validation score (mIoU of a semantic
# model, thing mIoU of an instance model; ``miou`` and ``thing_miou`` name it for one task), or
# the training loss (lower is better).
TUNE_METRICS = {"val_score": "max", "miou": "max", "thing_miou": "max", "train_loss": "min"}

_PIXEL_SPACE = {"weight_decay": {"loguniform": [1.0e-5, 1.0e-3]}, "model.dice_weight": {"uniform": [0.0, 1.0]}}
# The default search per architecture: the learning rate a third to three times the default
# run's, the weight decay, and the Dice share of the per-pixel loss (docs/training.md).
SPACES: dict[str, dict[str, dict[str, Any]]] = {
    "fcn32s": {"lr": {"loguniform": [3.0e-4, 3.0e-3]}, **_PIXEL_SPACE},
    "fcn16s": {"lr": {"loguniform": [3.0e-4, 3.0e-3]}, **_PIXEL_SPACE},
    "fcn8s": {"lr": {"loguniform": [3.0e-4, 3.0e-3]}, **_PIXEL_SPACE},
    "unet": {"lr": {"loguniform": [1.0e-3, 1.0e-2]}, **_PIXEL_SPACE},
    "deeplabv3": {"lr": {"loguniform": [3.0e-4, 3.0e-3]}, **_PIXEL_SPACE},
    "maskformer": {"lr": {"loguniform": [3.0e-4, 3.0e-3]}, "weight_decay": {"loguniform": [1.0e-5, 1.0e-3]}},
    "mask_rcnn": {"lr": {"loguniform": [1.5e-4, 1.5e-3]}, "grad_clip": {"choice": [5.0, 10.0, 20.0]}},
}


def distribution_error(spec: Any) -> str | None:
    """Why ``spec`` (one ``tune.space`` entry) is not a valid distribution; None when it is."""
    if not isinstance(spec, dict) or len(spec) != 1:
        return f"must be one distribution {{NAME: [ARGS]}}; NAME one of {', '.join(DISTRIBUTIONS)}"
    (name, args), = spec.items()
    if name not in DISTRIBUTIONS:
        return f"unknown distribution {name!r}; valid: {', '.join(DISTRIBUTIONS)}"
    rule = f"{name} takes {DISTRIBUTIONS[name]}"
    if not isinstance(args, (list, tuple)) or not args:
        return rule
    if name == "choice":
        return None
    numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if not numbers or len(args) != (3 if name == "quniform" else 2) or not args[0] < args[1]:
        return rule
    if name == "loguniform" and args[0] <= 0:
        return rule
    if name == "quniform" and args[2] <= 0:
        return rule
    if name == "randint" and not all(isinstance(a, int) for a in args):
        return rule
    return None


@dataclass(frozen=True)
class TuneParams:
    """``segpipe tune``: a Ray Tune search over the train stage, trials stopped early by ASHA."""

    # the tune@<arch> DVC stages (dvc.yaml): empty = no search in `dvc repro` (the default pipeline)
    architectures: list[str] = field(default_factory=list)
    trials: int = 8  # configurations sampled (--trials)
    concurrency: int = 0  # trials at once; 0 = as many as the cluster's CPUs (GPUs with use_gpu) fit
    metric: str = "val_score"  # val_score (miou | thing_miou) or train_loss
    budget_s: float = 0.0  # wall-clock seconds of the whole search; 0 = every trial runs (--budget-s)
    grace_epochs: int = 1  # ASHA stops no trial before this many epochs
    reduction_factor: int = 3  # ASHA keeps the best 1 / this at each rung
    seed: int = 0  # sampling of the configurations
    include_current: bool = True  # the first trial runs the params as they are (the others are sampled)
    space: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {a: {k: dict(d) for k, d in s.items()} for a, s in SPACES.items()})

    def __post_init__(self) -> None:
        tunable = sorted(f.name for f in dataclasses.fields(TrainParams) if f.name not in UNTUNABLE)
        require(self, [
            ("architectures", set(self.architectures) <= set(ARCHITECTURES),
             f"must name architectures of {', '.join(ARCHITECTURES)}"),
            ("trials", self.trials >= 1, "must be >= 1"),
            ("concurrency", self.concurrency >= 0, "must be >= 0 (0 = as many as the cluster fits)"),
            ("metric", self.metric in TUNE_METRICS, f"must be one of {', '.join(TUNE_METRICS)}"),
            ("budget_s", self.budget_s >= 0, "must be >= 0 seconds (0 = no limit)"),
            ("grace_epochs", self.grace_epochs >= 1, "must be >= 1"),
            ("reduction_factor", self.reduction_factor >= 2, "must be >= 2"),
            ("seed", self.seed >= 0, "must be >= 0"),
        ])
        for arch, space in self.space.items():
            if arch not in ARCHITECTURES:
                raise RangeError(f"space.{arch}", space, f"unknown architecture; valid: {', '.join(ARCHITECTURES)}")
            for key, spec in space.items():
                if key.startswith("model."):
                    if not key[len("model."):]:
                        raise RangeError(f"space.{arch}.{key}", spec, "names no key of train.model.<arch>")
                elif key not in tunable:
                    why = "cannot be searched" if key in UNTUNABLE else "is no train key"
                    raise RangeError(f"space.{arch}.{key}", spec,
                                     f"{why}; a search varies one of {', '.join(tunable)} or model.<key>")
                error = distribution_error(spec)
                if error:
                    raise RangeError(f"space.{arch}.{key}", spec, error)


@dataclass(frozen=True)
class MaskFormerPanopticParams:
    """Mask2Former's panoptic inference (``segpipe.panoptic.maskformer_panoptic``)."""

    object_mask_threshold: float = 0.8  # a query is kept when its best class probability exceeds this
    overlap_threshold: float = 0.8  # and it wins at least this share of its own mask's pixels

    def __post_init__(self) -> None:
        require(self, [
            ("object_mask_threshold", _unit(self.object_mask_threshold), "must be in [0, 1]"),
            ("overlap_threshold", _unit(self.overlap_threshold), "must be in [0, 1]"),
        ])


@dataclass(frozen=True)
class FusionParams:
    """Panoptic FPN's fusion of a semantic and an instance model (``segpipe.panoptic.fuse_panoptic``):
    the fuse stage, a fused registry bundle, and predict's panoptic output of large images."""

    overlap_threshold: float = 0.5  # an instance keeps at least this share of its mask free of better ones
    # COCO's 4096 px is 1.3% of a 640 x 480 image; on the 64-256 px synthetic scenes it would void
    # most stuff regions. 64 px (an 8 x 8 patch, 2 x 2 cells of the stride-4 mask head) only drops
    # slivers a semantic model leaves along object borders.
    stuff_min_area: int = 64
    score_threshold: float = 0.5  # instances below this score are not fused

    def __post_init__(self) -> None:
        require(self, [
            ("overlap_threshold", _unit(self.overlap_threshold), "must be in [0, 1]"),
            ("stuff_min_area", self.stuff_min_area >= 0, "must be >= 0 pixels"),
            ("score_threshold", _unit(self.score_threshold), "must be in [0, 1]"),
        ])


@dataclass(frozen=True)
class EvaluateParams:
    """How a model is scored. The fuse and baselines stages and promote's re-scoring of the champion
    score with these too, so that every number compared in a promotion is computed alike."""

    split: str = "val"
    batch_size: int = 8
    num_overlays: int = 4
    engine: str = "local"  # local: this process; ray: a Ray Data actor pool (segpipe.inference.map_rows)
    # Boundary IoU's band: d = max(1, round(boundary_ratio x image diagonal)) pixels (Cheng et al. 2021);
    # also Boundary AP's of instance models (tests/test_params.py pins it to segpipe.metrics.boundary's)
    boundary_ratio: float = 0.02
    detection: DetectionParams = field(default_factory=DetectionParams)
    panoptic: MaskFormerPanopticParams = field(default_factory=MaskFormerPanopticParams)

    def __post_init__(self) -> None:
        require(self, [
            ("split", bool(self.split), "must name a split"),
            ("boundary_ratio", 0 < self.boundary_ratio <= 1, "must be in (0, 1]"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("num_overlays", self.num_overlays >= 0, "must be >= 0"),
            ("engine", self.engine in ENGINES, f"must be one of {', '.join(ENGINES)}"),
        ])

    def scoring_key(self) -> str:
        """What decides the numbers (split, detection and panoptic thresholds), not how fast they come
        (batch size, engine, overlays): results with different keys are not compared."""
        import hashlib
        import json

        numbers = {k: v for k, v in as_dict(self).items() if k not in ("batch_size", "engine", "num_overlays")}
        return hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FuseParams:
    """The fuse stage: the best semantic and the best instance model, fused (``fusion``) and scored."""

    fusion: FusionParams = field(default_factory=FusionParams)
    semantic_metric: str = "miou"  # the semantic model fused: the best on this among semantic evals
    instance_metric: str = "segm.AP"  # the instance model fused: the best on this among instance evals

    def __post_init__(self) -> None:
        require(self, [
            ("semantic_metric", bool(self.semantic_metric), "must name a metric"),
            ("instance_metric", bool(self.instance_metric), "must name a metric"),
        ])


@dataclass(frozen=True)
class BaselinesParams:
    """The reference predictors a candidate must beat (``segpipe.stages.baselines``), fitted on the train split."""

    colour_bits: int = 4  # colour lookup: bits kept per RGB channel (4 = 4096 colour bins)

    def __post_init__(self) -> None:
        require(self, [("colour_bits", 1 <= self.colour_bits <= 8, "must be in [1, 8]")])


@dataclass(frozen=True)
class PromoteParams:
    name: str = "segmenter"
    semantic_metric: str = "miou"
    instance_metric: str = "segm.AP"
    mixed_metric: str = "miou_things"  # when semantic and instance models compete
    panoptic_metric: str = "pq"  # ranks panoptic candidates (metrics.json "panoptic" block) on their own aliases
    min_value: float = 0.0
    margin: float = 0.0
    baseline_margin: float = 0.0  # a candidate must beat the best reference predictor by this much
    protected_classes: list[str] = field(default_factory=list)
    protected_tolerance: float = 0.05
    # source collections (data/raw/<name>) on which a candidate may not fall behind the champion by
    # more than protected_collection_tolerance (the ranking metric, same data): a list, or "all"
    protected_collections: list[str] | str = "all"
    protected_collection_tolerance: float = 0.05
    gto_tags: bool = False

    def __post_init__(self) -> None:
        require(self, [
            ("name", bool(self.name), "must be a non-empty name"),
            ("semantic_metric", bool(self.semantic_metric), "must name a metric"),
            ("instance_metric", bool(self.instance_metric), "must name a metric"),
            ("mixed_metric", bool(self.mixed_metric), "must name a metric"),
            ("panoptic_metric", bool(self.panoptic_metric), "must name a metric"),
            ("margin", self.margin >= 0, "must be >= 0"),
            ("baseline_margin", self.baseline_margin >= 0, "must be >= 0"),
            ("protected_tolerance", self.protected_tolerance >= 0, "must be >= 0"),
            ("protected_collections", isinstance(self.protected_collections, list) or self.protected_collections == "all",
             "must be a list of collection names, or all"),
            ("protected_collection_tolerance", self.protected_collection_tolerance >= 0, "must be >= 0"),
        ])


@dataclass(frozen=True)
class PredictParams:
    tile: int = 512
    overlap: int = 64
    batch_size: int = 4
    # a prediction a person looks at keeps only confident detections
    detection: DetectionParams = field(default_factory=lambda: DetectionParams(score_threshold=0.5))
    panoptic: MaskFormerPanopticParams = field(default_factory=MaskFormerPanopticParams)
    fusion: FusionParams = field(default_factory=FusionParams)  # MaskFormer's panoptic output of a large image

    def __post_init__(self) -> None:
        require(self, [
            ("tile", self.tile >= MIN_IMAGE_SIZE, f"must be >= {MIN_IMAGE_SIZE}"),
            ("overlap", 0 <= self.overlap < self.tile, "must be >= 0 and below tile"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
        ])


@dataclass(frozen=True)
class ServeParams:
    """``segpipe serve``: a registered model over HTTP on Ray Serve. What is predicted (tiles,
    thresholds) is the ``predict`` section's, so a served label PNG is the one predict writes;
    these keys say how it is served."""

    replicas: int = 1  # model copies (Ray Serve replicas); --replicas overrides
    cpus_per_replica: float = 1.0  # Ray CPUs each replica holds (a GPU each with --device cuda)
    threads: int = 0  # torch threads per replica; 0 = its CPUs rounded down, at least 1
    max_ongoing_requests: int = 32  # requests a replica takes at once; more wait in the proxy's queue
    max_batch_size: int = 8  # images within one predict.tile that arrive together run as one batch
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill after its first image
    max_image_pixels: int = 100_000_000  # width x height from the header; larger: 413, never decoded
    max_body_bytes: int = 134_217_728  # 128 MiB; a larger request body: 413
    reload_interval_s: float = 10.0  # how often a replica serving an alias reads the registry
    shutdown_timeout_s: float = 5.0  # how long running requests may finish on Ctrl-C / SIGTERM

    def __post_init__(self) -> None:
        require(self, [
            ("replicas", self.replicas >= 1, "must be >= 1"),
            ("cpus_per_replica", self.cpus_per_replica > 0, "must be > 0"),
            ("threads", self.threads >= 0, "must be >= 0 (0 = the replica's CPUs)"),
            ("max_batch_size", self.max_batch_size >= 1, "must be >= 1"),
            ("max_ongoing_requests", self.max_ongoing_requests >= self.max_batch_size,
             f"must be >= max_batch_size ({self.max_batch_size}), or a batch can never fill"),
            ("batch_wait_timeout_s", self.batch_wait_timeout_s >= 0, "must be >= 0 seconds"),
            ("max_image_pixels", self.max_image_pixels >= 1, "must be >= 1"),
            ("max_body_bytes", self.max_body_bytes >= 1, "must be >= 1"),
            ("reload_interval_s", self.reload_interval_s > 0, "must be > 0 seconds"),
            ("shutdown_timeout_s", self.shutdown_timeout_s >= 0, "must be >= 0 seconds"),
        ])


@dataclass(frozen=True)
class RetrainParams:
    cron: str = "0 3 * * 1"
    timezone: str = "UTC"  # IANA name the cron is read in
    deployment: str = "segpipe-retrain"  # Prefect deployment name
    retries: int = 1  # per stage task
    retry_delay_s: float = 10.0
    timeout_s: float = 3600.0  # per attempt of a stage task
    stages: list[str] = field(default_factory=lambda: ["synth", "convert", "train", "evaluate", "baselines", "fuse"])
    promote_stage: str = "promote"  # runs only when every stage above succeeded
    report_stage: str = "evaluate"  # whose DVC metrics fill the artifact's table
    metrics: list[str] = field(default_factory=lambda: ["miou", "miou_things", "mdice", "pixel_acc", "segm.AP"])
    on_ingest: bool = True  # `segpipe schedule` also runs retrain when an ingest flow run completes

    def __post_init__(self) -> None:
        require(self, [
            ("retries", self.retries >= 0, "must be >= 0"),
            ("retry_delay_s", self.retry_delay_s >= 0, "must be >= 0"),
            ("timeout_s", self.timeout_s > 0, "must be > 0 seconds"),
            ("stages", bool(self.stages) and all(self.stages), "must name at least one dvc.yaml stage"),
            ("promote_stage", bool(self.promote_stage) and self.promote_stage not in self.stages,
             "must be a dvc.yaml stage not listed in retrain.stages"),
            ("report_stage", bool(self.report_stage), "must name a dvc.yaml stage"),
            ("metrics", bool(self.metrics) and all(self.metrics), "must list at least one metric key"),
            ("deployment", bool(self.deployment), "must be a non-empty name"),
        ])


ON_DRIFT = ("warn", "reject")


@dataclass(frozen=True)
class IngestParams:
    max_quarantined: int = 0  # a drop with more quarantined items than this is rejected
    push: bool = True  # dvc push the new collection when a DVC remote is configured
    remote: str = ""  # DVC remote to push to; "" = the default remote
    timeout_s: float = 3600.0  # per dvc/git command
    # what a drop does when `segpipe drift` finds it unlike the champion's training data: warn (the
    # report says so and the drop is versioned: a new site is supposed to drift, and retraining is how
    # the model catches up) or reject (the run fails and nothing changes)
    on_drift: str = "warn"

    def __post_init__(self) -> None:
        require(self, [
            ("max_quarantined", self.max_quarantined >= 0, "must be >= 0"),
            ("timeout_s", self.timeout_s > 0, "must be > 0 seconds"),
            ("on_drift", self.on_drift in ON_DRIFT, f"must be one of {', '.join(ON_DRIFT)}"),
        ])


@dataclass(frozen=True)
class WindowParams:
    """How the data-quality commands run a model on an image (``segpipe.inference.iter_probabilities``):
    whole within ``tile`` pixels, else by sliding window of ``tile`` overlapping by ``overlap``,
    ``batch_size`` tiles per forward."""

    tile: int = 512
    overlap: int = 64
    batch_size: int = 4

    def __post_init__(self) -> None:
        require(self, [
            ("tile", self.tile >= MIN_IMAGE_SIZE, f"must be >= {MIN_IMAGE_SIZE}"),
            ("overlap", 0 <= self.overlap < self.tile, "must be >= 0 and below tile"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
        ])


AUDIT_METHODS = ("confident_learning", "self_confidence")  # segpipe.quality.AUDIT_METHODS, pinned equal by a test


@dataclass(frozen=True)
class AuditParams:
    """``segpipe audit``: annotations the model disagrees with (``segpipe.quality.audit_scores``)."""

    # confident_learning: 1 - p(label) / (the mean p(label) of regions of that class), so a class the
    # model is always unsure of does not fill the list; self_confidence: 1 - p(label)
    method: str = "confident_learning"
    # a region is judged by its inside: its mask without `border` pixels along its edge (a model's
    # probabilities blur across object borders; an annotation with fewer than `min_area` pixels inside
    # is judged whole). Annotations of fewer than `min_area` pixels, and label-map regions with fewer
    # inside (slivers between objects), are not scored.
    border: int = 2
    min_area: int = 16
    top: int = 50  # overlays written for the most suspicious (--top)
    window: WindowParams = field(default_factory=WindowParams)

    def __post_init__(self) -> None:
        require(self, [
            ("method", self.method in AUDIT_METHODS, f"must be one of {', '.join(AUDIT_METHODS)}"),
            ("border", self.border >= 0, "must be >= 0 pixels"),
            ("min_area", self.min_area >= 1, "must be >= 1 pixel"),
            ("top", self.top >= 0, "must be >= 0"),
        ])


SELECT_STRATEGIES = ("diverse", "entropy", "margin")  # segpipe.quality.STRATEGIES, pinned equal by a test


@dataclass(frozen=True)
class SelectParams:
    """``segpipe select``: unlabelled frames worth labelling (``segpipe.quality.select_frames``)."""

    strategy: str = "diverse"  # entropy | margin | diverse (uncertainty-weighted k-center on embeddings)
    # diverse: frames closer than near x the pool's median distance between frames count as
    # near-duplicates (the closer, the less a second pick is worth); farther apart, uncertainty decides
    near: float = 0.5
    report_top: int = 10  # frames of a drop the ingest report lists (with a champion)
    window: WindowParams = field(default_factory=WindowParams)

    def __post_init__(self) -> None:
        require(self, [
            ("strategy", self.strategy in SELECT_STRATEGIES, f"must be one of {', '.join(SELECT_STRATEGIES)}"),
            ("near", self.near > 0, "must be > 0"),
            ("report_top", self.report_top >= 0, "must be >= 0"),
        ])


@dataclass(frozen=True)
class DriftThresholds:
    """Per feature, the value above which it has drifted: a KS statistic (0..1) for per-image
    features, a PSI for pooled histograms (see ``segpipe drift``)."""

    width: float = 0.5  # ks
    height: float = 0.5  # ks
    brightness: float = 0.3  # ks of per-image mean luma
    red: float = 0.25  # psi of pooled pixel values
    green: float = 0.25  # psi
    blue: float = 0.25  # psi
    class_shares: float = 0.25  # psi of pooled class pixels (labelled drops)
    instances_per_image: float = 0.3  # ks (labelled drops)
    confidence: float = 0.3  # ks of the champion's per-image mean top-1 probability

    def __post_init__(self) -> None:
        require(self, [(f.name, getattr(self, f.name) > 0, "must be > 0") for f in dataclasses.fields(self)])


@dataclass(frozen=True)
class DriftParams:
    """``segpipe drift``: a drop against the shards the champion was trained on."""

    split: str = "train"  # the reference shards' split
    max_images: int = 500  # per side, evenly spaced: the cost stays bounded on large sets
    bins: int = 16  # per colour channel
    alpha: float = 0.01  # a KS feature drifts only when its p-value is below this too
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)
    window: WindowParams = field(default_factory=WindowParams)

    def __post_init__(self) -> None:
        require(self, [
            ("split", bool(self.split), "must name a split of the reference shards"),
            ("max_images", self.max_images >= 2, "must be >= 2"),
            ("bins", 2 <= self.bins <= 256, "must be in [2, 256]"),
            ("alpha", 0 < self.alpha <= 1, "must be in (0, 1]"),
        ])


SECTIONS: dict[str, type] = {
    "synth": SynthParams,
    "convert": ConvertParams,
    "train": TrainParams,
    "tune": TuneParams,
    "evaluate": EvaluateParams,
    "fuse": FuseParams,
    "baselines": BaselinesParams,
    "promote": PromoteParams,
    "predict": PredictParams,
    "serve": ServeParams,
    "retrain": RetrainParams,
    "ingest": IngestParams,
    "audit": AuditParams,
    "select": SelectParams,
    "drift": DriftParams,
}


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form.

    ints are accepted for floats; YAML lists become tuples for tuple fields. Anything else
    that does not match raises ParamsError naming ``where``.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for a in args:
            try:
                return coerce(value, a, where)
            except ParamsError:
                continue
        raise ParamsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ParamsError(f"{where}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ParamsError(f"{where}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ParamsError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ParamsError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ParamsError(f"{where}: expected a string, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ParamsError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):  # a nested section, e.g. evaluate.panoptic
        if isinstance(value, tp):
            return value
        return build(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {coerce(k, kt, f"{where}"): coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    raise ParamsError(f"{where}: unsupported annotation {tp!r}")  # a bug in a dataclass, not user input


def build(cls: type[T], data: dict[str, Any] | None, where: str) -> T:
    """Build the frozen dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(names)}")
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except RangeError as e:
        raise ParamsError(f"{where}.{e}") from None


# Keys of TrainParams that only make sense for the whole run, not per architecture.
RUN_LEVEL_KEYS = ("architectures", "overrides", "model")


def arch_train_params(params: TrainParams, arch: str) -> TrainParams:
    """Apply ``train.overrides.<arch>`` on top of the section, validated like the file."""
    over = dict(params.overrides.get(arch) or {})
    bad = [k for k in over if k in RUN_LEVEL_KEYS]
    if bad:
        raise ParamsError(f"train.overrides.{arch}: {bad} cannot be overridden per architecture")
    return build(TrainParams, {**as_dict(params), **over}, f"train.overrides.{arch}")


def check_model_keys(arch: str, kwargs: dict[str, Any], defaults: dict[str, Any]) -> None:
    """``train.model.<arch>`` names only build kwargs of the architecture (``defaults``: its builder's)."""
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ParamsError(f"train.model.{arch}: unknown key(s) {unknown}; valid: {sorted(defaults)}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.overrides.unet.epochs=3"`` -> (["train", "overrides", "unet", "epochs"], 3)."""
    if "=" not in text:
        raise ParamsError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ParamsError(f"--set {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ParamsError(f"--set {text!r}: value is not valid YAML: {e}") from None
    return parts, value


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return data


def load_section(
    section: str, path: Path | str = "params.yaml", overrides: list[str] | tuple[str, ...] = ()
) -> Any:
    """Load one section of a params file into its dataclass, applying ``--set`` overrides.

    Only overrides for this section are applied; overrides of an unknown section are errors.
    """
    if section not in SECTIONS:
        raise ParamsError(f"unknown params section {section!r}; valid: {', '.join(SECTIONS)}")
    path = Path(path)
    raw = read_yaml(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{path}: unknown section(s) {', '.join(map(repr, unknown))}; valid: {', '.join(SECTIONS)}")
    check_section_shapes(raw, path)
    data = apply_overrides(dict(raw.get(section) or {}), section, overrides)
    where = f"{path}: {section}" if not overrides else f"{path} (with --set): {section}"
    return build(SECTIONS[section], data, where)


def check_section_shapes(raw: dict[str, Any], path: Path | str) -> None:
    """Every section present must be a mapping of keys (``train: 5`` is not); ParamsError naming
    the file and the section otherwise."""
    for name, value in raw.items():
        if value is not None and not isinstance(value, dict):
            raise ParamsError(f"{path}: section {name!r} is {value!r}; it must be a mapping of keys "
                              f"(e.g. '{name}:' followed by indented 'key: value' lines)")


def apply_overrides(data: dict[str, Any], section: str, overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply the ``--set`` overrides that target ``section`` to its raw mapping.

    Every override is parsed (so a malformed one fails even when it targets another section);
    an override of an unknown section is an error.
    """
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] not in SECTIONS:
            raise ParamsError(f"--set {text!r}: unknown section {parts[0]!r}; valid: {', '.join(SECTIONS)}")
        if parts[0] != section:
            continue
        target = data
        for p in parts[1:-1]:
            nxt = target.get(p)
            nxt = dict(nxt) if isinstance(nxt, dict) else {}
            target[p] = nxt
            target = nxt
        target[parts[-1]] = value
    return data


def check_all(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Validate every section; returns {section: dataclass}."""
    return {s: load_section(s, path, overrides) for s in SECTIONS}


def as_dict(params: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a params dataclass (tuples become lists)."""
    return _jsonable(dataclasses.asdict(params))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def add_params_arguments(parser: Any) -> None:
    """``--params FILE`` and repeatable ``--set section.key=value`` on an argparse parser."""
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a param (YAML value), validated like the file; repeatable",
    )


def from_args(args: Any, section: str) -> Any:
    """The dataclass of ``section`` from parsed ``--params``/``--set`` arguments.

    A missing params file is fine when it is the default name: the dataclass defaults apply.
    """
    path = Path(args.params)
    if not path.exists() and args.params == "params.yaml":
        data = apply_overrides({}, section, args.overrides)
        return build(SECTIONS[section], data, f"(defaults, with --set): {section}")
    return load_section(section, path, args.overrides)
