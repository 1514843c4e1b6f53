"""``segpipe serve``: a registered model over HTTP, on Ray Serve.

    segpipe serve [--model champion|panoptic-champion|vN|CKPT] [--registry DIR] [--host 127.0.0.1]
                  [--port 8000] [--replicas N] [--device cpu|cuda]

Deploys one Ray Serve application (``segpipe``, route prefix ``/``) of ``--replicas`` copies of
the model, on the cluster of ``RAY_ADDRESS`` (token authentication whenever a token is
configured, as ``segpipe train``) or on a local Ray started for this command; then blocks until
Ctrl-C or SIGTERM. Stopping drains running requests (up to ``serve.shutdown_timeout_s``), then
deletes the application from a cluster, or shuts down Serve and the local Ray with every process
it started.

Routes (the README's "Serving the champion" has curl commands; ``docs/production.md`` a cluster's set-up):

    POST /v1/segment   the image's bytes (Content-Type image/jpeg, image/png or image/tiff) ->
                       image/png: the label map, byte for byte what ``segpipe predict`` writes
                       to labels/NAME.png; ?format=json: counts per class and, for instance and
                       panoptic models, the detections (COCO RLE); ?format=panoptic: JSON with
                       the COCO panoptic PNG (base64) and its segments_info.
                       Headers: X-Model-Version (vN, or ``path``), X-Model-Sha256, X-Batch-Size.
    GET  /v1/model     version, sha256, architecture, classes and colours, when it was loaded
    GET  /healthz      200 while a model is loaded and the replica answers; ``problem`` names a
                       version the alias moved to that could not be loaded

Prediction is ``segpipe predict``'s: the ``predict`` section's tile, overlap and thresholds. Images
within one tile that arrive together run as one batch (``@serve.batch``: up to
``serve.max_batch_size``, waiting at most ``serve.batch_wait_timeout_s``); larger ones run alone
by sliding window. With an alias (``champion``), each replica reads the registry every
``serve.reload_interval_s`` and switches to the version the alias names once its sha256 checks
out; requests already running finish on the old model, and a version that fails its checksum is
not loaded. Bad input is answered with a JSON error: 400 (not an image, truncated), 413 (over
``serve.max_image_pixels`` from the header, or over ``serve.max_body_bytes``), 415 (another type).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segpipe.params import PredictParams, ServeParams, add_params_arguments, as_dict, build, from_args
from segpipe.registry import DEFAULT_REGISTRY

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from segpipe.inference import Prediction
    from segpipe.serving import ServedModel

APP = "segpipe"  # the Ray Serve application's name (one per cluster)
DEPLOYMENT = "segmenter"
logger = logging.getLogger("ray.serve")  # a replica's log goes where Serve sends its own


def replica_threads(params: ServeParams) -> int:
    """torch threads of one replica: ``serve.threads``, else its CPU share rounded down (at least 1)."""
    return params.threads or max(1, int(params.cpus_per_replica))


class SegmentService:
    """One Ray Serve replica: the HTTP routes of the module docstring over a :class:`segpipe.serving.Follower`.

    The model runs on one thread of its own (torch uses its intra-op threads within it), so the
    event loop keeps reading requests and answering health checks while it works; decoding and
    PNG encoding run on the loop's default executor."""

    def __init__(self, model_ref: str, registry: str, serve_params: dict[str, Any], predict_params: dict[str, Any],
                 device: str) -> None:
        import torch
        from ray import serve

        from segpipe.serving import Follower, load

        self.params = build(ServeParams, serve_params, "serve")
        predict = build(PredictParams, predict_params, "predict")
        torch.set_num_threads(replica_threads(self.params))
        self.follower = Follower(model_ref, registry, lambda source: load(source, predict, device))
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="segpipe-model")
        self._batched = serve.batch(max_batch_size=self.params.max_batch_size,
                                    batch_wait_timeout_s=self.params.batch_wait_timeout_s)(self._predict_batch)
        self._stop = threading.Event()
        self._following: threading.Thread | None = None
        if self.follower.follows:
            self._following = threading.Thread(target=self._follow, name="segpipe-follow", daemon=True)
            self._following.start()

    def _follow(self) -> None:
        # logged at warning level: the level the command runs Serve's logs at (its info lines are chatter)
        reported = None
        while not self._stop.wait(self.params.reload_interval_s):
            before = self.follower.current.source
            try:
                changed = self.follower.poll()
            except Exception:  # a bug: logged; the next poll tries again
                logger.exception("segpipe serve: following %s failed", self.follower.ref)
                continue
            if changed:
                now = self.follower.current.source
                logger.warning("segpipe serve: %s moved: now serving %s (sha256 %s), was %s", self.follower.ref,
                               now.version, now.sha256[:12], before.version)
            problem = (self.follower.problem or {}).get("error")
            if problem and problem != reported:
                logger.warning("segpipe serve: %s", problem)
            reported = problem

    def check_health(self) -> None:
        """Ray Serve's replica health check: a model is loaded and the registry is still followed."""
        if self.follower.current is None:
            raise RuntimeError("no model loaded")
        if self._following is not None and not self._following.is_alive():
            raise RuntimeError(f"no longer following {self.follower.ref} in the registry")

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    async def __call__(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        from segpipe.serving import RequestError, health_json, model_json, route

        try:
            path = route(request.method, request.url.path)
            if path == "/healthz":
                return JSONResponse(health_json(self.follower))
            if path == "/v1/model":
                return JSONResponse(model_json(self.follower.current, self.follower.follows))
            return await self._segment(request)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except Exception as e:  # a bug: this request fails, the replica goes on
            logger.exception("segpipe serve: %s %s failed", request.method, request.url.path)
            return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}", "status": 500}, status_code=500)

    async def _segment(self, request: Request) -> Response:
        from segpipe.serving import RequestError, check_length, decode, media_type, response_format

        fmt = response_format(request.query_params)
        media_type(request.headers.get("content-type"))
        check_length(request.headers.get("content-length"), self.params.max_body_bytes)
        body = await read_body(request, self.params.max_body_bytes)
        image = await asyncio.to_thread(decode, body, self.params.max_image_pixels)
        wants_panoptic = fmt == "panoptic"
        current = self.follower.current
        if wants_panoptic and current.panoptic is None:
            raise RequestError(400, f"format=panoptic: model {current.source.version} ({current.plan.arch}) has no "
                                    f"panoptic output")
        if current.within_one_tile(image):
            model, pred, batch = await self._batched((image, wants_panoptic))
        else:  # a large image runs alone, by sliding window, on the model thread
            model = current
            loop = asyncio.get_running_loop()
            (pred,) = await loop.run_in_executor(self._model_thread, model.predict, [image], [wants_panoptic])
            batch = 1
        return await asyncio.to_thread(render, fmt, model, pred, batch)

    async def _predict_batch(self, items: list[tuple[Any, bool]]) -> list[tuple[ServedModel, Prediction, int]]:
        """``@serve.batch``: images within one tile, predicted together by the model served now."""
        model = self.follower.current
        loop = asyncio.get_running_loop()
        preds = await loop.run_in_executor(self._model_thread, model.predict, [i[0] for i in items],
                                           [i[1] for i in items])
        return [(model, p, len(items)) for p in preds]


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``max_body_bytes``."""
    from segpipe.serving import RequestError, too_large_body

    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise RequestError(413, too_large_body(size, max_body_bytes) + " (and counting)")
        chunks.append(chunk)
    return b"".join(chunks)


def render(fmt: str, model: ServedModel, pred: Prediction, batch: int) -> Response:
    """The answer of a segment request in ``fmt``, with the model's headers."""
    from starlette.responses import JSONResponse, Response

    from segpipe.commands.predict import label_png
    from segpipe.serving import model_header, panoptic_json, segment_json

    headers = {**model_header(model), "X-Batch-Size": str(batch)}
    if fmt == "json":
        return JSONResponse(segment_json(model, pred), headers=headers)
    if fmt == "panoptic":
        return JSONResponse(panoptic_json(model, pred), headers=headers)
    return Response(label_png(pred.labels), media_type="image/png", headers=headers)


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM ignored while stopping: a second one must not leave half a Ray behind."""
    held = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, signal.SIG_IGN) for s in held}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _bounded(fn: Callable[[], Any], timeout: float, what: str) -> None:
    """Run ``fn`` in a thread for at most ``timeout`` seconds (a cluster that stopped answering
    must not keep the command from exiting)."""
    errors: list[BaseException] = []

    def call() -> None:
        try:
            fn()
        except BaseException as e:  # reported below, the stop goes on
            errors.append(e)

    worker = threading.Thread(target=call, name=f"segpipe-{what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive() or errors:
        reason = f"did not finish in {timeout:.0f} s" if worker.is_alive() else f"failed: {errors[0]}"
        print(f"segpipe serve: {what} {reason}", flush=True)


def deployment(serve_params: ServeParams, device: str) -> Any:
    """The Ray Serve deployment of :class:`SegmentService` sized by ``serve_params``."""
    from ray import serve

    # torch sizes its thread pool from OMP_NUM_THREADS when it starts; resizing it later
    # (torch.set_num_threads) ran several times slower on a busy machine (benchmarks/serve.py)
    env = {"OMP_NUM_THREADS": str(replica_threads(serve_params))}
    return serve.deployment(
        SegmentService, name=DEPLOYMENT, num_replicas=serve_params.replicas,
        ray_actor_options={"num_cpus": serve_params.cpus_per_replica, "num_gpus": 1 if device.startswith("cuda") else 0,
                           "runtime_env": {"env_vars": env}},
        max_ongoing_requests=serve_params.max_ongoing_requests,
        graceful_shutdown_timeout_s=serve_params.shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=min(0.5, serve_params.shutdown_timeout_s) or 0.1,
        max_constructor_retry_count=3)


def run(params: ServeParams, predict: PredictParams, model_ref: str, registry: Path = DEFAULT_REGISTRY,
        host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
        ready: Callable[[dict[str, Any]], None] = lambda info: print(json.dumps(info), flush=True)) -> None:
    """Serve ``model_ref`` until KeyboardInterrupt (Ctrl-C, or SIGTERM through
    ``segpipe.lifetime.terminate_as_interrupt``), then stop; ``ready`` gets the URL, the model and
    the Ray once the application answers."""
    import psutil

    from segpipe.cluster import connect
    from segpipe.commands.predict import model_plan
    from segpipe.serving import ServeError, locate

    registry = Path(registry).resolve()  # replicas read it from their own working folder (a shared one on a cluster)
    source = locate(model_ref, registry)
    source.verify()  # fail here, in one line, rather than in every replica
    plan = model_plan(predict, source.directory, model_ref=model_ref)
    from segpipe.lifetime import terminate_as_interrupt

    terminate_as_interrupt()  # SIGTERM stops the server as Ctrl-C does: through the finally below
    address = os.environ.get("RAY_ADDRESS") or None
    cpus = None if address else max(os.cpu_count() or 1, math.ceil(params.replicas * params.cpus_per_replica))
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    with connect(num_cpus=cpus) as started:
        import ray
        from ray import serve

        terminate_as_interrupt()  # again: ray.init replaced the handler with sys.exit
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # this driver's "Started Serve ..." lines
        try:
            gpus = ray.cluster_resources().get("GPU", 0)
            if device.startswith("cuda") and gpus < params.replicas:
                raise ServeError(f"--device {device} --replicas {params.replicas}: the Ray cluster has {gpus:g} GPU(s); "
                                 f"each replica takes one")
            serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
            app = deployment(params, device).bind(str(model_ref), str(registry), as_dict(params), as_dict(predict), device)
            serve.run(app, name=APP, route_prefix="/", logging_config=quiet)
            ready({"url": f"http://{host}:{port}", "model": {"ref": str(model_ref), "version": source.version,
                                                              "sha256": source.sha256, "architecture": plan.arch},
                   "replicas": params.replicas, "device": device, "ray": address or "local"})
            while True:
                time.sleep(3600)
        finally:
            with signals_held():
                began = time.monotonic()
                own = psutil.Process().children(recursive=True) if started else []  # the local Ray, all of it
                # own Ray: drain and stop everything; a cluster: delete this application only
                stop = serve.shutdown if started else (lambda: serve.delete(APP))
                _bounded(stop, params.shutdown_timeout_s + 30, "stopping Ray Serve")
                served = time.monotonic() - began
                _bounded(ray.shutdown, 30, "stopping the local Ray" if started else "disconnecting")
                if started:
                    _, alive = psutil.wait_procs([p for p in own if p.is_running()], timeout=5)
                    for proc in alive:
                        with contextlib.suppress(psutil.NoSuchProcess):
                            proc.kill()
                print(f"segpipe serve: stopped in {time.monotonic() - began:.1f} s (Ray Serve {served:.1f} s)"
                      + (", the local Ray with it" if started else f"; application {APP!r} deleted from {address}"),
                      flush=True)


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(prog="segpipe serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="champion",
                        help="champion | panoptic-champion | challenger | vN | CHECKPOINT_DIR (default: champion); "
                             "an alias is followed as promotions move it")
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="registry directory (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy listens on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    parser.add_argument("--replicas", type=int, help="model replicas (default: params serve.replicas)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda: one GPU per replica (default: cuda when this machine has one)")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    params = from_args(args, "serve")
    if args.replicas is not None:
        params = build(ServeParams, {**as_dict(params), "replicas": args.replicas}, "--replicas: serve")
    predict = from_args(args, "predict")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C or SIGTERM: the way a server is stopped
        run(params, predict, args.model, args.registry, args.host, args.port, args.device)


if __name__ == "__main__":
    main()
