"""Confusion-matrix accumulation speed against a plain ``numpy.bincount`` over the same pixels.

    .venv/bin/python benchmarks/metrics.py [--images 200] [--size 512] [--classes 20]

Both sides see the same label maps one image at a time (as evaluation feeds them). The baseline
is the bare ``np.bincount(K * gt + pred, minlength=K * K)``: no ignore handling, no range checks
(on uint8 maps it must widen first, or K * gt overflows). ``ConfusionMatrix.update`` skips
ignored pixels and rejects out-of-range values. Two input dtypes: uint8 (label PNGs, argmax
cast down) and int64 (torch's argmax). The last line is the worse time ratio (ours / baseline).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from segpipe.metrics.semantic import ConfusionMatrix


def best_times(fns, repeats: int) -> list[float]:
    """Best wall time of each function, runs interleaved so that load from other processes hits
    both sides alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    k, n, s = args.classes, args.images, args.size
    rng = np.random.default_rng(0)
    gt = rng.integers(0, k, (n, s, s), dtype=np.uint8)
    pred = np.where(rng.random((n, s, s)) < 0.7, gt, rng.integers(0, k, (n, s, s), dtype=np.uint8))
    gt[:, :: 16] = 255  # ~6% ignored pixels, in every image
    mpix = n * s * s / 1e6

    ratios = []
    for name, conv in (("uint8", lambda a: a), ("int64", lambda a: a.astype(np.int64))):
        # int64 copies of 200 x 512 x 512 would need 800 MB: convert a few images and cycle
        g = [conv(gt[i]) for i in range(n)] if name == "uint8" else [conv(gt[i]) for i in range(min(n, 16))]
        p = [conv(pred[i]) for i in range(n)] if name == "uint8" else [conv(pred[i]) for i in range(min(n, 16))]
        m = len(g)

        def baseline(g=g, p=p, m=m, name=name):
            out = np.zeros(256 * k, np.int64)
            for i in range(n):
                a, b = g[i % m], p[i % m]
                a = a.astype(np.int64) if name == "uint8" else a
                out[: 255 * k + k] += np.bincount((k * a + b).ravel(), minlength=256 * k)[: 256 * k]
            return out

        def ours(g=g, p=p, m=m):
            cm = ConfusionMatrix(k, 255)
            for i in range(n):
                cm.update(g[i % m], p[i % m])
            return cm.mat

        base_ref = baseline().reshape(256, k)[:k, :k]
        assert np.array_equal(ours(), base_ref), "confusion matrix differs from the bincount baseline"
        tb, to = best_times([baseline, ours], args.repeats)
        ratios.append(to / tb)
        print(f"{name}: bincount baseline {mpix / tb:8.1f} Mpix/s   ConfusionMatrix.update {mpix / to:8.1f} Mpix/s"
              f"   time ratio {to / tb:.3f}")
    print(f"worst time ratio ConfusionMatrix / bincount ({n} x {s}x{s}, K={k}): {max(ratios):.3f}")


if __name__ == "__main__":
    main()
