"""The model registry: a directory of verified checkpoint copies plus one JSON index.

Layout (``docs/registry.md`` documents every field)::

    models/registry/
        index.json        versions, aliases (champion, challenger, panoptic-champion,
                          panoptic-challenger) and the alias history
        .lock             file lock held during every update
        v1/ v2/ ...       copies of the registered checkpoints (model.safetensors + meta.json),
                          or of a fused pair (semantic/, instance/, bundle.json)

Every update takes the lock, re-reads the index, changes it and writes it back by temp file +
rename, so concurrent promotions never lose or corrupt an entry. An update that fails (a full
disk while copying or while writing the index) is rolled back: the version folders it created
are removed, so no unindexed ``vN`` is left behind and a retry starts from the same state.
Loading verifies the sha256 of both checkpoint files against the index before any weight is
read, and an entry's ``path`` must name a folder inside the registry.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from segpipe.checkpoint import CHECKPOINT_FILES, META, WEIGHTS, CheckpointMeta, is_checkpoint, load_meta
from segpipe.errors import UserError
from segpipe.files import (
    atomic_dir,
    atomic_write_json,
    escape_reason,
    remove_stale_temporaries,
    sha256_bytes,
    sha256_file,
)
from segpipe.results import bundle_sha256

FORMAT = "segpipe-registry/1"
INDEX = "index.json"
LOCK = ".lock"
# panoptic-*: the panoptic ranking (promote.panoptic_metric), apart from the semantic/instance one
ALIASES = ("champion", "challenger", "panoptic-champion", "panoptic-challenger")
BUNDLE = "bundle.json"  # in a fused version: its members' folders and the fusion params
BUNDLE_MEMBERS = ("semantic", "instance")
DEFAULT_REGISTRY = Path("models/registry")
_VERSION = re.compile(r"^v([1-9][0-9]*)$")

if TYPE_CHECKING:
    from segpipe.results import EvalResult


class RegistryError(UserError, ValueError):
    """The registry, an entry of it, or a registered file is missing, malformed or tampered with."""


# --------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------


def empty_index(name: str) -> dict[str, Any]:
    return {"format": FORMAT, "name": name, "versions": [], "aliases": {}, "history": []}


def read_index(registry: Path | str, name: str = "segmenter") -> dict[str, Any]:
    """The parsed index, or an empty one when the registry does not exist yet."""
    path = Path(registry) / INDEX
    if not path.exists():
        return empty_index(name)
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RegistryError(f"{path}: not valid JSON: {e}") from None
    validate_index(index, path)
    return index


def validate_index(index: Any, where: Path | str) -> None:
    """Raise RegistryError naming the key at fault when ``index`` is not a well-formed index."""
    if not isinstance(index, dict):
        raise RegistryError(f"{where}: expected a JSON object")
    if index.get("format") != FORMAT:
        raise RegistryError(f"{where}: format {index.get('format')!r}, expected {FORMAT!r}")
    for key, kind in (("name", str), ("versions", list), ("aliases", dict), ("history", list)):
        if not isinstance(index.get(key), kind):
            raise RegistryError(f"{where}: key {key!r} missing or not a {kind.__name__}")
    seen: set[str] = set()
    for i, v in enumerate(index["versions"]):
        for key in ("version", "path", "arch", "task", "files", "checkpoint_sha256"):
            if key not in v:
                raise RegistryError(f"{where}: versions[{i}] lacks key {key!r}")
        if not isinstance(v["version"], str) or not _VERSION.match(v["version"]) or v["version"] in seen:
            raise RegistryError(f"{where}: versions[{i}]: bad or duplicate version {v['version']!r}")
        seen.add(v["version"])
        if not isinstance(v["path"], str) or (reason := escape_reason(v["path"])) is not None:
            raise RegistryError(f"{where}: version {v['version']}: path {v['path']!r} "
                                f"{reason or 'is not a string'}; a folder inside the registry is expected "
                                f"(e.g. {v['version']!r}); refusing to load from outside it")
    for alias, version in index["aliases"].items():
        if version not in seen:
            raise RegistryError(f"{where}: alias {alias!r} points to unknown version {version!r}")


def write_index(registry: Path | str, index: dict[str, Any]) -> None:
    validate_index(index, Path(registry) / INDEX)
    atomic_write_json(Path(registry) / INDEX, index)


@contextlib.contextmanager
def locked(registry: Path | str, timeout: float = 120.0) -> Iterator[Path]:
    """Hold the registry's file lock (across processes) for a read-modify-write."""
    registry = Path(registry)
    registry.mkdir(parents=True, exist_ok=True)
    with FileLock(str(registry / LOCK), timeout=timeout):
        yield registry


def find_version(index: dict[str, Any], version: str) -> dict[str, Any]:
    for v in index["versions"]:
        if v["version"] == version:
            return v
    known = ", ".join(v["version"] for v in index["versions"]) or "none"
    raise RegistryError(f"unknown version {version!r}; registered: {known}")


def find_by_sha(index: dict[str, Any], checkpoint_sha256: str) -> dict[str, Any] | None:
    for v in index["versions"]:
        if v["checkpoint_sha256"] == checkpoint_sha256:
            return v
    return None


def alias_entry(index: dict[str, Any], alias: str) -> dict[str, Any] | None:
    version = index["aliases"].get(alias)
    return find_version(index, version) if version else None


def next_version(index: dict[str, Any]) -> str:
    numbers = [int(_VERSION.match(v["version"]).group(1)) for v in index["versions"]]
    return f"v{max(numbers, default=0) + 1}"


# --------------------------------------------------------------------------------------
# Registering and aliasing
# --------------------------------------------------------------------------------------


def params_sha256(params: Any) -> str:
    """sha256 of the canonical JSON of the training params stored in a checkpoint's meta."""
    return sha256_bytes(json.dumps(params, sort_keys=True, separators=(",", ":")).encode())


def git_commit(cwd: Path | str = ".") -> str | None:
    """The HEAD commit of the git repository around ``cwd``; None outside a repo or before a commit."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def finite_or_null(obj: Any) -> Any:
    """A copy with NaN/inf replaced by None: the index is strict JSON (a NaN metric means "undefined")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_null(v) for v in obj]
    return obj


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def checkpoint_hashes(checkpoint: Path | str) -> dict[str, str]:
    """sha256 of each file the registry copies from a checkpoint directory."""
    checkpoint = Path(checkpoint)
    if not is_checkpoint(checkpoint):
        raise RegistryError(f"{checkpoint}: not a segpipe checkpoint (needs {WEIGHTS} and {META})")
    return {f: sha256_file(checkpoint / f) for f in CHECKPOINT_FILES}


@contextlib.contextmanager
def transaction(registry: Path | str, name: str = "segmenter") -> Iterator[dict[str, Any]]:
    """Lock the registry and yield its index for changes; written back (atomically) only if changed.

    Everything that reads the index to decide something and then changes it must happen inside
    one transaction, so two processes never decide on the same stale index.
    """
    registry = Path(registry)
    with locked(registry):
        remove_stale_temporaries(registry / INDEX)
        index = read_index(registry, name)
        before = json.dumps(index, sort_keys=True)
        folders = _version_folders(registry)
        try:
            yield index
            if json.dumps(index, sort_keys=True) != before:
                write_index(registry, index)
        except BaseException:
            # Roll back: a version folder made by this transaction is not in the index on disk.
            for created in sorted(_version_folders(registry) - folders):
                shutil.rmtree(registry / created, ignore_errors=True)
            raise


def _version_folders(registry: Path) -> set[str]:
    return {p.name for p in registry.iterdir() if _VERSION.match(p.name)} if registry.is_dir() else set()


def register(
    registry: Path | str,
    checkpoint: Path | str,
    result: EvalResult | None = None,
    *,
    name: str = "segmenter",
    source: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Copy a checkpoint folder into the registry as the next version; returns (entry, created).

    ``result`` is its evaluation (``segpipe.results.EvalResult``), or None for a model registered
    by hand (no scores yet); the checkpoint must be the one the result scored (same sha256).
    A checkpoint whose weights are already registered is not copied again: the existing entry
    comes back with ``created=False`` (this is what makes promotion idempotent).
    """
    with transaction(registry, name) as index:
        return add_version(Path(registry), index, Path(checkpoint), result, source)


def add_version(
    registry: Path,
    index: dict[str, Any],
    checkpoint: Path,
    result: EvalResult | None = None,
    source: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Inside a transaction: copy ``checkpoint`` to the next ``vN`` and add its entry to ``index``,
    with ``result``'s metrics as its first score."""
    hashes = checkpoint_hashes(checkpoint)
    expected = result.checkpoint.sha256 if result is not None and result.checkpoint is not None else None
    if expected is not None and hashes[WEIGHTS] != expected:
        raise RegistryError(f"{checkpoint / WEIGHTS}: sha256 {hashes[WEIGHTS]} differs from the evaluated {expected}")
    existing = find_by_sha(index, hashes[WEIGHTS])
    if existing is not None:
        return existing, False
    meta = load_meta(checkpoint)
    version = next_version(index)
    # A vN folder that the index does not list is what a killed promotion left (it cannot roll
    # back): atomic_dir replaces it whole, so it never blocks the next version.
    with atomic_dir(registry / version) as tmp:
        for f in CHECKPOINT_FILES:
            shutil.copy2(checkpoint / f, tmp / f)
        # The copy must be what was hashed: a checkpoint rewritten mid-copy is refused.
        copied = {f: sha256_file(tmp / f) for f in CHECKPOINT_FILES}
        if copied != hashes:
            raise RegistryError(f"{checkpoint}: changed while being copied into the registry")
    metrics = result.data if result is not None else {}
    entry = {
        "version": version,
        "path": version,
        "arch": meta.arch,
        "task": meta.task,
        "checkpoint_sha256": hashes[WEIGHTS],
        "files": hashes,
        "metrics": finite_or_null(metrics),
        "shards_manifest_sha256": metrics.get("shards_manifest_sha256", meta.shards_manifest_sha256),
        "params_sha256": params_sha256(meta.params),
        "parent": meta.parent,
        "git_commit": git_commit(),
        "created": _now(),
        "source": source or {"checkpoint": str(checkpoint)},
        "scores": [],
    }
    if result is not None:
        add_score(entry, result.data, "registered")
    index["versions"].append(entry)
    return entry, True


def add_bundle_version(
    registry: Path,
    index: dict[str, Any],
    result: EvalResult,
    source: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Inside a transaction: copy a fused pair (``result``: the fuse stage's EvalResult, whose two
    checkpoints are verified against the sha256 it recorded) to the next ``vN`` as ``vN/semantic``,
    ``vN/instance`` and ``vN/bundle.json`` (the fusion params); every copied file's sha256 is in the
    entry's ``files``, so loading verifies both models. A bundle already registered (same members
    and fusion params) comes back unchanged."""
    checkpoints = result.verify()
    fusion = dict(result.fusion or {})
    if sorted(checkpoints) != sorted(BUNDLE_MEMBERS):
        raise RegistryError(f"a bundle needs checkpoints {', '.join(BUNDLE_MEMBERS)}, got {sorted(checkpoints)}")
    hashes = {k: checkpoint_hashes(Path(v)) for k, v in checkpoints.items()}
    identity = bundle_sha256({k: h[WEIGHTS] for k, h in hashes.items()}, fusion)
    existing = find_by_sha(index, identity)
    if existing is not None:
        return existing, False
    metas = {k: load_meta(Path(v)) for k, v in checkpoints.items()}
    bundle = {"members": {k: k for k in BUNDLE_MEMBERS}, "fusion": fusion}
    version = next_version(index)
    with atomic_dir(registry / version) as tmp:
        for k, src in checkpoints.items():
            (tmp / k).mkdir()
            for f in CHECKPOINT_FILES:
                shutil.copy2(Path(src) / f, tmp / k / f)
            if {f: sha256_file(tmp / k / f) for f in CHECKPOINT_FILES} != hashes[k]:
                raise RegistryError(f"{src}: changed while being copied into the registry")
        atomic_write_json(tmp / BUNDLE, bundle)
    files = {f"{k}/{f}": sha for k, h in hashes.items() for f, sha in h.items()}
    files[BUNDLE] = sha256_file(registry / version / BUNDLE)
    entry = {
        "version": version,
        "path": version,
        "arch": result.arch,
        "task": "panoptic",
        "checkpoint_sha256": identity,
        "files": files,
        "bundle": {k: {"arch": metas[k].arch, "checkpoint_sha256": hashes[k][WEIGHTS],
                       "params_sha256": params_sha256(metas[k].params)} for k in BUNDLE_MEMBERS},
        "fusion": fusion,
        "metrics": finite_or_null(result.data),
        "shards_manifest_sha256": result.manifest,
        "git_commit": git_commit(),
        "created": _now(),
        "source": source or {k: str(v) for k, v in checkpoints.items()},
        "scores": [],
    }
    add_score(entry, result.data, "registered")
    index["versions"].append(entry)
    return entry, True


# --------------------------------------------------------------------------------------
# Scores per data version: a version is scored once per (shard manifest, split, scoring key)
# --------------------------------------------------------------------------------------


def scores_of(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The entry's scores, ``[{"shards_manifest_sha256", "split", "scoring", "metrics", "how",
    "time"}]``. An entry registered before scores were kept has one: its registered metrics."""
    if "scores" in entry and entry["scores"]:
        return list(entry["scores"])
    m = entry.get("metrics") or {}
    if not m:
        return []
    return [{"shards_manifest_sha256": m.get("shards_manifest_sha256", entry.get("shards_manifest_sha256")),
             "split": m.get("split"), "scoring": m.get("scoring"), "metrics": m, "how": "registered",
             "time": entry.get("created")}]


def score_on(entry: dict[str, Any], manifest: str, split: str, scoring: str | None) -> dict[str, Any] | None:
    """The entry's score on that data (shard manifest and split) with that scoring key, or None."""
    for sc in scores_of(entry):
        if (sc["shards_manifest_sha256"], sc["split"], sc.get("scoring")) == (manifest, split, scoring):
            return sc
    return None


def add_score(entry: dict[str, Any], metrics: dict[str, Any], how: str) -> dict[str, Any]:
    """Inside a transaction: record ``metrics`` (a metrics.json object of this version, with its
    ``shards_manifest_sha256``, ``split`` and ``scoring``) as the entry's score on that data,
    replacing an older one on the same data. ``how``: ``registered`` or ``re-scored``."""
    score = {"shards_manifest_sha256": metrics["shards_manifest_sha256"], "split": metrics["split"],
             "scoring": metrics.get("scoring"), "metrics": finite_or_null(metrics), "how": how, "time": _now()}
    key = (score["shards_manifest_sha256"], score["split"], score["scoring"])
    entry["scores"] = [sc for sc in scores_of(entry)
                       if (sc["shards_manifest_sha256"], sc["split"], sc.get("scoring")) != key] + [score]
    return score


def read_bundle(directory: Path | str) -> dict[str, Any] | None:
    """A fused version's ``bundle.json`` (``{"members": {"semantic": DIR, "instance": DIR},
    "fusion": {...}}``, member folders inside ``directory``), or None for a plain checkpoint."""
    path = Path(directory) / BUNDLE
    if not path.is_file():
        return None
    try:
        bundle = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RegistryError(f"{path}: not valid JSON: {e}") from None
    members = bundle.get("members") if isinstance(bundle, dict) else None
    if not isinstance(members, dict) or sorted(members) != sorted(BUNDLE_MEMBERS) or not isinstance(bundle.get("fusion"), dict):
        raise RegistryError(f"{path}: expected members {', '.join(BUNDLE_MEMBERS)} and fusion params")
    for k, folder in members.items():
        if not isinstance(folder, str) or (reason := escape_reason(folder)) is not None:
            raise RegistryError(f"{path}: member {k} folder {folder!r} {reason or 'is not a string'}")
    return bundle


def point_alias(index: dict[str, Any], alias: str, version: str | None, reason: str) -> bool:
    """Inside a transaction: point ``alias`` at ``version`` (None removes it), logging the move."""
    if alias not in ALIASES:
        raise RegistryError(f"unknown alias {alias!r}; valid: {', '.join(ALIASES)}")
    before = index["aliases"].get(alias)
    if before == version:
        return False
    if version is None:
        index["aliases"].pop(alias, None)
    else:
        find_version(index, version)
        index["aliases"][alias] = version
    index["history"].append({"time": _now(), "alias": alias, "from": before, "to": version, "reason": reason})
    return True


def set_alias(registry: Path | str, alias: str, version: str | None, reason: str, name: str = "segmenter") -> bool:
    """Point ``alias`` at ``version`` (None removes it); returns whether the index changed."""
    with transaction(registry, name) as index:
        return point_alias(index, alias, version, reason)


def previous_version(index: dict[str, Any], alias: str) -> str | None:
    """The version ``alias`` pointed at before its current one (from the alias history), or None."""
    current = index["aliases"].get(alias)
    for move in reversed(index["history"]):
        if move["alias"] == alias and move["to"] == current and move["from"] not in (None, current):
            return move["from"]
    return None


def rollback(registry: Path | str, alias: str = "champion", to: str | None = None, reason: str = "",
             name: str = "segmenter") -> tuple[str | None, str]:
    """Point ``alias`` back at ``to`` (default: the version it pointed at before), logging why;
    returns (from, to). RegistryError when there is nothing to go back to."""
    with transaction(registry, name) as index:
        before = index["aliases"].get(alias)
        target = to or previous_version(index, alias)
        if target is None:
            raise RegistryError(f"{Path(registry) / INDEX}: {alias!r} has no earlier version to roll back to "
                                f"(it is {before or 'unset'}); name one with --to vN")
        find_version(index, target)
        point_alias(index, alias, target, f"rollback: {reason or 'by hand'}")
        return before, target


def lineage(ref: str | Path, registry: Path | str = DEFAULT_REGISTRY) -> list[dict[str, Any]]:
    """A model's ancestry, itself first, back to its from-scratch ancestor: one dict per model,
    ``{"model", "arch", "sha256", "parent"}`` (``model``: the registry version, or the path of an
    unregistered checkpoint). A parent no longer in the registry ends the chain with ``missing``."""
    index = read_index(registry)
    directory, _ = resolve(ref, registry)
    meta = load_meta(directory) if is_checkpoint(directory) else None
    sha = sha256_file(Path(directory) / WEIGHTS) if meta is not None else None
    entry = find_by_sha(index, sha) if sha else alias_entry(index, str(ref)) if str(ref) in ALIASES else None
    if entry is None and _VERSION.match(str(ref)):
        entry = find_version(index, str(ref))
    chain: list[dict[str, Any]] = []
    parent = entry.get("parent") if entry is not None else (meta.parent if meta is not None else None)
    chain.append({"model": entry["version"] if entry else str(directory), "arch": entry["arch"] if entry else meta.arch,
                  "sha256": entry["checkpoint_sha256"] if entry else sha, "parent": parent})
    seen = {chain[0]["sha256"]}
    while parent:
        if parent.get("sha256") in seen:
            raise RegistryError(f"lineage of {ref}: {parent.get('sha256')} is its own ancestor")
        seen.add(parent.get("sha256"))
        found = find_by_sha(index, parent.get("sha256", ""))
        if found is None:
            chain.append({"model": parent.get("version") or parent.get("ref"), "arch": parent.get("arch"),
                          "sha256": parent.get("sha256"), "parent": None, "missing": True})
            break
        parent = found.get("parent")
        chain.append({"model": found["version"], "arch": found["arch"], "sha256": found["checkpoint_sha256"],
                      "parent": parent})
    return chain


# --------------------------------------------------------------------------------------
# Resolving and loading
# --------------------------------------------------------------------------------------


def resolve(ref: str | Path, registry: Path | str = DEFAULT_REGISTRY) -> tuple[Path, dict[str, str] | None]:
    """Map ``champion`` / ``challenger`` / ``vN`` / a checkpoint directory to (directory, expected hashes).

    Registry entries carry the sha256 of each file; a plain directory has none (None).
    """
    ref_s = str(ref)
    if ref_s in ALIASES or _VERSION.match(ref_s):
        registry = Path(registry)
        index = read_index(registry)
        if ref_s in ALIASES:
            entry = alias_entry(index, ref_s)
            if entry is None:
                raise RegistryError(f"{registry / INDEX}: no {ref_s!r} yet; run segpipe promote first")
        else:
            entry = find_version(index, ref_s)
        return registry / entry["path"], dict(entry["files"])
    path = Path(ref)
    if is_checkpoint(path):
        return path, None
    raise RegistryError(
        f"model {ref_s!r} (--model) is neither an alias ({', '.join(ALIASES)}), a version (v1, v2, ...) "
        f"nor a checkpoint directory (with {WEIGHTS} and {META})"
    )


def verify(directory: Path | str, expected: dict[str, str]) -> None:
    """Raise RegistryError naming the first file whose sha256 differs from the index."""
    directory = Path(directory)
    for f, sha in expected.items():
        path = directory / f
        if not path.is_file():
            raise RegistryError(f"{path}: registered file is missing")
        actual = sha256_file(path)
        if actual != sha:
            raise RegistryError(f"{path}: sha256 {actual} does not match the registry's {sha}; refusing to load")


def checkpoint_dir(ref: str | Path, registry: Path | str = DEFAULT_REGISTRY) -> Path:
    """The checkpoint directory of ``champion`` | ``vN`` | CHECKPOINT_DIR, its files' sha256
    verified against the registry first (a plain directory has no recorded hashes)."""
    directory, expected = resolve(ref, registry)
    if expected is not None:
        verify(directory, expected)
    return directory


def load(ref: str | Path, registry: Path | str = DEFAULT_REGISTRY, map_location: str = "cpu") -> tuple[Any, CheckpointMeta]:
    """Load ``champion`` | ``vN`` | CHECKPOINT_DIR as (model in eval mode, meta), verifying sha256 first.

    Weights are read with safetensors, so nothing is unpickled.
    """
    from segpipe.checkpoint import load_model

    return load_model(checkpoint_dir(ref, registry), map_location=map_location)


# --------------------------------------------------------------------------------------
# GTO-style git tags (optional)
# --------------------------------------------------------------------------------------


def gto_version(version: str) -> str:
    """GTO wants semantic versions: registry ``v3`` becomes ``v3.0.0``."""
    return f"{version}.0.0"


def write_gto_tags(name: str, version: str | None, promoted: bool, cwd: Path | str = ".") -> list[str]:
    """Create annotated tags ``NAME@vN.0.0`` (registration) and ``NAME#prod#K`` (champion assignment).

    Tags are the format GTO reads (``gto show`` lists them); they are created with plain git
    so gto need not be importable. Returns the tags created; [] outside a git repo with commits.
    """
    if version is None or git_commit(cwd) is None:
        return []
    existing = _git(["tag", "--list", f"{name}*"], cwd).split()
    created = []
    reg = f"{name}@{gto_version(version)}"
    if reg not in existing:
        _git(["tag", "-a", reg, "-m", f"Registering artifact {name} version {gto_version(version)}"], cwd)
        created.append(reg)
    if promoted:
        n = sum(1 for t in existing if t.startswith(f"{name}#prod#")) + 1
        tag = f"{name}#prod#{n}"
        _git(["tag", "-a", tag, f"{reg}^{{}}", "-m", f"Assigning stage prod to artifact {name} version {gto_version(version)}"], cwd)
        created.append(tag)
    return created


def _git(args: list[str], cwd: Path | str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RegistryError(f"git {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout
