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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segpipe.errors import UserError
from segpipe.files import atomic_dir, atomic_write_json, sha256_bytes, sha256_file

FORMAT = "segpipe-checkpoint/1"
WEIGHTS = "model.safetensors"
META = "meta.json"
STATE = "train_state.safetensors"
STATE_META = "train_state.json"
CHECKPOINT_FILES = (WEIGHTS, META)  # what serving a model needs (the registry copies these)
TRAINING_FILES = (WEIGHTS, META, STATE, STATE_META)  # what resuming a run needs

if TYPE_CHECKING:
    import torch

# torch and safetensors' torch half are imported where tensors are read or written, not here:
# reading a checkpoint's meta (the registry, promote) does not need torch, whose import
# costs seconds.


class CheckpointError(UserError, ValueError):
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
    import torch

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


@dataclass(frozen=True)
class CheckpointMeta:
    """``meta.json`` of a checkpoint, typed: read once by :func:`load_meta` and passed on.

    ``arch``, ``num_classes`` and ``classes`` are required; every other field has its one default
    here. ``task`` defaults to the registry's task of ``arch`` and ``thing_ids`` to the classes
    marked ``isthing``. Keys this version does not know are kept in ``extra`` and written back, so a
    checkpoint read and saved again loses nothing.
    """

    arch: str
    num_classes: int
    classes: tuple[dict[str, Any], ...]
    task: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    ignore_index: int = 255
    thing_ids: tuple[int, ...] | None = None
    image_size: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    shards_manifest_sha256: str | None = None
    needs_instances: bool | None = None
    epoch: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    history: tuple[dict[str, Any], ...] = ()
    restarts: tuple[dict[str, Any], ...] = ()
    run: dict[str, Any] = field(default_factory=dict)
    precision: str | None = None
    worker_nodes: tuple[str, ...] = ()
    attempt: str | None = None  # the training process that wrote it (resuming tells a worker failure from a rerun)
    # the model it was fine-tuned from (train.init_from): {"ref", "version", "sha256", "arch", "registry"}; None = from scratch
    parent: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.task:
            from segpipe.models import task_of

            try:
                object.__setattr__(self, "task", task_of(self.arch))
            except ValueError as e:
                raise CheckpointError(f"arch: {e}") from None
        if self.thing_ids is None:
            object.__setattr__(self, "thing_ids", tuple(sorted(int(c["id"]) for c in self.classes if c.get("isthing"))))

    @classmethod
    def from_json(cls, data: Any, where: str = META) -> CheckpointMeta:
        """Check the types of a parsed ``meta.json`` (``format`` is dropped); CheckpointError names
        ``where`` and the key at fault."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: expected a JSON object, got {type(data).__name__}")
        for key in ("arch", "num_classes", "classes"):
            if key not in data:
                raise CheckpointError(f"{where}: missing key {key!r}")
        values: dict[str, Any] = {}
        for key, kind in _KINDS.items():
            if key not in data or (data[key] is None and key in _OPTIONAL):
                continue
            value = data[key]
            if not _is_kind(value, kind):
                raise CheckpointError(f"{where}: key {key!r} is {value!r:.80}, expected {_KIND_NAMES[kind]}")
            values[key] = tuple(value) if kind is list else value
        for i, c in enumerate(values["classes"]):
            if not (isinstance(c, dict) and _is_kind(c.get("id"), int) and isinstance(c.get("name"), str)):
                raise CheckpointError(f"{where}: classes[{i}] needs an integer 'id' and a string 'name'")
        if values["num_classes"] < 1:
            raise CheckpointError(f"{where}: key 'num_classes' is {values['num_classes']}, expected >= 1")
        extra = {k: v for k, v in data.items() if k not in _KINDS and k != "format"}
        try:
            return cls(**values, extra=extra)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None

    def to_json(self) -> dict[str, Any]:
        """The ``meta.json`` object (``format`` first, then every field, then the extra keys)."""
        out: dict[str, Any] = {"format": FORMAT}
        for f in fields(self):
            if f.name != "extra":
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return {**out, **self.extra}


# The JSON type of each field (tuples are JSON lists), and the fields that may be null.
_KINDS: dict[str, type] = {
    "arch": str, "num_classes": int, "classes": list, "task": str, "model_kwargs": dict, "ignore_index": int,
    "thing_ids": list, "image_size": int, "params": dict, "shards_manifest_sha256": str, "needs_instances": bool,
    "epoch": int, "metrics": dict, "history": list, "restarts": list, "run": dict, "precision": str,
    "worker_nodes": list, "attempt": str, "parent": dict,
}
_OPTIONAL = frozenset({"thing_ids", "image_size", "shards_manifest_sha256", "needs_instances", "epoch", "precision",
                       "attempt", "parent"})
_KIND_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object", bool: "true or false"}


def _is_kind(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def save_checkpoint(
    directory: Path | str,
    model: torch.nn.Module,
    meta: CheckpointMeta | dict[str, Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
) -> Path:
    """Write a checkpoint directory atomically (the whole directory appears at once).

    ``meta`` is a CheckpointMeta, or the plain dict a training worker builds (written as given,
    with ``format``; :func:`load_meta` checks it when it is read).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    meta = meta.to_json() if isinstance(meta, CheckpointMeta) else {"format": FORMAT, **meta}
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


def write_meta(directory: Path | str, meta: CheckpointMeta) -> None:
    """Replace the ``meta.json`` of an existing checkpoint directory (atomically)."""
    atomic_write_json(Path(directory) / META, meta.to_json())


def load_meta(directory: Path | str) -> CheckpointMeta:
    """The checkpoint's ``meta.json``, checked: CheckpointError names the file and the key at fault."""
    directory = Path(directory)
    if not is_checkpoint(directory):
        raise CheckpointError(f"{directory}: not a segpipe checkpoint (needs {WEIGHTS} and {META})")
    path = directory / META
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise CheckpointError(f"{path}: format {found!r}, expected {FORMAT!r}")
    return CheckpointMeta.from_json(data, str(path))


def class_table_difference(expected: list[dict[str, Any]], found: list[dict[str, Any]]) -> str | None:
    """None when the class tables agree on ids and names, else a sentence describing the first difference."""
    a = {int(c["id"]): c["name"] for c in expected}
    b = {int(c["id"]): c["name"] for c in found}
    if a == b:
        return None
    renamed = [f"{i}: {a[i]!r} vs {b[i]!r}" for i in sorted(set(a) & set(b)) if a[i] != b[i]]
    differences = (("ids only in the data", sorted(set(a) - set(b))),
                   ("ids only in the checkpoint", sorted(set(b) - set(a))))
    parts = [f"{what}: {ids}" for what, ids in differences if ids]
    return "; ".join(parts + ["different names: " + ", ".join(renamed[:5])] * bool(renamed))


def check_classes(directory: Path | str, meta: CheckpointMeta, classes: list[dict[str, Any]]) -> None:
    """Refuse a checkpoint whose class table differs from the data's."""
    diff = class_table_difference(classes, list(meta.classes))
    if diff:
        raise CheckpointError(f"{directory}: the checkpoint's class table differs from the data's ({diff})")


def build_from_meta(meta: CheckpointMeta) -> torch.nn.Module:
    from segpipe.models import build_model

    return build_model(meta.arch, meta.num_classes, **meta.model_kwargs)


def load_model(
    directory: Path | str,
    map_location: str | torch.device = "cpu",
    classes: list[dict[str, Any]] | None = None,
) -> tuple[torch.nn.Module, CheckpointMeta]:
    """Build the architecture named in ``meta.json`` and load its safetensors weights (eval mode).

    With ``classes``, a checkpoint trained on a different class table is refused.
    """
    directory = Path(directory)
    meta = load_meta(directory)
    if classes is not None:
        check_classes(directory, meta, classes)
    model = build_from_meta(meta)
    state = load_weights(directory, map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / WEIGHTS}: weights do not fit {meta.arch!r} "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.to(map_location).eval()
    return model, meta


def load_weights(directory: Path | str, map_location: str | torch.device = "cpu",
                 expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint's weights file (safetensors: nothing is unpickled).

    With ``expected_sha256`` the file is read once, hashed, and parsed only when the hash matches
    (CheckpointError otherwise): what is verified is what is loaded.
    """
    from safetensors.torch import load, load_file

    path = Path(directory) / WEIGHTS
    if expected_sha256 is None:
        return load_file(str(path), device=str(map_location))
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if actual != expected_sha256:
        raise CheckpointError(f"{path}: sha256 {actual} does not match the expected {expected_sha256}; refusing to load")
    return {k: v.to(map_location) for k, v in load(data).items()}


def is_complete(directory: Path | str) -> bool:
    """Whether ``directory`` holds a whole training checkpoint: every file of TRAINING_FILES,
    none empty, and a meta that is a JSON object (a write cut short by a full disk or a kill fails)."""
    d = Path(directory)
    try:
        return all((d / f).is_file() and (d / f).stat().st_size > 0 for f in TRAINING_FILES) and \
            isinstance(json.loads((d / META).read_text()), dict)
    except (OSError, ValueError):
        return False


def load_train_state(
    directory: Path | str,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    scaler: Any | None = None,
) -> int:
    """Restore optimizer/scheduler/scaler state saved with the checkpoint; returns its epoch."""
    from safetensors.torch import load_file

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
