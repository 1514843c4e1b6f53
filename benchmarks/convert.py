"""Time ``segpipe convert`` against a naive one-process converter on the same synthetic data.

    .venv/bin/python benchmarks/convert.py [--images 300] [--size 512] [--workers 2]

The naive converter does, per image: a full decode of the image to validate it, read the
label PNG, rasterise every annotation with pycocotools (one full-size decode each) and
re-encode it as RLE, PNG-encode the label map, and append a row to a Parquet writer. The real
``run`` stores the original image bytes (reduced-scale JPEG decode to validate), keeps the
source RLE/polygon as RLE without full-size decodes, stores raw label bytes in a zstd column,
and uses a process pool. Also measures how fast each label-map encoding decodes (the choice
recorded in the manifest).

The machine may be shared, so the two converters run in interleaved pairs (``--repeat`` of
them) and the ratio reported is the median of the pairs' ratios; each run's CPU seconds (the
converter's process plus its workers) are printed too, as they vary less with the load than
wall time. The host and its load average are printed first. The last line is
``ratio: X.XXx`` (real / naive images per second, the median over the pairs).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

from segpipe.formats import coco
from segpipe.params import ConvertParams, SynthParams
from segpipe.shards import decode_semantic, encode_semantic
from segpipe.stages import convert, synth

NAIVE_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("height", pa.int32()), ("width", pa.int32()), ("image", pa.binary()),
    ("semantic_png", pa.binary()),
    ("instances", pa.list_(pa.struct([("category_id", pa.int32()), ("iscrowd", pa.uint8()),
                                      ("bbox", pa.list_(pa.float64())), ("counts", pa.string())]))),
])


def naive_convert(raw: Path, out: Path, rows_per_shard: int = 256) -> int:
    """The straightforward converter: one process, full decodes everywhere."""
    data = json.loads((raw / "annotations" / "instances.json").read_text())
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    out.mkdir(parents=True, exist_ok=True)
    writer = pq.ParquetWriter(out / "naive.parquet", NAIVE_SCHEMA, compression="zstd")
    rows = []
    for img in data["images"]:
        path = raw / "images" / img["file_name"]
        blob = path.read_bytes()
        pixels = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))  # validate by decoding
        h, w = pixels.shape[:2]
        labels = np.asarray(Image.open(raw / "masks" / (Path(img["file_name"]).stem + ".png")))
        insts = []
        for a in by_image.get(img["id"], []):
            seg = a["segmentation"]
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg["counts"], list):
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = {"size": seg["size"], "counts": seg["counts"].encode()}
            m = mask_utils.decode(rle)
            enc = mask_utils.encode(np.asfortranarray(m))
            insts.append({"category_id": a["category_id"], "iscrowd": a["iscrowd"],
                          "bbox": [float(v) for v in mask_utils.toBbox(enc)], "counts": enc["counts"].decode()})
        buf = io.BytesIO()
        Image.fromarray(labels).save(buf, "PNG")
        rows.append({"image_id": str(img["id"]), "height": h, "width": w, "image": blob,
                     "semantic_png": buf.getvalue(), "instances": insts})
        if len(rows) >= 64:
            writer.write_table(pa.Table.from_pylist(rows, schema=NAIVE_SCHEMA))
            rows = []
    if rows:
        writer.write_table(pa.Table.from_pylist(rows, schema=NAIVE_SCHEMA))
    writer.close()
    return len(data["images"])


def semantic_encodings(raw: Path, n: int = 60) -> dict[str, float]:
    """ms per label map to read back from Parquet + decode: PNG bytes vs raw bytes in a zstd column."""
    maps = [np.asarray(Image.open(p)) for p in sorted((raw / "masks").glob("*.png"))[:n]]
    results = {}
    for name, encode, decode, comp in (
        ("png", lambda a: _png(a), lambda b, a: np.asarray(Image.open(io.BytesIO(b))), "none"),
        ("zstd-uint8 (stored)", lambda a: encode_semantic(a, np.uint8)[0],
         lambda b, a: decode_semantic(b, *a.shape, "zstd-uint8"), "none"),
    ):
        buf = io.BytesIO()
        pq.write_table(pa.table({"s": pa.array([encode(a) for a in maps], pa.binary())}), buf, compression=comp)
        t0 = time.perf_counter()
        for _ in range(3):
            col = pq.read_table(io.BytesIO(buf.getvalue())).column("s").to_pylist()
            for b, a in zip(col, maps):
                decode(b, a)
        results[name] = (time.perf_counter() - t0) / (3 * len(maps)) * 1e3
        results[name + " bytes"] = buf.getbuffer().nbytes / len(maps)
    return results


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def host() -> str:
    """CPU model, cores and the load average right now."""
    model = platform.processor() or "unknown CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, load average {load}"


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and of the children it waited for) of ``fn()``."""
    def cpu() -> float:
        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))

    c0, t0 = cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu() - c0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="interleaved pairs of runs; the median ratio is reported")
    parser.add_argument("--data", type=Path, help="reuse/keep the synthetic data here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        raw = args.data or Path(tmp) / "raw"
        if not (raw / "annotations" / "instances.json").is_file():
            print(f"generating {args.images} synthetic {args.size}x{args.size} images ...", file=sys.stderr)
            synth.run(SynthParams(images=args.images, size=(args.size, args.size), workers=args.workers), raw)
        n = len(json.loads((raw / "annotations" / "instances.json").read_text())["images"])

        enc = semantic_encodings(raw)
        print("label map read+decode: " + ", ".join(f"{k} {v:.3f} {'B' if 'bytes' in k else 'ms'}"
                                                    for k, v in enc.items()))

        def real() -> None:
            source = coco.read([raw / "annotations" / "instances.json"], raw / "images", raw / "masks")
            manifest = convert.run(ConvertParams(workers=args.workers), source, Path(tmp) / "shards", progress=False)
            assert sum(manifest["splits"].values()) == n, manifest["quarantine"][:3]

        # One pair untimed: first-touch costs (page cache, lazy imports) fall on whichever runs first.
        naive_convert(raw, Path(tmp) / "naive")
        real()
        print(f"host: {host()}")
        naive_runs, real_runs = [], []
        for _ in range(args.repeat):
            naive_runs.append(timed(lambda: naive_convert(raw, Path(tmp) / "naive")))
            real_runs.append(timed(real))
            (nw, nc), (rw, rc) = naive_runs[-1], real_runs[-1]
            print(f"  pair: naive {nw:.2f} s ({nc:.2f} CPU s), segpipe convert {rw:.2f} s ({rc:.2f} CPU s): "
                  f"{nw / rw:.2f}x", file=sys.stderr)
        ratios = [nw / rw for (nw, _), (rw, _) in zip(naive_runs, real_runs)]
        naive_w, real_w = (statistics.median(w for w, _ in runs) for runs in (naive_runs, real_runs))
        naive_c, real_c = (statistics.median(c for _, c in runs) for runs in (naive_runs, real_runs))

        print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
        print(f"naive: {n / naive_w:.1f} images/s (1 process; median run; {naive_c:.2f} CPU s)")
        print(f"segpipe convert: {n / real_w:.1f} images/s ({args.workers} workers; median run; "
              f"{real_c:.2f} CPU s with its workers)")
        print(f"pair ratios: {', '.join(f'{r:.2f}' for r in ratios)}; best of each: "
              f"{min(w for w, _ in naive_runs) / min(w for w, _ in real_runs):.2f}x")
        print(f"ratio: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
