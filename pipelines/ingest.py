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
"""

from __future__ import annotations

import argparse
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
from segpipe.params import IngestParams, ParamsError, add_params_arguments, load_section

# The convert stage's input in dvc.yaml (tests/pipelines/test_ingest.py checks they agree).
RAW = Path("data/raw")
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


def render_report(drop: Path, name: str, report: dict[str, Any], ok: bool, max_quarantined: int) -> str:
    """The Markdown artifact of a validation: verdict, counts and the quarantine entries."""
    verdict = f"**Accepted** as `{RAW / name}`" if ok else "**Rejected**: nothing was changed"
    lines = [f"# Ingest `{drop}`", "", verdict, ""]
    if report.get("error"):
        lines += ["The converter could not read the drop:", "", "```", report["error"].strip(), "```"]
        return "\n".join(lines) + "\n"
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
    return "\n".join(lines) + "\n"


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
    """Validate ``drop`` and version it as ``data/raw/NAME`` (default: the drop folder's name).

    Raises DropRejected (the run is Failed) with the validation report when the drop is invalid;
    nothing in the repository changes then. Returns the collection path, commit and remote.
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
    create_markdown_artifact(markdown=render_report(drop, name, report, ok, params.max_quarantined),
                             key=ARTIFACT_KEY, description=f"ingest of {drop}: {'accepted' if ok else 'rejected'}")
    if not ok:
        raise DropRejected(rejection_message(drop, report, params.max_quarantined))

    commit = add_collection(repo, layout, name, report.get("images_ok", 0), params.timeout_s)
    if remote is not None:
        push_collection(repo, name, remote, params.timeout_s)
    print(f"ingested {drop} as {RAW / name} in commit {commit[:12]}"
          + (f", pushed to DVC remote {remote!r}" if remote else ", no DVC remote to push to"))
    return {"collection": str(RAW / name), "dvc_file": str(RAW / f"{name}.dvc"), "commit": commit,
            "remote": remote, "report": report}


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
