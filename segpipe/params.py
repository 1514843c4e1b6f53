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

T = TypeVar("T")


class ParamsError(ValueError):
    """A params file or override is invalid; the message names the key and the file."""


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthParams:
    images: int = 160
    size: tuple[int, int] = (256, 256)
    seed: int = 0
    workers: int = 2  # processes; 0 = all cores
    jpeg_quality: int = 92
    rle_fraction: float = 0.15  # share of instances written as RLE (half compressed, half list)
    crowd_fraction: float = 0.04  # share of images with an iscrowd region
    ignore_band: int = 1  # pixels of 255 on some object borders; 0 disables


@dataclass(frozen=True)
class ConvertParams:
    val_fraction: float = 0.15
    test_fraction: float = 0.0
    rows_per_shard: int = 256
    workers: int = 2
    max_image_pixels: int = 200_000_000  # larger images are quarantined as decompression bombs
    tile_size: int = 0  # 0 = no tiling; otherwise tile images larger than this
    tile_overlap: int = 64
    tile_min_area: int = 16  # instances clipped below this many pixels are dropped
    strict: bool = False


@dataclass(frozen=True)
class TrainParams:
    architectures: list[str] = field(
        default_factory=lambda: ["fcn32s", "fcn16s", "fcn8s", "unet", "deeplabv3", "maskformer", "mask_rcnn"]
    )
    epochs: int = 2
    batch_size: int = 8
    image_size: int = 128
    workers: int = 1
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # Ray placement group strategy: PACK, SPREAD, STRICT_SPREAD
    use_gpu: bool = False
    mixed_precision: bool = True  # only on GPU
    lr: float = 3e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    warmup_epochs: int = 0
    seed: int = 0
    scale_range: tuple[float, float] = (0.75, 1.25)
    hflip: bool = True
    photometric: float = 0.2  # strength of brightness/contrast/saturation jitter
    num_to_keep: int = 2
    max_failures: int = 1
    storage_path: str = ""  # "" = <out>/ray_results; may be a URI (s3://, gs://, ...)
    threads: int = 0  # torch intra-op threads per worker; 0 = Ray's default
    cache_shards: bool = True  # keep the encoded train split in Ray's object store across epochs
    fail_at_epoch: int = -1  # testing aid: raise once at this epoch to exercise resume
    backbone_weights: str = ""  # optional local file with backbone weights
    model: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-arch build kwargs
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-arch train overrides


@dataclass(frozen=True)
class EvaluateParams:
    split: str = "val"
    batch_size: int = 8
    num_overlays: int = 4
    score_threshold: float = 0.05  # detections below are dropped
    mask_threshold: float = 0.5
    max_detections: int = 100


@dataclass(frozen=True)
class PromoteParams:
    name: str = "segmenter"
    semantic_metric: str = "miou"
    instance_metric: str = "segm.AP"
    mixed_metric: str = "miou_things"  # when semantic and instance models compete
    min_value: float = 0.0
    margin: float = 0.0
    protected_classes: list[str] = field(default_factory=list)
    protected_tolerance: float = 0.05
    gto_tags: bool = False


@dataclass(frozen=True)
class PredictParams:
    tile: int = 512
    overlap: int = 64
    batch_size: int = 4
    score_threshold: float = 0.5


@dataclass(frozen=True)
class RetrainParams:
    cron: str = "0 3 * * 1"
    timezone: str = "UTC"  # IANA name the cron is read in
    deployment: str = "segpipe-retrain"  # Prefect deployment name
    retries: int = 1  # per stage task
    retry_delay_s: float = 10.0
    timeout_s: float = 3600.0  # per attempt of a stage task
    stages: list[str] = field(default_factory=lambda: ["synth", "convert", "train", "evaluate"])
    promote_stage: str = "promote"  # runs only when every stage above succeeded
    report_stage: str = "evaluate"  # whose DVC metrics fill the artifact's table
    metrics: list[str] = field(default_factory=lambda: ["miou", "mdice", "pixel_acc", "segm.AP"])


@dataclass(frozen=True)
class IngestParams:
    max_quarantined: int = 0  # a drop with more quarantined items than this is rejected
    push: bool = True  # dvc push the new collection when a DVC remote is configured
    remote: str = ""  # DVC remote to push to; "" = the default remote
    timeout_s: float = 3600.0  # per dvc/git command


SECTIONS: dict[str, type] = {
    "synth": SynthParams,
    "convert": ConvertParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "promote": PromoteParams,
    "predict": PredictParams,
    "retrain": RetrainParams,
    "ingest": IngestParams,
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
    return cls(**kwargs)


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
    data = apply_overrides(dict(raw.get(section) or {}), section, overrides)
    where = f"{path}: {section}" if not overrides else f"{path} (with --set): {section}"
    return build(SECTIONS[section], data, where)


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
