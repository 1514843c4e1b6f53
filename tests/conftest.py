"""Shared fixtures: tiny synthetic raw data and shards, built once per test session, a real S3
server (moto) with a fresh bucket per test, and throwaway git repositories."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from segpipe.params import ConvertParams, SynthParams


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> Path:
    from segpipe.stages import synth

    out = tmp_path_factory.mktemp("raw") / "synth"
    synth.run(SynthParams(images=16, size=(64, 64), seed=3, workers=1), out)
    return out


@pytest.fixture(scope="session")
def tiny_shards(tiny_raw, tmp_path_factory) -> Path:
    from segpipe.formats import get_reader
    from segpipe.stages import convert

    out = tmp_path_factory.mktemp("shards") / "shards"
    source = get_reader("coco")([tiny_raw / "annotations" / "instances.json"], tiny_raw / "images", tiny_raw / "masks")
    convert.run(ConvertParams(val_fraction=0.25, workers=1), source, out, progress=False)
    return out


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def copy_repo():
    """``copy_repo(dst)``: the files git knows (tracked, or untracked and not ignored) copied to
    ``dst``, as a fresh clone would have them."""
    import shutil

    def copy(dst: Path) -> Path:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.splitlines()
        for f in files:
            src = REPO / f
            if src.is_file():
                (dst / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst / f)
        return dst

    return copy


# --------------------------------------------------------------------------------------
# A real S3 server: moto in server mode, on loopback
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3:
    """A bucket on the test S3 server, and the standard variables that point a client at it."""

    endpoint: str
    bucket: str
    env: dict[str, str]

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def fs(self):
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(endpoint_override=self.endpoint, access_key=S3_KEYS[0], secret_key=S3_KEYS[1],
                                       region="us-east-1", allow_bucket_creation=True)

    def files(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (relative to it), sorted."""
        import pyarrow.fs

        base = "/".join([self.bucket, prefix]).rstrip("/")
        found = self.fs().get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True, recursive=True))
        return sorted(i.path[len(base) + 1:] for i in found if i.type == pyarrow.fs.FileType.File)

    def read(self, key: str) -> bytes:
        with self.fs().open_input_stream(f"{self.bucket}/{key}") as f:
            return f.read()


S3_KEYS = ("testing", "testing")  # moto accepts any key pair


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """moto's S3 server (``moto_server``, a process of its own) on a free loopback port; its URL."""
    from segpipe.cluster import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except urllib.error.HTTPError:  # it answers: it is up
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3(s3_server, tmp_path_factory, monkeypatch) -> S3:
    """A new bucket on the S3 server, with AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    and AWS_DEFAULT_REGION pointing at it (and no profile of the machine's ~/.aws in the way)."""
    import uuid

    empty = tmp_path_factory.mktemp("aws")
    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": S3_KEYS[0], "AWS_SECRET_ACCESS_KEY": S3_KEYS[1],
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(empty / "config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(empty / "credentials")}
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = S3(s3_server, f"segpipe-{uuid.uuid4().hex[:10]}", env)
    bucket.fs().create_dir(bucket.bucket)
    return bucket


# Three classes of site imagery: a stuff class and two things.
SITE_CLASSES = (
    {"id": 0, "name": "ground", "isthing": False, "color": [40, 40, 40]},
    {"id": 1, "name": "worker", "isthing": True, "color": [255, 0, 0]},
    {"id": 2, "name": "excavator", "isthing": True, "color": [0, 255, 0]},
)


def _make_tiny_checkpoint(out: Path, arch: str, *, shards: Path | None = None, seed: int = 0, image_size: int = 64,
                         detects_things: bool = False, **kwargs) -> Path:
    """A real checkpoint of ``arch`` with seeded random weights in ``out``: what :func:`tiny_checkpoint`
    makes, for fixtures of a wider scope than a test."""
    import torch

    from segpipe.checkpoint import CheckpointMeta, save_checkpoint
    from segpipe.models import build_model, default_kwargs
    from segpipe.shards import open_shards

    s = open_shards(shards) if shards is not None else None
    classes = tuple(s.classes) if s else SITE_CLASSES
    num_classes = max(int(c["id"]) for c in classes) + 1
    torch.manual_seed(seed)
    model = build_model(arch, num_classes, **kwargs)
    if detects_things:
        heads = model.detector.roi_heads
        torch.nn.init.constant_(heads.mask_predictor.mask_fcn_logits.bias, 3.0)
        with torch.no_grad():  # torchvision's label is the class id + 1
            heads.box_predictor.cls_score.bias[[int(c["id"]) + 1 for c in classes if c["isthing"]]] += 5.0
    meta = CheckpointMeta(arch=arch, num_classes=num_classes, classes=classes,
                          model_kwargs={**default_kwargs(arch), **kwargs},
                          ignore_index=s.ignore_index if s else 255, image_size=image_size,
                          params={"seed": seed}, epoch=1,
                          shards_manifest_sha256=s.manifest_sha256 if s else "x" * 64)
    return save_checkpoint(out, model, meta)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A factory of real checkpoints of registered architectures with seeded random weights:
    ``tiny_checkpoint(arch, **builder_kwargs)`` -> the checkpoint directory.

    ``shards=DIR`` takes the class table, ignore index and manifest hash from a shard set (else
    SITE_CLASSES); ``out`` is the directory (default ``tmp_path / arch``), ``image_size`` the
    training crop recorded in the meta (what export samples by default). ``detects_things=True``
    biases a Mask R-CNN towards the thing classes and positive mask logits, so that its random
    detections are things with masks (as a trained one's are), not empty stuff.
    """

    def make(arch: str, *, out: Path | None = None, **kwargs) -> Path:
        return _make_tiny_checkpoint(out or tmp_path / arch, arch, **kwargs)

    return make


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _git_repo(repo: Path) -> Path:
    """``git init`` in ``repo`` with a committer of its own and one empty commit."""
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "tests@segpipe.invalid")
    git(repo, "config", "user.name", "segpipe tests")
    git(repo, "config", "commit.gpgsign", "false")
    git(repo, "commit", "-q", "--allow-empty", "-m", "init")
    return repo


@pytest.fixture
def git_cmd():
    """``git_cmd(repo, *args)``: run git, return its stripped stdout."""
    return git


@pytest.fixture
def git_repo():
    """``git_repo(path)``: a git repository with one empty commit at ``path``."""
    return _git_repo


def _fused_result(semantic: Path, instance: Path, fusion: dict, manifest: str = "x" * 64, split: str = "val",
                  pq: float = 0.5):
    from segpipe.checkpoint import load_meta
    from segpipe.results import CheckpointRef, EvalResult

    members = {k: {"arch": load_meta(d).arch, **CheckpointRef.of(d).to_json()}
               for k, d in (("semantic", semantic), ("instance", instance))}
    data = {"arch": "fused", "task": "panoptic", "checkpoints": members, "fusion": fusion,
            "shards_manifest_sha256": manifest, "split": split, "panoptic": {"pq": pq}}
    return EvalResult.from_json(data, "(test) fused/metrics.json")


@pytest.fixture
def fused_result():
    """``fused_result(semantic_dir, instance_dir, fusion_dict, manifest=..., split=..., pq=...)``: the
    EvalResult the fuse stage would write for that pair."""
    return _fused_result


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory) -> Path:
    """A small shard set with a validation split of a few 64 x 80 scenes, for scoring tests."""
    from segpipe.formats import coco
    from segpipe.stages import convert, synth

    root = tmp_path_factory.mktemp("eval")
    synth.run(SynthParams(images=6, size=(64, 80), workers=1, seed=3), root / "raw")
    src = coco.read([root / "raw" / "annotations" / "instances.json"], root / "raw" / "images", root / "raw" / "masks")
    manifest = convert.run(ConvertParams(workers=1, val_fraction=0.5), src, root / "shards", progress=False)
    assert manifest["splits"].get("val", 0) > 0
    return root / "shards"


@pytest.fixture
def tiny_maskformer() -> dict:
    """Build kwargs of a MaskFormer small enough to run in a test (things: the synthetic set's)."""
    return {"num_queries": 8, "hidden_dim": 32, "dec_layers": 1, "nheads": 2, "dim_feedforward": 32,
            "conv_dim": 32, "mask_dim": 32}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test run, shared by every test that needs a Ray but not one of its
    own (token authentication on; 4 logical CPUs, so two training workers and Ray Data fit on a
    2-core machine). Code under test connects through ``segpipe.cluster.connect``, which uses an
    initialised Ray as it is and leaves it running."""
    from segpipe.cluster import connect

    os.environ.pop("RAY_ADDRESS", None)
    with connect(num_cpus=max(4, os.cpu_count() or 1)):
        import ray

        yield ray


@pytest.fixture(scope="session")
def make_tiny_checkpoint():
    """``make_tiny_checkpoint(out, arch, **kwargs)``: what :func:`tiny_checkpoint` makes, into a folder
    of the caller's choice, for fixtures of a wider scope than a test."""
    return _make_tiny_checkpoint
