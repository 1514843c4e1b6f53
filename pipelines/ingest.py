"""The ``ingest`` flow: version a drop of new site imagery as a raw COCO collection.

A drop is a folder in the raw collection layout (docs/architecture.md)::

    DROP/images/<name>.jpg
    DROP/annotations/instances.json
    DROP/masks/<name>.png          optional semantic label maps
    DROP/classes.json              optional class table

The flow runs the converter's checks on it (``segpipe validate``). A drop with more quarantined
items than ``ingest.max_quarantined`` is rejected with the report and nothing changes. A drop
whose annotations name a file outside its ``images/`` folder (``../x.jpg``, an absolute path), or
that holds a symlink leading out of the drop, is rejected whatever ``max_quarantined`` says:
versioning it would make the collection depend on files DVC does not track. Otherwise
it is copied to ``data/raw/NAME``, tracked with ``dvc add``, the ``.dvc`` file and ``.gitignore``
are committed to git (only those paths), and the data is pushed when a DVC remote is configured.
The convert stage depends on all of ``data/raw``, so the next ``dvc repro`` converts it::

    python -m pipelines.ingest /mnt/drops/site-42 --name site-42

Before a valid drop is versioned, the flow looks at it with the champion's eyes (docs/data-quality.md):

- ``segpipe drift`` compares it with the repository's shards (``data/shards``, the data the
  champion was trained on; the champion's confidence too when ``models/registry`` has one). The
  report gets a drift section, and ``ingest.on_drift`` decides: ``warn`` (the default: a new site
  is supposed to drift, and the retraining loop is how the model catches up) versions the drop
  anyway, ``reject`` fails the run (DropRejected: nothing changes, and a Failed ingest triggers no
  retraining). A drift check that cannot run is reported; under ``reject`` it rejects the drop.
  Without reference shards there is nothing to compare with, and the drift section says so;
- with a champion, ``segpipe select`` ranks the drop's frames, and the report lists the
  ``select.report_top`` most worth labelling.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipelines import commands
from segpipe.errors import UserError
from segpipe.files import atomic_dir, escape_reason
from segpipe.params import IngestParams, ParamsError, SelectParams, add_params_arguments, load_section

# The convert stage's input and output, and the promote stage's registry, in dvc.yaml
# (tests/pipelines/test_ingest.py checks they agree).
RAW = Path("data/raw")
SHARDS = Path("data/shards")
REGISTRY = Path("models/registry")
ARTIFACT_KEY = "ingest-report"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
REPORT_LINES = 50  # quarantine entries shown in the artifact and the error


class DropRejected(UserError, ValueError):
    """The drop is not a valid collection, or ingesting it would change versioned data."""


# --------------------------------------------------------------------------------------
# Pure logic
# --------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    """The collection name, or DropRejected saying what a valid one looks like."""
    if not NAME.fullmatch(name) or name.endswith(".dvc"):
        raise DropRejected(
            f"collection name {name!r} is not valid: use letters, digits, '.', '_' and '-' "
            "(at most 100, starting with a letter or digit, not ending in .dvc)"
        )
    return name


def drop_layout(drop: Path) -> dict[str, Path | None]:
    """The parts of a drop folder: images, annotations, masks (or None), classes (or None)."""
    if not drop.is_dir():
        raise DropRejected(f"{drop}: drop folder not found")
    layout: dict[str, Path | None] = {
        "images": drop / "images",
        "annotations": drop / "annotations" / "instances.json",
        "masks": drop / "masks" if (drop / "masks").is_dir() else None,
        "classes": drop / "classes.json" if (drop / "classes.json").is_file() else None,
    }
    if not layout["images"].is_dir():
        raise DropRejected(f"{drop}: no images/ folder (expected images/, annotations/instances.json, "
                           "optional masks/ and classes.json)")
    if not layout["annotations"].is_file():
        raise DropRejected(f"{drop}: no annotations/instances.json (COCO instances of the images)")
    return layout


def outside_paths(drop: Path, layout: dict[str, Path | None]) -> list[str]:
    """What in the drop leads outside it: annotation ``file_name``s that leave ``images/`` (naming
    the image id) and symlinks whose target is outside the drop. [] when everything stays inside.

    An unreadable annotation file gives [] here: ``segpipe validate`` reports it.
    """
    found = []
    try:
        images = json.loads(layout["annotations"].read_text()).get("images", [])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        images = []
    for img in images if isinstance(images, list) else []:
        name = img.get("file_name") if isinstance(img, dict) else None
        if isinstance(name, str) and (reason := escape_reason(name)) is not None:
            found.append(f"{layout['annotations']}: image {img.get('id')!r}: file_name {name!r} {reason}")
    root = drop.resolve()
    for part in ("images", "masks"):
        folder = layout[part]
        for path in sorted(folder.rglob("*")) if folder is not None else []:
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                found.append(f"{path}: symlink to {path.resolve()}, outside the drop")
    return found


def accepted(report: dict[str, Any], max_quarantined: int) -> bool:
    """Whether a validation report lets the drop in."""
    if report.get("error"):
        return False
    return len(report.get("quarantine", [])) <= max_quarantined and report.get("images_ok", 0) > 0


def render_report(drop: Path, name: str, report: dict[str, Any], ok: bool, max_quarantined: int,
                  drift: dict[str, Any] | None = None, frames: dict[str, Any] | None = None,
                  on_drift: str = "warn") -> str:
    """The Markdown artifact of an ingest: verdict, counts and the quarantine entries, then the
    drift section and the frames to label first (when they were looked at)."""
    lines = render_validation(drop, name, report, ok, max_quarantined)
    if drift is not None:
        lines += render_drift(drift, on_drift)
    if frames is not None:
        lines += render_frames(frames)
    return "\n".join(lines) + "\n"


def render_validation(drop: Path, name: str, report: dict[str, Any], ok: bool, max_quarantined: int) -> list[str]:
    """Verdict, counts and the quarantine entries of a validation."""
    verdict = f"**Accepted** as `{RAW / name}`" if ok else "**Rejected**: nothing was changed"
    lines = [f"# Ingest `{drop}`", "", verdict, ""]
    if report.get("error"):
        return lines + ["The converter could not read the drop:", "", "```", report["error"].strip(), "```"]
    quarantine = report.get("quarantine", [])
    lines += [
        f"- images: {report.get('images', 0)} ({report.get('images_ok', 0)} ok, "
        f"{report.get('images_quarantined', 0)} quarantined)",
        f"- annotations quarantined: {report.get('annotations_quarantined', 0)}",
        f"- dataset problems: {report.get('dataset_problems', 0)}",
        f"- allowed quarantined items (`ingest.max_quarantined`): {max_quarantined}",
    ]
    if report.get("images_ok", 0) == 0:
        lines.append("- no valid image: an empty collection is never ingested")
    if quarantine:
        lines += ["", "| file | item | reason |", "|---|---|---|"]
        for e in quarantine[:REPORT_LINES]:
            cells = [str(e.get(k, "")).replace("|", "\\|").replace("\n", " ") for k in ("file", "item", "reason")]
            lines.append("| " + " | ".join(cells) + " |")
        if len(quarantine) > REPORT_LINES:
            lines.append(f"\n... and {len(quarantine) - REPORT_LINES} more.")
    return lines


def drift_rejects(drift: dict[str, Any] | None, on_drift: str) -> bool:
    """Whether the drift check turns the drop away: under ``reject``, when a feature drifted or
    the check could not run (a drop that cannot be compared is not known to be alike)."""
    return on_drift == "reject" and drift is not None and bool(drift.get("drifted") or drift.get("error"))


def last_line(text: str) -> str:
    """The last non-empty line of a command's output (where segpipe puts its one-line error)."""
    return next((line for line in reversed(text.strip().splitlines()) if line.strip()), "")


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_drift(drift: dict[str, Any], on_drift: str) -> list[str]:
    """The drift section of the report: a table of every feature, or why there is none."""
    lines = ["", "## Drift", ""]
    if drift.get("skipped"):
        return lines + [f"Not measured: {drift['skipped']}."]
    if drift.get("error"):
        return lines + ["`segpipe drift` failed:", "", "```", drift["error"].strip()[-2000:], "```"]
    ref = drift["reference"]
    model = drift.get("model")
    trained = ("" if model is None else "; the champion was trained on it" if model.get("trained_on") ==
               ref.get("manifest_sha256") else "; the champion was trained on other shards")
    verdict = (f"**drifted**: {', '.join(drift['drifted_features'])}" if drift["drifted"] else "**no drift**")
    lines += [f"Against `{SHARDS}` ({ref['split']}, {ref['images']} images{trained}): {verdict}.", "",
              "| feature | measure | value | threshold | drifted | reference | drop |", "|---|---|---|---|---|---|---|"]
    for name, f in drift["features"].items():
        sides = ["" if f.get(k) is None else f"{f[k]:.4g}" for k in ("reference", "input")]
        lines.append(f"| {name} | {f['measure']} | {f['value']:.4f} | {f['threshold']:g} | "
                     f"{'**yes**' if f['drifted'] else 'no'} | {sides[0]} | {sides[1]} |")
    lines += [f"- {name}: skipped, {_cell(why)}" for name, why in drift.get("skipped_features", {}).items()]
    if drift["drifted"]:
        lines += ["", "`ingest.on_drift: reject`: the drop is turned away." if on_drift == "reject" else
                  "`ingest.on_drift: warn`: the drop is versioned anyway (a new site is expected to drift; "
                  "retraining is how the model catches up)."]
    return lines


def render_frames(frames: dict[str, Any]) -> list[str]:
    """The report's list of the drop's frames most worth labelling."""
    lines = ["", "## Frames to label first", ""]
    if frames.get("skipped"):
        return lines + [f"Not ranked: {frames['skipped']}."]
    if frames.get("error"):
        return lines + ["`segpipe select` failed:", "", "```", frames["error"].strip()[-2000:], "```"]
    lines += [f"The champion's top {len(frames['frames'])} of {frames['pool']} frames (`segpipe select`, "
              f"{frames['strategy']}; score: its uncertainty):", "", "| rank | file | score |", "|---|---|---|"]
    lines += [f"| {f['rank']} | {_cell(f['file'])} | {f['score']} |" for f in frames["frames"]]
    return lines


def rejection_message(drop: Path, report: dict[str, Any], max_quarantined: int) -> str:
    if report.get("error"):
        return f"{drop}: rejected, the converter could not read it: {report['error'].strip()}"
    entries = report.get("quarantine", [])
    head = "; ".join(f"{e.get('file')}: {e.get('item')}: {e.get('reason')}" for e in entries[:5])
    more = f" (+{len(entries) - 5} more)" if len(entries) > 5 else ""
    if not entries:
        return f"{drop}: rejected, no valid image in the drop"
    return f"{drop}: rejected, {len(entries)} quarantined item(s) (at most {max_quarantined} allowed): {head}{more}"


# --------------------------------------------------------------------------------------
# Tasks (I/O)
# --------------------------------------------------------------------------------------


def _dvc(*args: str) -> list[str]:
    return commands.python_tool("dvc") + list(args)


def push_remote(repo: Path, p: IngestParams) -> str | None:
    """The DVC remote to push to, None when pushing is off or no remote is configured.

    Checked before anything changes, so a misconfigured remote rejects the ingest up front.
    """
    if not p.push:
        return None
    listed = commands.run(_dvc("remote", "list"), cwd=repo, echo=False, timeout_s=p.timeout_s).output
    remotes = [line.split()[0] for line in listed.splitlines() if line.strip()]
    if not remotes:
        return None
    if p.remote:
        if p.remote not in remotes:
            raise ParamsError(f"ingest.remote = {p.remote!r}: not a DVC remote of {repo}; configured: {', '.join(remotes)}")
        return p.remote
    default = commands.run(_dvc("remote", "default"), cwd=repo, check=False, echo=False, timeout_s=p.timeout_s)
    name = default.output.strip().splitlines()[-1].strip() if default.returncode == 0 and default.output.strip() else ""
    if name not in remotes:
        raise ParamsError(f"ingest.remote is empty and {repo} has no default DVC remote; configured: "
                          f"{', '.join(remotes)} (set ingest.remote, or `dvc remote default NAME`)")
    return name


@task(cache_policy=NO_CACHE)
def validate_drop(drop: Path, layout: dict[str, Path | None], params_file: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``segpipe validate`` on the drop with the repository's convert params; the report dict.

    A drop the converter cannot read at all (bad JSON, missing category...) gives
    ``{"error": message}`` instead of counts.
    """
    with tempfile.TemporaryDirectory(prefix="segpipe-ingest-") as tmp:
        report_path = Path(tmp) / "report.json"
        argv = commands.python_tool("segpipe") + [
            "validate", "--format", "coco", "--annotations", str(layout["annotations"]),
            "--images", str(layout["images"]), "--report", str(report_path), "--no-progress",
        ]
        if layout["masks"] is not None:
            argv += ["--masks", str(layout["masks"])]
        if params_file.is_file():
            argv += ["--params", str(params_file)]
        done = commands.run(argv, cwd=drop, check=False, timeout_s=timeout_s)
        if not report_path.is_file():  # the converter could not read the drop at all
            return {"error": done.output.strip() or f"segpipe validate exited with status {done.returncode}"}
        # A report with a non-zero exit (no valid image) is still the report: accepted() judges it.
        return json.loads(report_path.read_text())


def _segpipe_args(repo: Path, params_file: Path, overrides: list[str]) -> list[str]:
    args = ["--params", str(params_file)] if params_file.is_file() else []
    return args + [a for o in overrides for a in ("--set", o)]


def has_champion(repo: Path) -> bool:
    """Whether the repository's registry has a champion."""
    from segpipe.registry import read_index

    return bool(read_index(repo / REGISTRY)["aliases"].get("champion"))


@task(cache_policy=NO_CACHE)
def measure_drift(repo: Path, drop: Path, params_file: Path, overrides: list[str], champion: bool,
                  timeout_s: float) -> dict[str, Any]:
    """``segpipe drift`` of the drop against the repository's shards (and the champion, when there
    is one): its JSON report, ``{"skipped": why}`` without reference shards, ``{"error": output}``
    when it fails."""
    reference = repo / SHARDS
    if not (reference / "manifest.json").is_file():
        return {"skipped": f"no reference shard set at {SHARDS} (`dvc pull` or `dvc repro convert` makes it)"}
    with tempfile.TemporaryDirectory(prefix="segpipe-drift-") as tmp:
        out = Path(tmp) / "drift.json"
        argv = commands.python_tool("segpipe") + [
            "drift", "--reference", str(reference), "--input", str(drop), "--json", str(out),
            "--registry", str(repo / REGISTRY), *([] if champion else ["--no-model"]),
            *_segpipe_args(repo, params_file, overrides)]
        done = commands.run(argv, cwd=repo, check=False, timeout_s=timeout_s)
        if done.returncode != 0 or not out.is_file():
            return {"error": done.output.strip() or f"segpipe drift exited with status {done.returncode}"}
        drift = json.loads(out.read_text())
    drift["skipped_features"] = drift.pop("skipped", {})  # "skipped" alone means: not measured at all
    return drift


@task(cache_policy=NO_CACHE)
def rank_frames(repo: Path, images: Path, params_file: Path, overrides: list[str], k: int,
                timeout_s: float) -> dict[str, Any]:
    """``segpipe select`` with the champion on the drop's images: ``{"frames": [{"rank", "file",
    "score"}], "pool", "strategy"}``, or ``{"error": output}`` when it fails."""
    with tempfile.TemporaryDirectory(prefix="segpipe-select-") as tmp:
        argv = commands.python_tool("segpipe") + [
            "select", "--model", "champion", "--registry", str(repo / REGISTRY), "--input", str(images),
            "--k", str(k), "--out", tmp, "--no-progress", *_segpipe_args(repo, params_file, overrides)]
        done = commands.run(argv, cwd=repo, check=False, timeout_s=timeout_s)
        table, summary = Path(tmp) / "selected.csv", Path(tmp) / "summary.json"
        if done.returncode != 0 or not table.is_file():
            return {"error": done.output.strip() or f"segpipe select exited with status {done.returncode}"}
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        info = json.loads(summary.read_text())
    frames = [{"rank": int(r["rank"]), "file": Path(r["file"]).relative_to(images).as_posix(), "score": r["score"]}
              for r in rows]
    return {"frames": frames, "pool": info["frames"], "strategy": info["strategy"]}


def _copy_collection(layout: dict[str, Path | None], dest: Path) -> None:
    # Only the collection's parts are copied: stray files beside them in the drop are not data.
    with atomic_dir(dest) as tmp:
        shutil.copytree(layout["images"], tmp / "images")
        (tmp / "annotations").mkdir()
        shutil.copy2(layout["annotations"], tmp / "annotations" / "instances.json")
        if layout["masks"] is not None:
            shutil.copytree(layout["masks"], tmp / "masks")
        if layout["classes"] is not None:
            shutil.copy2(layout["classes"], tmp / "classes.json")


@task(cache_policy=NO_CACHE)
def add_collection(repo: Path, layout: dict[str, Path | None], name: str, images: int, timeout_s: float) -> str:
    """Copy the drop to ``data/raw/NAME``, ``dvc add`` it and commit its ``.dvc`` file; the commit sha.

    On any failure the copy, the ``.dvc`` file and the ``.gitignore`` change are undone.
    """
    rel = RAW / name
    dest, dvc_file, gitignore = repo / rel, repo / rel.with_name(name + ".dvc"), repo / RAW / ".gitignore"
    ignore_before = gitignore.read_bytes() if gitignore.is_file() else None
    paths = [str(rel.with_name(name + ".dvc")), str(RAW / ".gitignore")]
    try:
        _copy_collection(layout, dest)
        commands.run(_dvc("add", str(rel)), cwd=repo, timeout_s=timeout_s)
        commands.run(["git", "add", "--", *paths], cwd=repo, timeout_s=timeout_s)
        message = f"ingest: add {rel} ({images} images)\n\nVersioned with `dvc add` by the segpipe ingest flow."
        # Committing only these paths leaves anything else staged in the index alone.
        commands.run(["git", "commit", "-q", "-m", message, "--", *paths], cwd=repo, timeout_s=timeout_s)
    except BaseException:
        commands.run(["git", "reset", "-q", "--", *paths], cwd=repo, check=False, echo=False)
        shutil.rmtree(dest, ignore_errors=True)
        dvc_file.unlink(missing_ok=True)
        if ignore_before is None:
            gitignore.unlink(missing_ok=True)
        else:
            gitignore.write_bytes(ignore_before)
        raise
    return commands.run(["git", "rev-parse", "HEAD"], cwd=repo, echo=False).output.strip()


@task(cache_policy=NO_CACHE)
def push_collection(repo: Path, name: str, remote: str, timeout_s: float) -> None:
    """``dvc push`` the new collection (only its ``.dvc`` target) to ``remote``."""
    commands.run(_dvc("push", "-r", remote, str(RAW / f"{name}.dvc")), cwd=repo, timeout_s=timeout_s)


# --------------------------------------------------------------------------------------
# Flow
# --------------------------------------------------------------------------------------


def _preflight(repo: Path, name: str) -> None:
    if not (repo / ".git").exists() or not (repo / ".dvc").is_dir():
        raise DropRejected(f"{repo}: not the root of a git repository with DVC initialised (git init; dvc init)")
    for existing in (repo / RAW / name, repo / RAW / f"{name}.dvc"):
        if existing.exists():
            raise DropRejected(f"{existing} already exists: collection {name!r} is taken and versioned data "
                               "is never replaced; choose another --name")


@flow(name="ingest", log_prints=True)
def ingest_flow(drop: Path, name: str | None = None, repo: Path = Path("."),
                params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Validate ``drop``, measure its drift (and rank its frames, with a champion), and version it
    as ``data/raw/NAME`` (default: the drop folder's name).

    Raises DropRejected (the run is Failed) with the validation report when the drop is invalid,
    or when it drifted and ``ingest.on_drift`` is ``reject``; nothing in the repository changes
    then. Returns the collection path, commit, remote, and the drift and top-frames sections.
    """
    drop, repo = Path(drop).resolve(), Path(repo).resolve()
    params: IngestParams = load_section("ingest", repo / params_file, overrides or [])
    name = check_name(name or drop.name)
    _preflight(repo, name)
    layout = drop_layout(drop)
    if outside := outside_paths(drop, layout):
        more = f" (+{len(outside) - 5} more)" if len(outside) > 5 else ""
        raise DropRejected(f"{drop}: rejected, {len(outside)} path(s) lead outside the drop (every image must lie "
                           f"inside {layout['images']}): {'; '.join(outside[:5])}{more}")
    remote = push_remote(repo, params)

    report = validate_drop(drop, layout, repo / params_file, params.timeout_s)
    ok = accepted(report, params.max_quarantined)
    drift = frames = None
    if ok:  # an invalid drop is not looked at further
        select: SelectParams = load_section("select", repo / params_file, overrides or [])
        champion = has_champion(repo)
        drift = measure_drift(repo, drop, repo / params_file, overrides or [], champion, params.timeout_s)
        frames = ({"skipped": f"no champion in {REGISTRY}"} if not champion else
                  {"skipped": "select.report_top is 0"} if select.report_top == 0 else
                  rank_frames(repo, layout["images"], repo / params_file, overrides or [], select.report_top,
                              params.timeout_s))
    turned_away = drift_rejects(drift, params.on_drift)
    create_markdown_artifact(
        markdown=render_report(drop, name, report, ok and not turned_away, params.max_quarantined, drift, frames,
                               params.on_drift),
        key=ARTIFACT_KEY, description=f"ingest of {drop}: {'accepted' if ok and not turned_away else 'rejected'}")
    if not ok:
        raise DropRejected(rejection_message(drop, report, params.max_quarantined))
    if turned_away:
        why = (f"drifted: {', '.join(drift['drifted_features'])}" if drift.get("drifted") else
               f"its drift could not be measured: {last_line(drift['error'])}")
        raise DropRejected(f"{drop}: rejected by ingest.on_drift = reject, {why} (against {SHARDS}); "
                           "see the drift section of the ingest report")

    commit = add_collection(repo, layout, name, report.get("images_ok", 0), params.timeout_s)
    if remote is not None:
        push_collection(repo, name, remote, params.timeout_s)
    print(f"ingested {drop} as {RAW / name} in commit {commit[:12]}"
          + (f", pushed to DVC remote {remote!r}" if remote else ", no DVC remote to push to"))
    return {"collection": str(RAW / name), "dvc_file": str(RAW / f"{name}.dvc"), "commit": commit,
            "remote": remote, "report": report, "drift": drift, "top_frames": frames}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ingest", description=__doc__.split("\n")[0])
    parser.add_argument("drop", type=Path, help="folder with images/, annotations/instances.json[, masks/]")
    parser.add_argument("--name", help="collection name under data/raw (default: the drop folder's name)")
    parser.add_argument("--repo", type=Path, default=Path("."), help="repository root (default: .)")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    state = ingest_flow(drop=args.drop, name=args.name, repo=args.repo, params_file=args.params,
                        overrides=args.overrides, return_state=True)
    if not state.is_completed():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
