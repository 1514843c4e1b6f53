"""A DVC remote on a real S3 server (moto, on loopback), set up as docs/production.md says: `dvc remote
add -d` with the server's endpointurl, `dvc push`, and `dvc pull` in a fresh clone restores
data/raw byte for byte; the Prefect ingest flow pushes a new collection to the same kind of remote."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from pipelines import commands
from segpipe.params import SynthParams

DVC = commands.python_tool("dvc")


def synth_collection(path: Path, images: int = 4) -> Path:
    from segpipe.stages import synth

    synth.run(SynthParams(images=images, size=(64, 64), seed=5, workers=1), path)
    return path


def add_s3_remote(repo: Path, s3, env: dict[str, str]) -> None:
    """The documented set-up: the bucket in the remote's URL, the server in its endpointurl."""
    commands.run(DVC + ["remote", "add", "-d", "store", s3.uri("dvc")], cwd=repo, env=env, echo=False)
    commands.run(DVC + ["remote", "modify", "store", "endpointurl", s3.endpoint], cwd=repo, env=env, echo=False)


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_dvc_push_to_s3_then_pull_in_a_fresh_clone_restores_data_raw(s3, tmp_path, init_repo, git_cmd):
    # Only the standard credentials in the environment: the server is the remote's endpointurl.
    env = commands.tool_env()
    env.pop("AWS_ENDPOINT_URL", None)
    repo = init_repo(tmp_path / "repo", {"README.md": "data\n"})
    synth_collection(repo / "data" / "raw" / "site-a")
    commands.run(DVC + ["add", "data/raw"], cwd=repo, env=env, echo=False)
    add_s3_remote(repo, s3, env)
    git_cmd(repo, "add", "-A")
    git_cmd(repo, "commit", "-q", "-m", "data/raw on the S3 remote")
    commands.run(DVC + ["push"], cwd=repo, env=env, echo=False)
    pushed = s3.files("dvc")
    assert pushed and all(k.startswith("files/md5/") for k in pushed)

    clone = tmp_path / "clone"
    git_cmd(tmp_path, "clone", "-q", str(repo), str(clone))
    assert not (clone / "data" / "raw").exists()
    commands.run(DVC + ["pull"], cwd=clone, env=env, echo=False)
    restored, original = files_of(clone / "data" / "raw"), files_of(repo / "data" / "raw")
    assert len(original) == 4 + 4 + 1 + 1 and restored == original  # images, masks, instances.json, classes.json


@pytest.mark.slow
def test_ingest_flow_pushes_to_the_s3_remote(s3, tmp_path, prefect_harness, init_repo, git_cmd):
    from pipelines.ingest import ingest_flow

    params = textwrap.dedent("""\
        convert:
          workers: 1
        ingest:
          timeout_s: 300
        """)
    repo = init_repo(tmp_path / "repo", {"params.yaml": params})
    add_s3_remote(repo, s3, commands.tool_env())
    git_cmd(repo, "commit", "-q", "-am", "S3 remote")

    result = ingest_flow(drop=synth_collection(tmp_path / "drop"), name="site-a", repo=repo)

    assert result["remote"] == "store"
    out = yaml.safe_load((repo / "data/raw/site-a.dvc").read_text())["outs"][0]
    listing = json.loads(s3.read(f"dvc/files/md5/{out['md5'][:2]}/{out['md5'][2:]}"))  # the directory's .dir
    assert len(listing) == out["nfiles"] == 4 + 4 + 1 + 1
    pushed = set(s3.files("dvc"))
    assert {f"files/md5/{e['md5'][:2]}/{e['md5'][2:]}" for e in listing} <= pushed  # every file of it
