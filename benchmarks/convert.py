"""Time ``segpipe convert`` against a naive one-process converter on the same synthetic data.

    .venv/bin/python benchmarks/convert.py [--images 300] [--size 512] [--workers 2]

The naive converter does, per image: a full decode of the image to validate it, read the
label PNG, rasterise every annotation with pycocotools (one full-size decode each) and
re-encode it as RLE, PNG-encode the label map, and append a row to a Parquet writer. The real
``run`` stores the original image bytes (reduced-scale JPEG decode to validate), keeps the
source RLE/polygon as RLE without full-size decodes, stores raw label bytes in a zstd column,
and uses a process pool. Also measures how fast each label-map encoding decodes (the choice
recorded in the manifest). The last line is ``ratio: X.XXx`` (real / naive images per second).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best is reported")
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

        # The machine is shared: interleave the two and keep each one's best of --repeat runs.
        naive_s, real_s = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            naive_convert(raw, Path(tmp) / "naive")
            naive_s.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            source = coco.read([raw / "annotations" / "instances.json"], raw / "images", raw / "masks")
            manifest = convert.run(ConvertParams(workers=args.workers), source, Path(tmp) / "shards", progress=False)
            real_s.append(time.perf_counter() - t0)
            assert sum(manifest["splits"].values()) == n, manifest["quarantine"][:3]
            print(f"  run: naive {naive_s[-1]:.2f} s, segpipe convert {real_s[-1]:.2f} s", file=sys.stderr)
        naive, real = n / min(naive_s), n / min(real_s)

        print(f"naive: {naive:.1f} images/s (1 process)")
        print(f"segpipe convert: {real:.1f} images/s ({args.workers} workers)")
        print(f"ratio: {real / naive:.2f}x")


if __name__ == "__main__":
    main()
