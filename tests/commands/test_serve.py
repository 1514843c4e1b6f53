"""``segpipe serve`` end to end: a real server on loopback, a real HTTP client.

One server for the module (``segpipe serve --model champion`` as a subprocess, deployed on the
test session's Ray through ``RAY_ADDRESS``, tiny checkpoints in a temporary registry); each test
points ``champion`` at the version it needs and waits until the replica follows. The label PNGs
are compared byte for byte with what ``segpipe predict`` writes for the same images and model.
One more server, on a local Ray of its own, is stopped with SIGTERM.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from segpipe.params import as_dict

pytestmark = pytest.mark.slow

RELOAD_INTERVAL_S = 0.5
PARAMS = f"""\
predict:
  tile: 128
  overlap: 32
  detection: {{score_threshold: 0.0}}
serve:
  cpus_per_replica: 1.0
  threads: 1                 # segpipe predict runs with 1 torch thread here too (Mask R-CNN's sums depend on it)
  max_batch_size: 8
  batch_wait_timeout_s: 0.05
  max_image_pixels: 1000000
  max_body_bytes: 2000000
  reload_interval_s: {RELOAD_INTERVAL_S}
  shutdown_timeout_s: 2.0
"""
SMALL = ("small0.png", "small1.jpg", "small2.tif")  # 64 x 80: within one tile, batched together
LARGE = "large.png"  # 200 x 150: by sliding window, alone
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".tif": "image/tiff"}


def scene(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))


@dataclass
class Site:
    """The registry (v1, v2: UNets; v3: a Mask R-CNN; v4: the fused pair of v1's UNet and v3;
    v5: a UNet whose weights were changed after registration), the params file, the images, and
    what ``segpipe predict`` writes for each image and version (``expected/vN``)."""

    root: Path
    registry: Path
    params: Path
    images: Path
    unet: Path  # v1's checkpoint folder

    def image(self, name: str) -> bytes:
        return (self.images / name).read_bytes()

    def label_png(self, version: str, name: str) -> bytes:
        return (self.root / "expected" / version / "labels" / f"{Path(name).stem}.png").read_bytes()

    def expected(self, version: str) -> Path:
        return self.root / "expected" / version


@pytest.fixture(scope="module")
def site(tmp_path_factory, make_tiny_checkpoint) -> Site:
    import torch

    from segpipe.commands import predict
    from segpipe.params import FusionParams, load_section
    from segpipe.registry import add_bundle_version, register, set_alias, transaction
    from segpipe.results import CheckpointRef, EvalResult

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve")
    (root / "params.yaml").write_text(PARAMS)
    reg = root / "registry"
    unets = [make_tiny_checkpoint(root / f"unet{seed}", "unet", seed=seed, base_channels=4, depth=2) for seed in (0, 1)]
    rcnn = make_tiny_checkpoint(root / "rcnn", "mask_rcnn", box_score_thresh=0.0, box_detections_per_img=5,
                                detects_things=True)
    for ck in (*unets, rcnn):
        register(reg, ck)
    members = {k: {"arch": a, **CheckpointRef.of(d).to_json()} for k, a, d in (("semantic", "unet", unets[0]),
                                                                               ("instance", "mask_rcnn", rcnn))}
    fused = EvalResult.from_json({"arch": "fused", "task": "panoptic", "checkpoints": members,
                                  "fusion": as_dict(FusionParams(score_threshold=0.0, stuff_min_area=0)),
                                  "shards_manifest_sha256": "x" * 64, "split": "val", "panoptic": {"pq": 0.5}},
                                 "(test) fused/metrics.json")
    with transaction(reg) as index:
        add_bundle_version(reg, index, fused)
    register(reg, make_tiny_checkpoint(root / "unet2", "unet", seed=2, base_channels=4, depth=2))
    weights = reg / "v5" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    set_alias(reg, "champion", "v1", "test")

    images = root / "images"
    images.mkdir()
    for i, name in enumerate(SMALL):
        Image.fromarray(scene(64, 80, seed=i)).save(images / name)
    Image.fromarray(scene(200, 150, seed=9)).save(images / LARGE)
    params = load_section("predict", root / "params.yaml")
    for version in ("v1", "v2", "v3", "v4"):
        predict.run(params, version, images, root / "expected" / version, registry=reg, progress=False)
    return Site(root, reg, root / "params.yaml", images, unets[0])


# --------------------------------------------------------------------------------------
# A client
# --------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def call(url: str, data: bytes | None = None, content_type: str | None = None, method: str | None = None,
         timeout: float = 60) -> Answer:
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


@dataclass
class Server:
    url: str
    site: Site
    proc: subprocess.Popen
    log: Path

    def segment(self, name: str, query: str = "") -> Answer:
        return call(f"{self.url}/v1/segment{query}", self.site.image(name), CONTENT_TYPES[Path(name).suffix])

    def use(self, version: str, timeout: float = 60) -> None:
        """Point champion at ``version`` and wait until the replica serves it, with no problem to report."""
        from segpipe.registry import set_alias

        set_alias(self.site.registry, "champion", version, "test")
        deadline = time.monotonic() + timeout
        while (health := call(f"{self.url}/healthz").json())["model"]["version"] != version or health["problem"]:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.1)


def start_serve(args: list[str], env: dict[str, str], log: Path, timeout: float = 300) -> tuple[subprocess.Popen, dict]:
    """``segpipe serve ARGS`` as a subprocess; returns it and its ready line once it answers."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "segpipe", "serve", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    deadline = time.monotonic() + timeout
    while True:
        ready = [line for line in log.read_text(errors="replace").splitlines() if line.startswith('{"url"')]
        if ready:
            return proc, json.loads(ready[0])
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"segpipe serve did not start: {log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(site, ray_session) -> Server:
    """``segpipe serve --model champion`` on the test session's Ray (``RAY_ADDRESS``). Stopped with
    SIGTERM at the end: it exits 0, deleting its application and nothing else of the cluster."""
    from ray import serve

    from segpipe.cluster import free_port

    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = site.root / "serve.log"
    proc, ready = start_serve(["--model", "champion", "--registry", str(site.registry), "--port", str(port),
                               "--params", str(site.params)], env, log)
    assert ready["model"]["version"] == "v1" and ready["ray"] == env["RAY_ADDRESS"]
    try:
        yield Server(ready["url"], site, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        try:
            assert code == 0, log.read_text()[-3000:]
            assert "application 'segpipe' deleted" in log.read_text()
            assert "segpipe" not in serve.status().applications
            assert ray_session.is_initialized()
        finally:
            serve.shutdown()  # the controller and proxy the command started on the shared Ray


def test_a_model_that_cannot_be_served_is_refused_in_one_line_before_any_ray(site, capsys):
    from segpipe.cli import main

    for model, message in (("v9", "unknown version 'v9'"), ("v5", "v5/model.safetensors: sha256"),
                           ("challenger", "no 'challenger' yet")):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--model", model, "--registry", str(site.registry), "--params", str(site.params)])
        assert e.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("segpipe serve: error: ") and message in err and "\n" not in err, err


# --------------------------------------------------------------------------------------
# Pixel identity with segpipe predict
# --------------------------------------------------------------------------------------


def test_a_semantic_model_answers_the_label_png_of_segpipe_predict(server):
    from segpipe.serving import locate

    server.use("v1")
    sha = locate("v1", server.site.registry).sha256
    for name in (*SMALL, LARGE):
        answer = server.segment(name)
        assert answer.status == 200 and answer.headers["content-type"] == "image/png"
        assert answer.headers["x-model-version"] == "v1" and answer.headers["x-model-sha256"] == sha
        assert answer.body == server.site.label_png("v1", name), name
        assert np.asarray(Image.open(io.BytesIO(answer.body))).dtype == np.uint8
    doc = server.segment(SMALL[0], "?format=json").json()
    assert (doc["height"], doc["width"]) == (64, 80) and "instances" not in doc
    labels = np.asarray(Image.open(io.BytesIO(server.site.label_png("v1", SMALL[0]))))
    assert doc["pixels_per_class"] == {c["name"]: int((labels == c["id"]).sum()) for c in doc["classes"]}
    assert doc["model"] == {"version": "v1", "sha256": sha, "architecture": "unet", "ref": "champion"}


def test_an_instance_model_answers_predicts_labels_and_detections(server):
    server.use("v3")
    detections = json.loads((server.site.expected("v3") / "detections.json").read_text())
    files = {t["file_name"]: t["id"] for t in json.loads((server.site.expected("v3") / "images.json").read_text())}
    found = 0
    for name in (*SMALL, LARGE):
        answer = server.segment(name)
        assert answer.status == 200 and answer.headers["x-model-version"] == "v3"
        assert answer.body == server.site.label_png("v3", name), name
        doc = server.segment(name, "?format=json").json()
        expected = [d for d in detections if d["image_id"] == files[name]]
        assert [(d["class_id"], d["score"], d["bbox"], d["segmentation"]) for d in doc["instances"]] == \
            [(d["category_id"], d["score"], d["bbox"], d["segmentation"]) for d in expected], name
        assert all(d["class"] in ("worker", "excavator") for d in doc["instances"])
        found += len(doc["instances"])
    assert found > 0


def test_the_panoptic_bundle_answers_predicts_labels_and_panoptic_png(server):
    server.use("v4")
    written = json.loads((server.site.expected("v4") / "panoptic.json").read_text())
    for name in (SMALL[0], LARGE):
        answer = server.segment(name)
        assert answer.status == 200 and answer.headers["x-model-version"] == "v4"
        assert answer.body == server.site.label_png("v4", name), name
        doc = server.segment(name, "?format=panoptic").json()
        stem = Path(name).stem
        assert base64.b64decode(doc["png_base64"]) == (server.site.expected("v4") / "panoptic" / f"{stem}.png").read_bytes()
        (annotation,) = [a for a in written["annotations"] if a["file_name"] == f"{stem}.png"]
        assert doc["segments_info"] == annotation["segments_info"] and doc["segments_info"]
        assert doc["categories"] == written["categories"] and doc["model"]["architecture"] == "fused"
    info = call(f"{server.url}/v1/model").json()
    assert info["task"] == "panoptic" and info["outputs"] == ["png", "json", "panoptic"] and info["follows"] == "champion"


def test_model_and_health(server):
    server.use("v1")
    info = call(f"{server.url}/v1/model").json()
    assert info["version"] == "v1" and info["architecture"] == "unet" and info["loaded_at"]
    assert [(c["name"], c["color"]) for c in info["classes"]] == [("ground", [40, 40, 40]), ("worker", [255, 0, 0]),
                                                                 ("excavator", [0, 255, 0])]
    health = call(f"{server.url}/healthz")
    assert health.status == 200 and health.json()["status"] == "ok" and health.json()["problem"] is None


def readme_curls() -> list[str]:
    """The ``curl`` lines of the README's "Serving the champion" section."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Serving the champion\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("curl ")]


def test_the_readmes_curl_commands(server, tmp_path):
    """The README's commands, exactly, with the server's address: against the fused bundle, which
    has every output."""
    import shlex

    server.use("v4")
    curls = readme_curls()
    assert len(curls) >= 5 and any("format=json" in c for c in curls) and any("format=panoptic" in c for c in curls)
    (tmp_path / "site.jpg").write_bytes(server.site.image(SMALL[1]))
    outputs = []
    for line in curls:
        args = [a.replace("http://127.0.0.1:8000", server.url) for a in shlex.split(line)]
        done = subprocess.run(args, cwd=tmp_path, capture_output=True, timeout=60)
        assert done.returncode == 0, (line, done.stderr.decode(errors="replace"))
        outputs.append(done.stdout)
    assert (tmp_path / "site.png").read_bytes() == server.site.label_png("v4", SMALL[1])
    docs = [json.loads(out) for out in outputs if out]
    assert {"status", "model", "problem"} <= set(docs[0]) and docs[1]["version"] == "v4"
    assert "instances" in docs[2] and "png_base64" in docs[3]


# --------------------------------------------------------------------------------------
# Load, batching, following the registry
# --------------------------------------------------------------------------------------


def test_200_concurrent_requests_from_16_threads_are_all_answered_correctly(server):
    server.use("v1")
    names = [(*SMALL, LARGE)[i % 4] for i in range(200)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(server.segment, names))
    wrong = [(n, a.status, a.body[:200]) for n, a in zip(names, answers)
             if a.status != 200 or a.body != server.site.label_png("v1", n)]
    assert not wrong and len(answers) == 200
    batches = [int(a.headers["x-batch-size"]) for n, a in zip(names, answers) if n != LARGE]
    assert max(batches) > 1, batches  # small images arriving together ran together ...
    assert {a.headers["x-batch-size"] for n, a in zip(names, answers) if n == LARGE} == {"1"}  # ... large ones alone


def test_an_alias_move_under_load_fails_no_request(server):
    """champion moves v1 -> v2 while four clients keep sending: every answer is 200 and is the
    label PNG of the version its header names, and v2 answers within the reload interval."""
    from segpipe.registry import set_alias

    server.use("v1")
    moved, stop, lock = [0.0], threading.Event(), threading.Lock()
    seen: list[tuple[float, str, bool]] = []

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            name = SMALL[i % len(SMALL)]
            i += 1
            answer = server.segment(name)
            version = answer.headers.get("x-model-version", "")
            ok = answer.status == 200 and answer.body == server.site.label_png(version or "v1", name)
            with lock:
                seen.append((time.monotonic(), version, ok))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        moved[0] = time.monotonic()
        set_alias(server.site.registry, "champion", "v2", "a promotion")
        deadline = moved[0] + 60
        while not any(v == "v2" for _, v, _ in seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # and on, on the new version
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert all(ok for _, _, ok in seen), [s for s in seen if not s[2]][:5]
    before = [v for t, v, _ in seen if t < moved[0]]
    assert before and set(before) == {"v1"}
    first_v2 = min(t for t, v, _ in seen if v == "v2")
    # the replica reads the registry every reload interval, then loads and checks the new version
    assert first_v2 - moved[0] < RELOAD_INTERVAL_S + 10, first_v2 - moved[0]
    assert {v for t, v, _ in seen if t > first_v2 + 1} == {"v2"}  # no going back


def test_a_version_failing_its_checksum_is_not_loaded_and_health_says_so(server):
    server.use("v1")
    from segpipe.registry import set_alias

    set_alias(server.site.registry, "champion", "v5", "a promotion of a tampered copy")
    deadline = time.monotonic() + 60
    while (health := call(f"{server.url}/healthz").json())["status"] != "stale":
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    assert health["problem"]["version"] == "v5" and "does not match the registry" in health["problem"]["error"]
    assert health["model"]["version"] == "v1"
    answer = server.segment(SMALL[0])
    assert answer.status == 200 and answer.headers["x-model-version"] == "v1"
    assert answer.body == server.site.label_png("v1", SMALL[0])
    server.use("v1")
    assert call(f"{server.url}/healthz").json()["status"] == "ok"


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def bad_requests() -> dict[str, tuple[str, str, bytes | None, str | None, int]]:
    """name: (method, path, body, content type, status)."""
    png = encoded(scene(64, 80, seed=0), "PNG")
    jpeg = encoded(scene(64, 80, seed=0), "JPEG")
    return {
        "not an image": ("POST", "/v1/segment", b"<html>not an image</html>", "image/png", 400),
        "truncated png": ("POST", "/v1/segment", png[: len(png) // 2], "image/png", 400),
        "truncated jpeg": ("POST", "/v1/segment", jpeg[: len(jpeg) // 2], "image/jpeg", 400),
        "empty body": ("POST", "/v1/segment", b"", "image/png", 400),
        "gif": ("POST", "/v1/segment", encoded(scene(64, 80, seed=0), "GIF"), "image/png", 415),
        "text": ("POST", "/v1/segment", b"hello", "text/plain", 415),
        "no content type": ("POST", "/v1/segment", png, None, 415),
        "octet-stream": ("POST", "/v1/segment", png, "application/octet-stream", 415),
        "over max_image_pixels": ("POST", "/v1/segment", encoded(np.zeros((2000, 2000), np.uint8), "PNG"),
                                  "image/png", 413),
        "over max_body_bytes": ("POST", "/v1/segment", os.urandom(2_000_001), "image/png", 413),
        "unknown format": ("POST", "/v1/segment?format=webp", png, "image/png", 400),
        "panoptic of a semantic model": ("POST", "/v1/segment?format=panoptic", png, "image/png", 400),
        "wrong method": ("GET", "/v1/segment", None, None, 405),
        "unknown path": ("GET", "/v1/predict", None, None, 404),
    }


@pytest.mark.parametrize("case", list(bad_requests()))
def test_bad_input_is_refused_and_the_next_request_is_answered(server, case):
    server.use("v1")
    method, path, body, content_type, expected = bad_requests()[case]
    answer = call(f"{server.url}{path}", body, content_type, method)
    assert answer.status == expected, answer.body[:300]
    assert answer.headers["content-type"] == "application/json" and answer.json()["status"] == expected
    assert answer.json()["error"]
    good = server.segment(SMALL[0])
    assert good.status == 200 and good.body == server.site.label_png("v1", SMALL[0])


def test_a_body_without_a_length_is_counted_as_it_comes(server):
    import httpx

    server.use("v1")

    def chunks():
        for _ in range(40):
            yield b"\0" * 100_000  # 4 MB, sent chunked

    answer = httpx.post(f"{server.url}/v1/segment", content=chunks(), headers={"Content-Type": "image/png"}, timeout=60)
    assert answer.status_code == 413 and "max_body_bytes" in answer.json()["error"]
    assert server.segment(SMALL[0]).status == 200


# --------------------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------------------


def test_sigterm_stops_the_server_and_its_local_ray_within_seconds(site):
    from segpipe.cluster import free_port

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    port = free_port()
    proc, ready = start_serve(["--model", str(site.unet), "--port", str(port), "--params", str(site.params)], env,
                              site.root / "sigterm.log")
    try:
        assert ready["ray"] == "local" and ready["model"]["version"] == "path"
        answer = call(f"{ready['url']}/v1/segment", site.image(SMALL[0]), "image/png")
        assert answer.status == 200 and answer.headers["x-model-version"] == "path"
        assert answer.body == site.label_png("v1", SMALL[0])  # the folder v1 was registered from
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = {p.name() for p in tree}
        assert {"raylet", "gcs_server"} <= names and any("ServeReplica" in n for n in names), names
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (site.root / "sigterm.log").read_text()[-3000:]
        took = time.monotonic() - began
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
        with pytest.raises(OSError):
            call(f"{ready['url']}/healthz", timeout=5)
        assert "the local Ray with it" in (site.root / "sigterm.log").read_text()
        assert took < 30, took  # a few seconds on an idle machine: docs/benchmarks.md
    finally:
        if proc.poll() is None:
            proc.kill()
