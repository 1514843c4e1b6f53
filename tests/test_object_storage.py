"""segpipe on a real S3 server (moto's server mode on loopback), configured only through the
standard AWS_* variables, as a user would run it, every command a subprocess given its URIs on the
command line: `segpipe convert` writes the shards to s3://, `segpipe stats` and `segpipe evaluate`
read them, `segpipe train` reads them through Ray Data with its checkpoints under
train.storage_path=s3://..., recovering from a crash at epoch 2 from the S3 checkpoint, and
`segpipe predict` reads its images from s3://. `segpipe validate` reads local files only, and says so
naming the argument."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from segpipe.progress import LOG_DIR_ENV
from segpipe.shards import manifest_hash, open_shards
from segpipe.stages.train import FAIL_AT_EPOCH_ENV

PARAMS = textwrap.dedent("""\
    convert:
      val_fraction: 0.25
      workers: 1
    train:
      architectures: [unet]
      epochs: 3
      budget_s: 0
      batch_size: 4
      image_size: 48
      workers: 1
      threads: 1
      max_failures: 1
      num_to_keep: 1
      model: {{unet: {{base_channels: 4, depth: 2}}}}
      overrides: {{}}
      storage_path: {storage}
    """)


def segpipe(*args: str, cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "segpipe", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"segpipe {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def test_convert_refuses_a_uri_input_and_an_unknown_scheme_naming_the_argument(tiny_raw, tmp_path):
    env = {**os.environ}
    for args, message in (
        (["--input", "s3://bucket/raw", "--out", str(tmp_path / "x")],
         "segpipe convert: error: --input: s3://bucket/raw is an object-store URI; only a local path"),
        (["--input", str(tiny_raw), "--out", "ftp://host/shards"],
         "segpipe convert: error: --out: unsupported scheme 'ftp' in 'ftp://host/shards'; valid: s3://, gs://, "
         "file:// or a local path"),
    ):
        proc = subprocess.run([sys.executable, "-m", "segpipe", "convert", "--format", "coco", *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_every_command_takes_its_uris_from_the_command_line(s3, tiny_raw, tmp_path):
    work = tmp_path / "work"  # the commands' working directory: nothing may land here
    work.mkdir()
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.format(storage=s3.uri("ray")))
    # AWS_* point at the server; the commands' logs of Ray's messages go outside the working directory
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, LOG_DIR_ENV: str(tmp_path / "logs")}
    shards = s3.uri("shards")

    out = segpipe("convert", "--format", "coco", "--input", str(tiny_raw), "--out", shards, "--no-progress",
                  "--params", str(params), cwd=work, env=env)
    assert f"wrote {shards}: train " in out
    keys = s3.files("shards")
    assert "manifest.json" in keys and any(k.startswith("train/part-") for k in keys)
    assert list(work.iterdir()) == []  # no `s3:` folder, nothing local at all

    log = segpipe("train", "--arch", "unet", "--shards", shards, "--out", str(tmp_path / "unet"),
                  "--params", str(params), cwd=work, env={**env, FAIL_AT_EPOCH_ENV: "2"})
    assert "injected failure at epoch 2" in (tmp_path / "logs" / "train-unet.log").read_text()  # Ray Train's report
    assert "resumed from the checkpoint of epoch 1" in log  # from S3: there is no local Ray storage
    meta = json.loads((tmp_path / "unet" / "checkpoint" / "meta.json").read_text())
    assert [r["resumed_from_epoch"] for r in meta["restarts"]] == [1]
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]
    assert meta["shards_manifest_sha256"] == manifest_hash(shards)
    metrics = json.loads((tmp_path / "unet" / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["restarts"] == 1
    # the finished run's checkpoints (and the crash marker) are deleted from the bucket; nothing was ever local
    assert not [k for k in s3.files("ray") if "checkpoint_" in k or k.endswith("failed-once")], s3.files("ray")
    assert list(work.iterdir()) == [] and not list(tmp_path.rglob(".ray_results"))

    out = segpipe("evaluate", "--model", str(tmp_path / "unet" / "checkpoint"), "--shards", shards, "--out",
                  str(tmp_path / "eval"), "--params", str(params), "--set", "evaluate.num_overlays=1", cwd=work, env=env)
    assert f"-> {tmp_path / 'eval'}" in out
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["shards_manifest_sha256"] == result["trained_on_shards_manifest_sha256"] == manifest_hash(shards)
    assert result["images"] == open_shards(shards).rows("val") > 0 and 0 <= result["pixel_acc"] <= 1

    stats = json.loads(segpipe("stats", shards, "--json", cwd=work, env=env))
    assert sum(s["images"] for s in stats.values()) == 16

    fs = s3.fs()  # two site photos in the bucket, predicted from there, written locally
    for name in sorted(p.name for p in (tiny_raw / "images").iterdir())[:2]:
        with fs.open_output_stream(f"{s3.bucket}/site/{name}") as f:
            f.write((tiny_raw / "images" / name).read_bytes())
    segpipe("predict", "--model", str(tmp_path / "unet" / "checkpoint"), "--input", s3.uri("site"), "--out",
            str(tmp_path / "pred"), "--params", str(params), cwd=work, env=env)
    assert len(list((tmp_path / "pred" / "labels").glob("*.png"))) == 2

    proc = subprocess.run([sys.executable, "-m", "segpipe", "validate", "--format", "coco", "--input", s3.uri("raw")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().endswith("only a local path is accepted here") or \
        "--input: s3://" in proc.stderr, proc.stderr
    assert list(work.iterdir()) == []
