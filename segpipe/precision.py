"""Training precision and memory format, chosen by measuring on the host at hand.

A CPU flag says what is possible, not what is fast: bf16 autocast with ``channels_last`` trains
UNet 1.7x faster than fp32 on one AVX512-BF16 host and 0.66x as fast on another. So
``train.precision: auto`` (and ``train.channels_last: auto``) times a few training steps of every
candidate setting on a synthetic batch of the run's architecture, crop and batch size, and takes
the fastest (``pick_fastest``). The choice is cached per host in ``~/.cache/segpipe/precision.json``
(``$XDG_CACHE_HOME``), keyed by everything that changes the answer (``trial_key``), so it is
measured once. The timing itself is the train stage's (``segpipe.stages.train.time_settings``):
it runs the stage's own training step.

    settings = candidates("auto", "auto", "cpu", cpu_bf16=True, cuda_bf16=False, spec_channels_last=True)
    choice = pick_fastest({s: rate for s, rate in zip(settings, measured)})
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segpipe.params import ParamsError

FORMAT = "segpipe-precision-cache/1"
# A setting must be this much faster than a simpler one to be chosen over it: a trial of a few
# steps on a shared host is noisy, and fp32 in the default layout is the safer of two equals.
MARGIN = 0.05


@dataclass(frozen=True)
class Setting:
    """One way to run the training step: autocast ``precision`` (fp32 = none) and the memory format."""

    precision: str
    channels_last: bool

    @property
    def name(self) -> str:
        return self.precision + ("+channels_last" if self.channels_last else "")

    @classmethod
    def parse(cls, name: str) -> Setting:
        precision, _, layout = name.partition("+")
        if precision not in ("fp32", "bf16", "fp16") or layout not in ("", "channels_last"):
            raise ValueError(f"not a precision setting: {name!r}")
        return cls(precision, layout == "channels_last")


def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX), as oneDNN reports it: what is
    possible, not what is fast."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(requested: str, device_type: str, cpu_bf16: bool) -> None:
    """Refuse an explicit ``train.precision`` the device cannot honour, naming the key."""
    if requested == "fp16" and device_type != "cuda":
        raise ParamsError("train.precision = 'fp16' needs a CUDA device (use bf16, fp32 or auto on CPU)")
    if requested == "bf16" and device_type == "cpu" and not cpu_bf16:
        raise ParamsError("train.precision = 'bf16': this CPU has no native bf16 (AVX512-BF16/AMX); use fp32 or auto")


def candidates(precision: str, channels_last: bool | str, device_type: str, cpu_bf16: bool, cuda_bf16: bool,
               spec_channels_last: bool) -> list[Setting]:
    """The settings a run may use, simplest first (fp32 before bf16 before fp16, the default layout
    before ``channels_last``); more than one means a trial decides.

    ``precision: auto`` tries fp32 and every mixed precision the device runs (bf16 on a CPU with
    native bf16; fp16, and bf16 where supported, on CUDA); an explicit precision is obeyed (and
    checked: ``check_precision``). ``channels_last: auto`` tries both layouts when the precision
    is measured too; with an explicit precision it is ``spec_channels_last`` (the architecture's
    ``ModelSpec.channels_last``) under mixed precision, as before the trial existed.
    """
    if precision == "auto":
        precisions = ["fp32", "fp16", *(["bf16"] if cuda_bf16 else [])] if device_type == "cuda" \
            else ["fp32", *(["bf16"] if cpu_bf16 else [])]
    else:
        check_precision(precision, device_type, cpu_bf16)
        precisions = [precision]
    if isinstance(channels_last, bool):
        layouts = [channels_last]
    elif precision == "auto":
        layouts = [False, True]
    else:
        layouts = [spec_channels_last and precision != "fp32"]
    return [Setting(p, cl) for p in precisions for cl in layouts]


def pick_fastest(rates: Mapping[Setting, float], margin: float = MARGIN) -> Setting:
    """The simplest setting (first in ``rates``' order) within ``margin`` of the fastest rate."""
    if not rates:
        raise ValueError("no measured setting to choose from")
    fastest = max(rates.values())
    return next(s for s, r in rates.items() if r >= fastest / (1.0 + margin))


# ----------------------------------------------------------------------------- the per-host cache


def cache_path() -> Path:
    """``$XDG_CACHE_HOME/segpipe/precision.json`` (default ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "segpipe" / "precision.json"


def host_description(device: Any) -> str:
    """What the answer depends on besides the model: the GPU's name, or the CPU model and its flags."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:  # not Linux
        import platform

        model = platform.processor() or platform.machine()
    return f"cpu: {model}; flags sha256 {hashlib.sha256(flags.encode()).hexdigest()[:16]}"


# Build arguments that are facts of the data, not of the network's shape (the class weights come
# from the train split's pixel counts): a new data version does not call for a new trial.
DATA_KWARGS = ("class_weights",)


def trial_key(arch: str, num_classes: int, model_kwargs: Mapping[str, Any], image_size: int, batch_size: int,
              threads: int, candidates: Sequence[Setting], host: str, torch_version: str) -> str:
    """What a cached choice is valid for: the model (architecture, classes, build arguments but
    DATA_KWARGS), the crop and batch, the threads, the candidates tried, the host (CPU model and
    flags, or GPU) and the torch version."""
    kwargs = {k: v for k, v in model_kwargs.items() if k not in DATA_KWARGS}
    blob = json.dumps({"arch": arch, "num_classes": num_classes, "model_kwargs": kwargs, "image_size": image_size,
                       "batch_size": batch_size, "threads": threads, "candidates": [s.name for s in candidates],
                       "host": host, "torch": torch_version}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def read_cached(path: Path, key: str) -> dict[str, Any] | None:
    """The cached trial of ``key``, or None (also for an unreadable or foreign cache file: then it is measured again)."""
    try:
        data = json.loads(path.read_text())
        entry = data["entries"][key] if data.get("format") == FORMAT else None
        if entry is not None:
            Setting.parse(entry["choice"])
        return entry
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_cached(path: Path, key: str, entry: Mapping[str, Any]) -> None:
    """Add ``entry`` under ``key`` (read-modify-write under a file lock; the file replaced atomically)."""
    from filelock import FileLock

    from segpipe.files import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=30):
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError
        except (OSError, ValueError, AttributeError):
            data = {"format": FORMAT, "entries": {}}
        data["entries"][key] = {**entry, "measured": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        atomic_write_json(path, data)


def autocast(precision: str, device_type: str) -> Any:
    """The autocast context of ``precision`` (a no-op for fp32)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device_type, dtype=dtype or torch.float32, enabled=dtype is not None)
