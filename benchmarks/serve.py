"""``segpipe serve`` against ``segpipe predict``: throughput and latency, and what batching does.

    .venv/bin/python benchmarks/serve.py [--images 32] [--size 256] [--requests 96] [--arch unet]
                                         [--threads 2] [--clients 1 8 32] [--batch-sizes 8 1]

Synthesises ``--images`` scenes (JPEG, as site cameras deliver them) and a model of ``--arch`` at
its pipeline size (randomly initialised: speed does not depend on the weights), registered as
``champion`` in a temporary registry. Then, on this machine:

- the baseline: ``segpipe predict`` on the same images in one process (``predict.run``, the local
  engine: decode, predict, label PNG and overlay written per image) with ``--threads`` torch
  threads, images/s; and the latency of shelling out to ``segpipe predict`` for one image
  (process start, imports, model load);
- for each ``--batch-sizes`` value (``serve.max_batch_size``), one ``segpipe serve`` (a local Ray
  of its own, one replica holding ``--threads`` CPUs, as many torch threads; the proxy, decoding
  and the clients use the machine's other cores), and for each
  ``--clients`` count that many client threads (keep-alive HTTP) sending ``--requests`` images
  in all: requests/s, p50 and p99 latency, the mean batch the replica ran (``X-Batch-Size``),
  and whether every answer is byte for byte predict's label PNG. Then SIGTERM, timed.

Ratios are against the baseline of the same run. The host line names the CPU, its cores, and
the load average before and after (other work on the machine shows there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def host() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{model}, {os.cpu_count()} cores"


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def start(args: list[str], log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, dict]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "segpipe", "serve", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    deadline = time.monotonic() + 600
    while True:
        ready = [line for line in log.read_text(errors="replace").splitlines() if line.startswith('{"url"')]
        if ready:
            return proc, json.loads(ready[0])
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"segpipe serve did not start: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def load_test(url: str, images: list[tuple[str, bytes]], expected: dict[str, bytes], clients: int,
              requests: int) -> dict[str, float]:
    """``requests`` POSTs spread over ``clients`` threads, each with its own keep-alive connection."""
    import httpx

    latencies: list[float] = []
    batches: list[int] = []
    wrong = [0]
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name, body = images[i % len(images)]
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/segment", content=body, headers={"Content-Type": "image/jpeg"})
                took = time.perf_counter() - t0
                with lock:
                    latencies.append(took)
                    batches.append(int(r.headers.get("x-batch-size", 0)))
                    wrong[0] += r.status_code != 200 or r.content != expected[name]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"rps": requests / wall, "p50": statistics.median(latencies) * 1000,
            "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))] * 1000,
            "batch": statistics.mean(batches), "wrong": wrong[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--requests", type=int, default=96, help="per client count")
    ap.add_argument("--arch", default="unet")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of predict and of the replica (its CPUs)")
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 1])
    ap.add_argument("--shell-outs", type=int, default=3, help="one-image `segpipe predict` processes timed")
    args = ap.parse_args()
    # Set before torch starts its thread pool, here and in every process started below: a pool
    # resized later (torch.set_num_threads) ran 3x slower here on a busy machine.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    from segpipe.checkpoint import CheckpointMeta, save_checkpoint
    from segpipe.cluster import free_port
    from segpipe.commands import predict
    from segpipe.models import build_model, default_kwargs
    from segpipe.params import PredictParams, SynthParams
    from segpipe.registry import register, set_alias
    from segpipe.stages import synth
    from segpipe.synth.classes import classes_table

    print(f"host: {host()}; load average {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="segserve") as tmp:
        root = Path(tmp)
        synth.run(SynthParams(images=args.images, size=(args.size, args.size), workers=1, seed=0), root / "raw")
        image_dir = root / "raw" / "images"
        files = sorted(image_dir.iterdir())
        classes = classes_table()
        torch.manual_seed(0)
        kwargs = default_kwargs(args.arch)
        meta = CheckpointMeta(arch=args.arch, num_classes=len(classes), classes=tuple(classes), model_kwargs=kwargs)
        ckpt = save_checkpoint(root / "ckpt", build_model(args.arch, len(classes), **kwargs), meta)
        registry = root / "registry"
        entry, _ = register(registry, ckpt)
        set_alias(registry, "champion", entry["version"], "benchmark")

        torch.set_num_threads(args.threads)
        params = PredictParams()
        predict.run(params, "champion", files[0], root / "warm", registry=registry, progress=False)
        t0 = time.perf_counter()
        predict.run(params, "champion", image_dir, root / "predict", registry=registry, progress=False)
        baseline = len(files) / (time.perf_counter() - t0)
        expected = {f.name: (root / "predict" / "labels" / f"{f.stem}.png").read_bytes() for f in files}
        print(f"segpipe predict, one process, {args.threads} threads: {baseline:.2f} images/s "
              f"({len(files)} images of {args.size} x {args.size}, {args.arch})", flush=True)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        shell = []
        for i in range(args.shell_outs):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "segpipe", "predict", "--model", "champion", "--registry",
                            str(registry), "--input", str(files[i % len(files)]), "--out", str(root / f"shell{i}"),
                            "--device", "cpu"], check=True, capture_output=True, env=env)
            shell.append(time.perf_counter() - t0)
        if shell:
            print(f"segpipe predict of one image, as a process: {statistics.median(shell) * 1000:.0f} ms (median "
                  f"of {len(shell)})", flush=True)

        images = [(f.name, f.read_bytes()) for f in files]
        rows = []
        for batch in args.batch_sizes:
            params_file = root / f"params{batch}.yaml"
            params_file.write_text(f"serve:\n  cpus_per_replica: {float(args.threads)}\n  threads: {args.threads}\n"
                                   f"  max_batch_size: {batch}\n  max_ongoing_requests: {max(32, batch)}\n")
            port = free_port()
            proc, ready = start(["--registry", str(registry), "--port", str(port), "--params", str(params_file),
                                 "--device", "cpu"], root / f"serve{batch}.log", env)
            try:
                load_test(ready["url"], images, expected, 4, 16)  # warm-up: connections, first batches
                for clients in args.clients:
                    r = load_test(ready["url"], images, expected, clients, args.requests)
                    rows.append((batch, clients, r))
                    print(f"max_batch_size {batch}, {clients:>2} clients: {r['rps']:6.2f} requests/s "
                          f"({r['rps'] / baseline:.2f}x predict), p50 {r['p50']:7.1f} ms, p99 {r['p99']:7.1f} ms, "
                          f"mean batch {r['batch']:.1f}, wrong answers {r['wrong']}", flush=True)
            finally:
                t0 = time.perf_counter()
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=120)
                print(f"SIGTERM: exit {code} after {time.perf_counter() - t0:.1f} s", flush=True)

        print(f"\nload average after: {load_average()}\n")
        print("| max_batch_size | clients | requests/s | vs predict | p50 ms | p99 ms | mean batch | identical |")
        print("|---|---|---|---|---|---|---|---|")
        for batch, clients, r in rows:
            print(f"| {batch} | {clients} | {r['rps']:.2f} | {r['rps'] / baseline:.2f}x | {r['p50']:.0f} | "
                  f"{r['p99']:.0f} | {r['batch']:.1f} | {'yes' if r['wrong'] == 0 else 'NO'} |")


if __name__ == "__main__":
    main()
