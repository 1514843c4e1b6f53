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


def interleaved_times(step_a, step_b, n: int, repeats: int) -> tuple[float, float]:
    """Total seconds of ``step_a(i)`` and ``step_b(i)`` over images ``i < n``, alternating image by
    image so that load from other processes hits both sides alike; the best of ``repeats``."""
    best_a = best_b = float("inf")
    for _ in range(repeats):
        ta = tb = 0.0
        for i in range(n):
            t0 = time.perf_counter()
            step_a(i)
            t1 = time.perf_counter()
            step_b(i)
            t2 = time.perf_counter()
            ta += t1 - t0
            tb += t2 - t1
        best_a, best_b = min(best_a, ta), min(best_b, tb)
    return best_a, best_b


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

        base = np.zeros(256 * k, np.int64)
        cm = ConfusionMatrix(k, 255)

        def baseline_step(i, g=g, p=p, m=m, name=name, base=base):
            a, b = g[i % m], p[i % m]
            a = a.astype(np.int64) if name == "uint8" else a
            base[:] += np.bincount((k * a + b).ravel(), minlength=256 * k)

        def ours_step(i, g=g, p=p, m=m, cm=cm):
            cm.update(g[i % m], p[i % m])

        tb, to = interleaved_times(baseline_step, ours_step, n, args.repeats)
        assert np.array_equal(cm.mat, base.reshape(256, k)[:k, :k]), "confusion matrix differs from the baseline"
        ratios.append(to / tb)
        print(f"{name}: bincount baseline {mpix / tb:8.1f} Mpix/s   ConfusionMatrix.update {mpix / to:8.1f} Mpix/s"
              f"   time ratio {to / tb:.3f}")
    print(f"worst time ratio ConfusionMatrix / bincount ({n} x {s}x{s}, K={k}): {max(ratios):.3f}")


if __name__ == "__main__":
    main()
