"""Fine-tuning across class tables: a parent checkpoint's weights for a model with other classes.

Classes are matched by name. A kept class's output rows are the parent's rows at the parent's
id for that name, moved to the new id; new classes keep the new model's fresh initialisation;
classes that are gone are dropped. Which tensors have output rows, along which dimensions and
in which layout, is declared per architecture (``ModelSpec.class_rows``), never guessed from
shapes; every other tensor must have the same shape in both models and is copied as it is.

    state, report = adapt_state_dict("unet", parent.state_dict(), parent_classes,
                                     model.state_dict(), target_classes)
    model.load_state_dict(state, strict=True)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from segpipe.errors import UserError


class TransferError(UserError, ValueError):
    """A parent state that cannot initialise the target model; the message names the key at fault."""


@dataclass(frozen=True)
class ClassRows:
    """The state-dict tensors whose ``dims`` are indexed by class (output rows).

    ``pattern`` is a regular expression that must match a whole state key. Along each of
    ``dims`` a tensor has ``lead`` rows before the classes (torchvision's background), then
    ``block`` rows per class id (4 box deltas per class), then ``trail`` rows after them
    (MaskFormer's "no object"): ``lead + num_classes * block + trail`` in all.
    """

    pattern: str
    dims: tuple[int, ...] = (0,)
    lead: int = 0
    block: int = 1
    trail: int = 0

    def __post_init__(self) -> None:
        re.compile(self.pattern)
        if not self.dims or len(set(self.dims)) != len(self.dims) or min(self.dims) < 0:
            raise ValueError(f"ClassRows {self.pattern!r}: dims must be distinct non-negative dims, got {self.dims}")
        if self.lead < 0 or self.trail < 0 or self.block < 1:
            raise ValueError(f"ClassRows {self.pattern!r}: lead and trail must be >= 0 and block >= 1, "
                             f"got {self.lead}, {self.trail}, {self.block}")

    def matches(self, key: str) -> bool:
        return re.fullmatch(self.pattern, key) is not None

    def size(self, num_classes: int) -> int:
        """Rows along each of ``dims`` for ``num_classes`` class ids."""
        return self.lead + num_classes * self.block + self.trail


@dataclass(frozen=True)
class KeptClass:
    name: str
    parent_id: int
    target_id: int


@dataclass(frozen=True)
class NamedClass:
    name: str
    id: int


@dataclass(frozen=True)
class TransferReport:
    """What ``adapt_state_dict`` did: classes ``kept`` (parent id -> target id, in target id order),
    ``added`` (target ids, fresh rows), ``dropped`` (parent ids); tensors ``copied`` whole and
    class-indexed tensors ``remapped`` row by row."""

    kept: tuple[KeptClass, ...]
    added: tuple[NamedClass, ...]
    dropped: tuple[NamedClass, ...]
    copied: int
    remapped: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for checkpoint metadata and run logs)."""
        return {
            "kept": [{"name": c.name, "parent_id": c.parent_id, "target_id": c.target_id} for c in self.kept],
            "added": [{"name": c.name, "id": c.id} for c in self.added],
            "dropped": [{"name": c.name, "id": c.id} for c in self.dropped],
            "copied": self.copied,
            "remapped": self.remapped,
        }


def class_ids(classes: Sequence[Mapping[str, Any]], which: str) -> dict[str, int]:
    """``{name: id}`` of a checkpoint's class table; TransferError naming ``which`` table and the entry
    at fault for a missing or non-integer id, a negative id, or an id or name given twice."""
    out: dict[str, int] = {}
    seen: dict[int, str] = {}
    if not classes:
        raise TransferError(f"{which} classes: the class table is empty")
    for i, c in enumerate(classes):
        cid, name = c.get("id"), c.get("name")
        if isinstance(cid, bool) or not isinstance(cid, int) or cid < 0:
            raise TransferError(f"{which} classes[{i}]: id must be a non-negative integer, got {cid!r}")
        if not isinstance(name, str) or not name:
            raise TransferError(f"{which} classes[{i}]: name must be a non-empty string, got {name!r}")
        if name in out:
            raise TransferError(f"{which} classes: name {name!r} is given twice (ids {out[name]} and {cid})")
        if cid in seen:
            raise TransferError(f"{which} classes: id {cid} is given twice ({seen[cid]!r} and {name!r})")
        out[name] = cid
        seen[cid] = name
    return out


def _row_map(layout: ClassRows, pairs: Sequence[tuple[int, int]], parent_k: int, target_k: int) -> tuple[Tensor, Tensor]:
    """Parent row indices and the target rows they go to, along one class dimension: the lead and
    trail rows, and the ``block`` rows of every (parent id, target id) pair."""
    src = list(range(layout.lead))
    dst = list(range(layout.lead))
    b = layout.block
    for p, t in pairs:
        src.extend(range(layout.lead + p * b, layout.lead + (p + 1) * b))
        dst.extend(range(layout.lead + t * b, layout.lead + (t + 1) * b))
    src.extend(range(layout.size(parent_k) - layout.trail, layout.size(parent_k)))
    dst.extend(range(layout.size(target_k) - layout.trail, layout.size(target_k)))
    return torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long)


def _remap(key: str, layout: ClassRows, parent: Tensor, fresh: Tensor, pairs: Sequence[tuple[int, int]],
           parent_k: int, target_k: int) -> Tensor:
    """``fresh`` with the parent's rows of every pair (and the non-class rows) copied in."""
    dims = layout.dims
    fits = (
        parent.ndim == fresh.ndim
        and all(0 <= d < fresh.ndim for d in dims)
        and all(parent.shape[d] == layout.size(parent_k) and fresh.shape[d] == layout.size(target_k) for d in dims)
        and all(parent.shape[d] == fresh.shape[d] for d in range(fresh.ndim) if d not in dims)
    )
    if not fits:
        raise TransferError(
            f"{key}: parent shape {tuple(parent.shape)}, target shape {tuple(fresh.shape)} do not fit the declared "
            f"class rows (dims {layout.dims}, {layout.lead} + classes x {layout.block} + {layout.trail} rows) for "
            f"{parent_k} parent and {target_k} target class ids"
        )
    src, dst = _row_map(layout, pairs, parent_k, target_k)
    out = fresh.clone()
    front = tuple(range(len(dims)))
    # Class dims first (views of out, so writes land in out); the index grids pick every
    # combination of mapped rows, e.g. the kept x kept block of an FCN upsampler.
    grid_src = torch.meshgrid(*[src.to(parent.device)] * len(dims), indexing="ij")
    grid_dst = torch.meshgrid(*[dst.to(out.device)] * len(dims), indexing="ij")
    out.movedim(dims, front)[grid_dst] = parent.movedim(dims, front)[grid_src].to(out)
    return out


def adapt_state_dict(
    arch: str,
    parent_state: Mapping[str, Tensor],
    parent_classes: Sequence[Mapping[str, Any]],
    target_state: Mapping[str, Tensor],
    target_classes: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, Tensor], TransferReport]:
    """The state dict for a model of ``arch`` with ``target_classes``, from a parent of the same
    ``arch`` trained with ``parent_classes``; ``target_state`` is the new model's fresh state dict.

    Class tables are checkpoint class lists (``{"id": int, "name": str, ...}``); a model's class
    axis is indexed by id (``max id + 1`` rows, ids may have gaps). Class-indexed tensors (the
    spec's ``class_rows``) take the parent's rows of every target class whose name the parent
    has, and keep the fresh rows of new classes; a row of an id that is no class in either table
    is the parent's too, so the same table gives back the parent's state exactly. The non-class
    rows (``lead``, ``trail``) are the parent's. Every other tensor is the parent's (the same
    tensor object, not a copy) and must have the target's shape.

    Raises TransferError (a ValueError) for an unknown ``arch``, a key in only one of the states,
    a shape that differs outside the declared class rows, or an invalid class table, naming the
    key (and both shapes) or the table entry at fault.
    """
    from segpipe.models import MODELS  # the registry imports this module

    if arch not in MODELS:
        raise TransferError(f"unknown model {arch!r}; valid names: {', '.join(MODELS)}")
    rows = MODELS[arch].class_rows
    parent_ids = class_ids(parent_classes, "parent")
    target_ids = class_ids(target_classes, "target")
    parent_k, target_k = max(parent_ids.values()) + 1, max(target_ids.values()) + 1

    missing = [k for k in target_state if k not in parent_state]
    unexpected = [k for k in parent_state if k not in target_state]
    if missing or unexpected:
        parts = [f"missing from the parent: {', '.join(missing[:5])}" if missing else "",
                 f"not in the target model: {', '.join(unexpected[:5])}" if unexpected else ""]
        raise TransferError(f"{arch}: the parent state does not have the target's keys "
                            f"({'; '.join(p for p in parts if p)}); is it another configuration of {arch}?")

    order = sorted(target_ids.items(), key=lambda kv: kv[1])
    kept = tuple(KeptClass(n, parent_ids[n], t) for n, t in order if n in parent_ids)
    added = tuple(NamedClass(n, t) for n, t in order if n not in parent_ids)
    dropped = tuple(NamedClass(n, p) for n, p in sorted(parent_ids.items(), key=lambda kv: kv[1])
                    if n not in target_ids)
    pairs = [(c.parent_id, c.target_id) for c in kept]
    parent_used, target_used = set(parent_ids.values()), set(target_ids.values())
    pairs += [(i, i) for i in range(min(parent_k, target_k)) if i not in parent_used and i not in target_used]

    state: dict[str, Tensor] = {}
    copied = remapped = 0
    different = [k for k, v in target_state.items()
                 if not any(r.matches(k) for r in rows) and tuple(parent_state[k].shape) != tuple(v.shape)]
    if different:
        k = different[0]
        more = f" (and {len(different) - 1} more)" if len(different) > 1 else ""
        raise TransferError(
            f"{k}: parent shape {tuple(parent_state[k].shape)} != target shape {tuple(target_state[k].shape)}{more}; "
            f"only the class rows of {arch} may differ (another width or backbone cannot be fine-tuned from)"
        )
    for key, fresh in target_state.items():
        layouts = [r for r in rows if r.matches(key)]
        if len(layouts) > 1:
            raise TransferError(f"{key}: matched by more than one class_rows pattern of {arch}: "
                                f"{[r.pattern for r in layouts]}")
        if layouts:
            state[key] = _remap(key, layouts[0], parent_state[key], fresh, pairs, parent_k, target_k)
            remapped += 1
        else:
            state[key] = parent_state[key]
            copied += 1
    return state, TransferReport(kept, added, dropped, copied, remapped)


__all__ = ["ClassRows", "KeptClass", "NamedClass", "TransferError", "TransferReport", "adapt_state_dict", "class_ids"]
