"""The ingest flow: a valid synthetic COCO drop is versioned (copy, dvc add, git commit, dvc push);
an invalid one is rejected with the report and nothing changes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from pipelines.ingest import (
    RAW,
    REGISTRY,
    SHARDS,
    DropRejected,
    accepted,
    check_name,
    drift_rejects,
    drop_layout,
    outside_paths,
    render_report,
)
from segpipe.params import SynthParams

REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS = textwrap.dedent("""\
    convert:
      workers: 1
    ingest:
      timeout_s: 300
    """)


def make_drop(path: Path, images: int = 4, **site) -> Path:
    from segpipe.stages import synth

    synth.run(SynthParams(images=images, size=(64, 64), seed=5, workers=1, **site), path)
    return path


def test_raw_root_matches_the_convert_stage():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert str(RAW) in [str(d) for d in stages["convert"]["deps"]]


def test_reference_shards_and_registry_match_the_pipeline():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert [str(SHARDS)] == [str(o) for o in stages["convert"]["outs"]]
    assert str(REGISTRY) in [str(d) for d in stages["promote"]["deps"]]
    assert f"--registry {REGISTRY}" in stages["promote"]["cmd"]


def test_check_name():
    assert check_name("site-42_b.v2") == "site-42_b.v2"
    for bad in ("", "../x", "a/b", ".hidden", "x.dvc", "a b"):
        with pytest.raises(DropRejected, match="collection name"):
            check_name(bad)


def test_drop_layout_names_what_is_missing(tmp_path):
    with pytest.raises(DropRejected, match="drop folder not found"):
        drop_layout(tmp_path / "nope")
    (tmp_path / "images").mkdir()
    with pytest.raises(DropRejected, match="annotations/instances.json"):
        drop_layout(tmp_path)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances.json").write_text("{}")
    layout = drop_layout(tmp_path)
    assert layout["masks"] is None and layout["classes"] is None


def test_accepted_and_report():
    bad = {"images": 2, "images_ok": 1, "images_quarantined": 1, "annotations_quarantined": 0,
           "dataset_problems": 0, "quarantine": [{"file": "images/a.jpg", "item": "image 1", "reason": "not | decodable"}]}
    assert not accepted(bad, 0) and accepted(bad, 1)
    assert not accepted({"images": 0, "images_ok": 0, "quarantine": []}, 5)
    assert not accepted({"error": "bad JSON"}, 100)
    md = render_report(Path("/d"), "x", bad, False, 0)
    assert "**Rejected**" in md and "| images/a.jpg | image 1 | not \\| decodable |" in md


@pytest.mark.slow
def test_ingest_valid_drop_commits_and_pushes(tmp_path, prefect_harness, init_repo, git_cmd):
    from pipelines import commands
    from pipelines.ingest import ingest_flow

    repo = init_repo(tmp_path / "repo", {"params.yaml": PARAMS})
    remote = tmp_path / "remote"
    commands.run(commands.python_tool("dvc") + ["remote", "add", "-d", "store", str(remote)], cwd=repo, echo=False)
    git_cmd(repo, "commit", "-q", "-am", "remote")
    head = git_cmd(repo, "rev-parse", "HEAD")
    drop = make_drop(tmp_path / "drop")
    (drop / "notes.txt").write_text("not part of the collection")

    result = ingest_flow(drop=drop, name="site-a", repo=repo)

    dest = repo / "data/raw/site-a"
    assert sorted(p.name for p in (dest / "images").iterdir()) == [f"site_{i:06d}.jpg" for i in range(4)]
    assert (dest / "annotations/instances.json").read_bytes() == (drop / "annotations/instances.json").read_bytes()
    assert (dest / "masks").is_dir() and (dest / "classes.json").is_file() and not (dest / "notes.txt").exists()
    assert result["commit"] == git_cmd(repo, "rev-parse", "HEAD") != head
    assert git_cmd(repo, "rev-parse", "HEAD~1") == head
    committed = [line for line in git_cmd(repo, "show", "--name-only", "--format=%s", "HEAD").splitlines() if line]
    assert committed[0] == "ingest: add data/raw/site-a (4 images)"
    assert sorted(committed[1:]) == ["data/raw/.gitignore", "data/raw/site-a.dvc"]
    assert "/site-a" in (repo / "data/raw/.gitignore").read_text().splitlines()
    assert git_cmd(repo, "status", "--porcelain") == ""
    dvc_out = yaml.safe_load((repo / "data/raw/site-a.dvc").read_text())["outs"][0]
    assert dvc_out["path"] == "site-a" and dvc_out["nfiles"] == 4 + 4 + 1 + 1
    assert result["remote"] == "store"
    pushed = [p for p in remote.rglob("*") if p.is_file()]
    assert len(pushed) >= dvc_out["nfiles"]  # every file, plus the directory listing


@pytest.mark.slow
def test_ingest_invalid_drop_is_rejected_and_changes_nothing(tmp_path, prefect_harness, init_repo, git_cmd):
    from pipelines.ingest import ingest_flow

    repo = init_repo(tmp_path / "repo", {"params.yaml": PARAMS})
    head = git_cmd(repo, "rev-parse", "HEAD")
    drop = make_drop(tmp_path / "drop")
    (drop / "images/site_000001.jpg").write_bytes(b"not a jpeg")
    coco = json.loads((drop / "annotations/instances.json").read_text())
    ann = next(a for a in coco["annotations"] if isinstance(a["segmentation"], list))
    ann["segmentation"] = [[1.0, 2.0, 3.0]]  # 3 numbers: not a polygon
    (drop / "annotations/instances.json").write_text(json.dumps(coco))

    state = ingest_flow(drop=drop, name="site-b", repo=repo, return_state=True)

    assert state.is_failed()
    assert "rejected, 2 quarantined item(s) (at most 0 allowed)" in state.message
    assert "site_000001.jpg" in state.message and f"annotation {ann['id']}: polygon" in state.message
    assert git_cmd(repo, "rev-parse", "HEAD") == head and git_cmd(repo, "status", "--porcelain") == ""
    assert not (repo / "data").exists()

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    (report,) = [a for a in artifacts if a.key == "ingest-report"]
    assert "**Rejected**: nothing was changed" in report.data
    assert "not a decodable image" in report.data


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["copy", "commit"])
def test_a_failure_after_the_copy_starts_undoes_everything(tmp_path, prefect_harness, init_repo, git_cmd, monkeypatch,
                                                           failure):
    """A full disk halfway through the copy, or a git hook refusing the commit after `dvc add`:
    the repository is as before, and the same name ingests once the cause is gone."""
    import errno
    import shutil

    from pipelines.ingest import ingest_flow

    repo = init_repo(tmp_path / "repo", {"params.yaml": PARAMS})
    head = git_cmd(repo, "rev-parse", "HEAD")
    drop = make_drop(tmp_path / "drop")
    hook = repo / ".git/hooks/pre-commit"
    if failure == "copy":  # the images are copied, then the disk fills on the annotations
        copy2 = shutil.copy2

        def full_disk(src, dst, *args, **kwargs):
            if Path(src).name == "instances.json":
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
            return copy2(src, dst, *args, **kwargs)

        monkeypatch.setattr(shutil, "copy2", full_disk)
    else:
        hook.write_text("#!/bin/sh\necho 'pre-commit: refused by policy' >&2\nexit 1\n")
        hook.chmod(0o755)

    state = ingest_flow(drop=drop, name="site-c", repo=repo, return_state=True)

    assert state.is_failed()
    assert ("No space left on device" if failure == "copy" else "refused by policy") in state.message
    assert git_cmd(repo, "rev-parse", "HEAD") == head and git_cmd(repo, "status", "--porcelain") == ""
    raw = repo / "data/raw"  # no copy, no hidden temporary, no .dvc file, no .gitignore (DVC's cache may keep files)
    assert not raw.exists() or list(raw.iterdir()) == []

    monkeypatch.undo()
    hook.unlink(missing_ok=True)
    result = ingest_flow(drop=drop, name="site-c", repo=repo)
    assert result["commit"] == git_cmd(repo, "rev-parse", "HEAD") != head
    assert sorted(p.name for p in raw.iterdir()) == [".gitignore", "site-c", "site-c.dvc"]


@pytest.mark.slow
def test_ingest_refuses_an_existing_collection(tmp_path, prefect_harness, init_repo, git_cmd):
    from pipelines.ingest import ingest_flow

    repo = init_repo(tmp_path / "repo", {"params.yaml": PARAMS, "data/raw/site-c.dvc": "outs: []\n"})
    head = git_cmd(repo, "rev-parse", "HEAD")
    drop = make_drop(tmp_path / "site-c", images=1)
    state = ingest_flow(drop=drop, repo=repo, return_state=True)
    assert state.is_failed() and "site-c.dvc already exists" in state.message
    assert git_cmd(repo, "rev-parse", "HEAD") == head and not (repo / "data/raw/site-c").exists()


def _escaping_drop(tmp_path: Path) -> tuple[Path, Path]:
    """A valid drop, plus two images whose file_name reaches outside it (one relative, one absolute)."""
    from PIL import Image

    drop = make_drop(tmp_path / "drop", images=3)
    secret = tmp_path / "secret" / "photo.jpg"
    secret.parent.mkdir()
    Image.new("RGB", (64, 64)).save(secret)
    coco = json.loads((drop / "annotations/instances.json").read_text())
    coco["images"] += [{"id": 1001, "file_name": "../../secret/photo.jpg", "height": 64, "width": 64},
                       {"id": 1002, "file_name": str(secret), "height": 64, "width": 64}]
    (drop / "annotations/instances.json").write_text(json.dumps(coco))
    return drop, secret


def test_outside_paths_names_image_ids_file_names_and_symlinks(tmp_path):
    drop, secret = _escaping_drop(tmp_path)
    (drop / "images" / "link.jpg").symlink_to(secret)
    found = outside_paths(drop, drop_layout(drop))
    assert len(found) == 3
    assert "image 1001: file_name '../../secret/photo.jpg' climbs out of its folder" in found[0]
    assert f"image 1002: file_name {str(secret)!r} is an absolute path" in found[1]
    assert found[2] == f"{drop / 'images' / 'link.jpg'}: symlink to {secret}, outside the drop"
    (drop / "images" / "link.jpg").unlink()
    (drop / "images" / "inside.jpg").symlink_to(drop / "images" / "site_000000.jpg")  # stays inside: fine
    assert len(outside_paths(drop, drop_layout(drop))) == 2


@pytest.mark.slow
def test_ingest_rejects_file_names_outside_the_drop_whatever_max_quarantined(tmp_path, prefect_harness, init_repo,
                                                                             git_cmd):
    from pipelines.ingest import ingest_flow

    repo = init_repo(tmp_path / "repo", {"params.yaml": PARAMS + "  max_quarantined: 100\n"})
    head = git_cmd(repo, "rev-parse", "HEAD")
    drop, _ = _escaping_drop(tmp_path)
    state = ingest_flow(drop=drop, name="site-x", repo=repo, return_state=True)
    assert state.is_failed()
    assert "rejected, 2 path(s) lead outside the drop" in state.message
    assert "image 1001: file_name '../../secret/photo.jpg'" in state.message
    assert git_cmd(repo, "rev-parse", "HEAD") == head and not (repo / "data").exists()


# --------------------------------------------------------------------------------------
# Drift and the frames worth labelling
# --------------------------------------------------------------------------------------

DRIFT = {
    "reference": {"split": "train", "images": 12, "manifest_sha256": "m" * 64},
    "model": {"ref": "champion", "arch": "unet", "trained_on": "m" * 64},
    "drifted": True, "drifted_features": ["brightness", "red"],
    "features": {"brightness": {"measure": "ks", "value": 0.9, "threshold": 0.3, "drifted": True, "p_value": 1e-9,
                                "reference": 110.0, "input": 66.0},
                 "green": {"measure": "psi", "value": 0.02, "threshold": 0.25, "drifted": False, "reference": None,
                           "input": None}},
    "skipped_features": {"class_shares": "the drop has no masks/ (label maps)"},
}
OK = {"images": 4, "images_ok": 4, "quarantine": []}


def test_report_has_a_drift_section_and_the_top_frames():
    frames = {"frames": [{"rank": 1, "file": "site_000002.jpg", "score": "0.41"}], "pool": 4, "strategy": "diverse"}
    md = render_report(Path("/d"), "x", OK, True, 0, DRIFT, frames, "warn")
    assert "**Accepted** as `data/raw/x`" in md
    assert "Against `data/shards` (train, 12 images; the champion was trained on it): **drifted**: brightness, red" in md
    assert "| brightness | ks | 0.9000 | 0.3 | **yes** | 110 | 66 |" in md and "| green | psi | 0.0200 | 0.25 | no |  |  |" in md
    assert "- class_shares: skipped, the drop has no masks/ (label maps)" in md
    assert "`ingest.on_drift: warn`: the drop is versioned anyway" in md
    assert "## Frames to label first" in md and "| 1 | site_000002.jpg | 0.41 |" in md
    rejected = render_report(Path("/d"), "x", OK, False, 0, DRIFT, {"skipped": "no champion in models/registry"},
                             "reject")
    assert "**Rejected**: nothing was changed" in rejected and "`ingest.on_drift: reject`: the drop is turned away." in rejected
    assert "Not ranked: no champion in models/registry." in rejected
    assert "Not measured: no reference shard set" in render_report(Path("/d"), "x", OK, True, 0,
                                                                   {"skipped": "no reference shard set"})
    assert "## Drift" not in render_report(Path("/d"), "x", OK, True, 0)


def test_drift_rejects_only_under_reject():
    assert drift_rejects(DRIFT, "reject") and not drift_rejects(DRIFT, "warn")
    assert not drift_rejects({**DRIFT, "drifted": False}, "reject")
    assert drift_rejects({"error": "segpipe drift: error: ..."}, "reject")  # not measured: not known to be alike
    assert not drift_rejects({"skipped": "no reference shard set"}, "reject") and not drift_rejects(None, "reject")


def _repo_with_champion(tmp_path: Path, init_repo, tiny_shards: Path, tiny_checkpoint, params: str) -> Path:
    """A repository with reference shards (the convert stage's output) and a champion trained on them."""
    import shutil

    from segpipe.registry import register, set_alias

    repo = init_repo(tmp_path / "repo", {"params.yaml": params, ".gitignore": "/data/shards\n/models/registry\n"})
    shutil.copytree(tiny_shards, repo / SHARDS)
    register(repo / REGISTRY, tiny_checkpoint("unet", shards=tiny_shards, base_channels=4, depth=2))
    set_alias(repo / REGISTRY, "champion", "v1", "test")
    return repo


def _report_of(state) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    (report,) = [a for a in artifacts if a.key == "ingest-report"]
    return report.data


@pytest.mark.slow
def test_a_relit_drop_is_versioned_with_a_drift_warning_and_its_top_frames(tmp_path, prefect_harness, init_repo,
                                                                            git_cmd, tiny_shards, tiny_checkpoint):
    from pipelines.ingest import ingest_flow

    repo = _repo_with_champion(tmp_path, init_repo, tiny_shards, tiny_checkpoint,
                               PARAMS + "select:\n  report_top: 3\n")
    head = git_cmd(repo, "rev-parse", "HEAD")
    drop = make_drop(tmp_path / "drop", images=8, lighting=0.5)

    state = ingest_flow(drop=drop, name="dusk", repo=repo, return_state=True)

    assert state.is_completed()
    result = state.result()
    assert git_cmd(repo, "rev-parse", "HEAD~1") == head and (repo / "data/raw/dusk/images").is_dir()
    drift = result["drift"]
    assert drift["drifted"] and "brightness" in drift["drifted_features"] and "confidence" in drift["features"]
    from segpipe.shards import open_shards

    assert drift["model"]["ref"] == "champion" and drift["reference"]["images"] == open_shards(tiny_shards).rows("train")
    frames = result["top_frames"]
    assert frames["pool"] == 8 and [f["rank"] for f in frames["frames"]] == [1, 2, 3]
    assert all((drop / "images" / f["file"]).is_file() for f in frames["frames"])
    report = _report_of(state)
    assert "**Accepted** as `data/raw/dusk`" in report and "## Drift" in report and "**drifted**:" in report
    assert "| brightness | ks |" in report and "`ingest.on_drift: warn`" in report
    assert f"| 1 | {frames['frames'][0]['file']} |" in report and "The champion's top 3 of 8 frames" in report


@pytest.mark.slow
def test_a_drifted_drop_is_rejected_under_on_drift_reject(tmp_path, prefect_harness, init_repo, git_cmd, tiny_shards,
                                                          tiny_checkpoint):
    from pipelines.ingest import ingest_flow

    repo = _repo_with_champion(tmp_path, init_repo, tiny_shards, tiny_checkpoint, PARAMS + "  on_drift: reject\n")
    head = git_cmd(repo, "rev-parse", "HEAD")
    drop = make_drop(tmp_path / "drop", images=8, lighting=0.5)

    state = ingest_flow(drop=drop, name="dusk", repo=repo, return_state=True)

    assert state.is_failed()
    assert "rejected by ingest.on_drift = reject, drifted: brightness" in state.message
    assert git_cmd(repo, "rev-parse", "HEAD") == head and not (repo / "data/raw").exists()
    report = _report_of(state)
    assert "**Rejected**: nothing was changed" in report and "the drop is turned away" in report
    assert "## Frames to label first" in report
