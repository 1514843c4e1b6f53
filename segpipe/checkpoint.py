"""Checkpoints: one directory, safetensors weights plus JSON metadata; nothing is unpickled.

Layout::

    model.safetensors        weights (state dict of the unwrapped model)
    meta.json                architecture, task, build kwargs, classes, params, data hash, epoch, metrics
    train_state.safetensors  optimizer tensors (only when saved for resuming)
    train_state.json         optimizer param groups and scalar state, scheduler, scaler, epoch

Every command's ``--model`` accepts such a directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from segpipe.files import atomic_dir, atomic_write_json, sha256_file

FORMAT = "segpipe-checkpoint/1"
WEIGHTS = "model.safetensors"
META = "meta.json"
STATE = "train_state.safetensors"
STATE_META = "train_state.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, malformed, or does not fit what it is loaded for."""


def is_checkpoint(path: Path | str) -> bool:
    p = Path(path)
    return (p / WEIGHTS).is_file() and (p / META).is_file()


def weights_sha256(directory: Path | str) -> str:
    return sha256_file(Path(directory) / WEIGHTS)


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Unwrap DDP; copy so tied/shared tensors are stored independently (safetensors refuses aliasing).
    model = getattr(model, "module", model)
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors inside a nested state dict by ``{"__tensor__": key}``, collecting them."""
    if isinstance(obj, torch.Tensor):
        key = prefix.strip(".")
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, f"{prefix}{k}.", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{prefix}{i}.", tensors) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def _int_keys(state: dict[str, Any]) -> dict[Any, Any]:
    # Optimizer state is keyed by parameter index; JSON made the keys strings.
    return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in state.items()}


def save_checkpoint(
    directory: Path | str,
    model: torch.nn.Module,
    meta: dict[str, Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
) -> Path:
    """Write a checkpoint directory atomically (the whole directory appears at once)."""
    directory = Path(directory)
    meta = {"format": FORMAT, **meta}
    with atomic_dir(directory) as tmp:
        save_file(_state_dict(model), str(tmp / WEIGHTS), metadata={"format": FORMAT})
        atomic_write_json(tmp / META, meta)
        if optimizer is not None:
            tensors: dict[str, torch.Tensor] = {}
            state = {
                "optimizer": _split_tensors(optimizer.state_dict(), "optimizer.", tensors),
                "scheduler": _split_tensors(scheduler.state_dict(), "scheduler.", tensors) if scheduler else None,
                "scaler": _split_tensors(scaler.state_dict(), "scaler.", tensors) if scaler else None,
                "epoch": meta.get("epoch"),
            }
            save_file(tensors, str(tmp / STATE))
            atomic_write_json(tmp / STATE_META, state)
    return directory


def load_meta(directory: Path | str) -> dict[str, Any]:
    directory = Path(directory)
    if not is_checkpoint(directory):
        raise CheckpointError(f"{directory}: not a segpipe checkpoint (needs {WEIGHTS} and {META})")
    try:
        meta = json.loads((directory / META).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{directory / META}: not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / META}: format {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("arch", "num_classes", "classes"):
        if key not in meta:
            raise CheckpointError(f"{directory / META}: missing key {key!r}")
    return meta


def class_table_difference(expected: list[dict[str, Any]], found: list[dict[str, Any]]) -> str | None:
    """None when the class tables agree on ids and names, else a sentence describing the first difference."""
    a = {int(c["id"]): c["name"] for c in expected}
    b = {int(c["id"]): c["name"] for c in found}
    if a == b:
        return None
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    renamed = sorted(i for i in set(a) & set(b) if a[i] != b[i])
    parts = []
    if only_a:
        parts.append(f"ids only in the data: {only_a}")
    if only_b:
        parts.append(f"ids only in the checkpoint: {only_b}")
    if renamed:
        parts.append("different names: " + ", ".join(f"{i}: {a[i]!r} vs {b[i]!r}" for i in renamed[:5]))
    return "; ".join(parts)


def check_classes(directory: Path | str, meta: dict[str, Any], classes: list[dict[str, Any]]) -> None:
    """Refuse a checkpoint whose class table differs from the data's."""
    diff = class_table_difference(classes, meta["classes"])
    if diff:
        raise CheckpointError(f"{directory}: the checkpoint's class table differs from the data's ({diff})")


def build_from_meta(meta: dict[str, Any]) -> torch.nn.Module:
    from segpipe.models import build_model

    return build_model(meta["arch"], meta["num_classes"], **meta.get("model_kwargs", {}))


def load_model(
    directory: Path | str,
    map_location: str | torch.device = "cpu",
    classes: list[dict[str, Any]] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the architecture named in ``meta.json`` and load its safetensors weights (eval mode).

    With ``classes``, a checkpoint trained on a different class table is refused.
    """
    directory = Path(directory)
    meta = load_meta(directory)
    if classes is not None:
        check_classes(directory, meta, classes)
    model = build_from_meta(meta)
    state = load_file(str(directory / WEIGHTS), device=str(map_location))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / WEIGHTS}: weights do not fit {meta['arch']!r} "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.to(map_location).eval()
    return model, meta


def load_train_state(
    directory: Path | str,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    scaler: Any | None = None,
) -> int:
    """Restore optimizer/scheduler/scaler state saved with the checkpoint; returns its epoch."""
    directory = Path(directory)
    if not (directory / STATE_META).is_file():
        raise CheckpointError(f"{directory}: no {STATE_META}; this checkpoint cannot resume training")
    tensors = load_file(str(directory / STATE)) if (directory / STATE).is_file() else {}
    state = _join_tensors(json.loads((directory / STATE_META).read_text()), tensors)
    opt = state["optimizer"]
    opt["state"] = _int_keys(opt["state"])
    optimizer.load_state_dict(opt)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return int(state.get("epoch") or 0)
