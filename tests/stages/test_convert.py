import dataclasses
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segpipe.files import sha256_file
from segpipe.formats import coco
from segpipe.params import ConvertParams
from segpipe.shards import iter_samples, read_manifest
from segpipe.stages import convert as convert_stage
from segpipe.stages.convert import (
    PIXELS_KEY,
    ConvertError,
    Outcome,
    class_pixels,
    collect,
    hash_split,
    make_context,
    process_record,
    resolve_paths,
    run,
    source_hash,
    tile_origins,
)

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "formats"


def main(argv: list[str]) -> None:
    """`segpipe convert ARGV` as a user runs it: errors the user can fix end as one line, exit 1."""
    from segpipe.cli import main as cli

    cli(["convert", *argv])
CLASSES = [
    {"id": 0, "name": "ground", "isthing": False, "color": [80, 80, 80]},
    {"id": 1, "name": "worker", "isthing": True, "color": [255, 0, 0]},
    {"id": 2, "name": "vehicle", "isthing": True, "color": [0, 0, 255]},
]
H, W = 32, 40


def square_rle(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [h, w], "counts": rle["counts"].decode()}


def list_rle(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    flat = m.ravel(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return {"size": [h, w], "counts": runs}


def make_dataset(root: Path, n: int = 6, edit=None, fmt="JPEG") -> dict:
    """A synth-style COCO dataset: images/, masks/, annotations/instances.json, classes.json.

    Every image has a polygon worker, a compressed-RLE vehicle, and (even images) a list-RLE
    crowd region. ``edit(data, root)`` may break things before the JSON is written.
    """
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(n):
        name = f"img{i:03d}"
        pixels = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        ext = "jpg" if fmt == "JPEG" else "png"
        Image.fromarray(pixels).save(root / "images" / f"{name}.{ext}", fmt)
        sem = np.zeros((H, W), np.uint8)
        sem[2:12, 3:15] = 1
        sem[20:30, 20:36] = 2
        sem[0, :] = 255
        Image.fromarray(sem).save(root / "masks" / f"{name}.png")
        images.append({"id": i + 1, "file_name": f"{name}.{ext}", "height": H, "width": W})
        anns.append({"id": 10 * i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                     "segmentation": [[3, 2, 15, 2, 15, 12, 3, 12]], "bbox": [3, 2, 12, 10]})
        anns.append({"id": 10 * i + 2, "image_id": i + 1, "category_id": 2, "iscrowd": 0,
                     "segmentation": square_rle(H, W, 20, 30, 20, 36), "bbox": [20, 20, 16, 10]})
        if i % 2 == 0:
            anns.append({"id": 10 * i + 3, "image_id": i + 1, "category_id": 1, "iscrowd": 1,
                         "segmentation": list_rle(H, W, 14, 18, 0, 8), "bbox": [0, 14, 8, 4]})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": c["id"], "name": c["name"], "isthing": c["isthing"]} for c in CLASSES]}
    if edit:
        edit(data, root)
    (root / "annotations" / "instances.json").write_text(json.dumps(data))
    (root / "classes.json").write_text(json.dumps(CLASSES))
    return data


def convert(root: Path, out: Path, masks=True, **kw):
    params = ConvertParams(**{"workers": 1, "val_fraction": 0.3, **kw})
    src = coco.read([root / "annotations" / "instances.json"], root / "images", root / "masks" if masks else None)
    return run(params, src, out, progress=False)


def samples(out: Path):
    return {s["image_id"]: s for s in iter_samples(out)}


def reasons(manifest):
    return [(q["item"], q["reason"]) for q in manifest["quarantine"]]


def source_rle(seg, h, w):
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, h, w)
    return {"size": seg["size"], "counts": seg["counts"].encode()}


def test_converts_and_reads_back_equal_to_source(tmp_path):
    data = make_dataset(tmp_path / "raw")
    manifest = convert(tmp_path / "raw", tmp_path / "out")
    assert manifest["quarantine"] == []
    assert [c["name"] for c in manifest["classes"]] == ["ground", "worker", "vehicle"]
    assert manifest["classes"][0]["isthing"] is False and manifest["ignore_index"] == 255
    assert sum(manifest["splits"].values()) == 6
    got = samples(tmp_path / "out")
    assert set(got) == {str(i["id"]) for i in data["images"]}
    for img in data["images"]:
        s = got[str(img["id"])]
        stem = Path(img["file_name"]).stem
        src_sem = np.asarray(Image.open(tmp_path / "raw" / "masks" / f"{stem}.png"))
        np.testing.assert_array_equal(s["semantic"], src_sem)
        np.testing.assert_array_equal(s["image"], np.asarray(Image.open(tmp_path / "raw" / "images" / img["file_name"])))
        src_anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        assert [i["id"] for i in s["instances"]] == [a["id"] for a in src_anns]
        for inst, ann in zip(s["instances"], src_anns):
            assert inst["category_id"] == ann["category_id"] and inst["iscrowd"] == ann["iscrowd"]
            expect = mask_utils.decode(source_rle(ann["segmentation"], H, W))
            np.testing.assert_array_equal(mask_utils.decode(inst["segmentation"]), expect)
            assert inst["bbox"] == [float(v) for v in mask_utils.toBbox(source_rle(ann["segmentation"], H, W))]


def test_without_masks_semantic_is_rasterised_and_unlabelled_is_ignore(tmp_path):
    make_dataset(tmp_path / "raw", n=2)
    convert(tmp_path / "raw", tmp_path / "out", masks=False)
    s = samples(tmp_path / "out")["1"]
    assert (s["semantic"][2:12, 3:15] == 1).all() and (s["semantic"][20:30, 20:36] == 2).all()
    assert (s["semantic"][14:18, 0:8] == 1).all()  # the crowd region keeps its class
    assert s["semantic"][31, 39] == 255 and s["semantic"].dtype == np.uint8


def test_byte_identical_output_for_same_input_and_any_worker_count(tmp_path, monkeypatch):
    def edit(d, root):  # a duplicate image id and a bad image, so quarantined items are in the mix
        d["images"][5]["id"] = 2
        (root / "images" / "img003.jpg").write_bytes(b"")

    make_dataset(tmp_path / "raw", n=8, edit=edit)
    convert(tmp_path / "raw", tmp_path / "a", workers=1, rows_per_shard=3)
    for workers, batch in ((2, 3), (3, 1)):  # a task is BATCH records: vary both
        monkeypatch.setattr(convert_stage, "BATCH", batch)
        convert(tmp_path / "raw", tmp_path / f"w{workers}", workers=workers, rows_per_shard=3)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    for other in ("w2", "w3"):
        files_b = sorted(p.relative_to(tmp_path / other) for p in (tmp_path / other).rglob("*") if p.is_file())
        assert files_a == files_b and len(files_a) >= 4
        for rel in files_a:
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / other / rel).read_bytes(), (other, rel)
    m = read_manifest(tmp_path / "a")
    # (image 6's annotations now name an image that does not exist: dataset problems)
    assert [q["item"] for q in m["quarantine"] if q["item"] != "dataset"] == ["image 4", "image 2"]
    assert sum(m["splits"].values()) == 6
    assert all(s["rows"] <= 3 for s in m["shards"])
    md = pq.ParquetFile(tmp_path / "a" / m["shards"][0]["path"]).metadata
    assert md.num_rows == m["shards"][0]["rows"]


def test_progress_line_counts_every_image(tmp_path, monkeypatch):
    import segpipe.progress as progress

    closed = []

    class Recorded(progress.Progress):
        def close(self) -> None:
            closed.append((self.stage, self.state.done, self.state.total))
            super().close()

    monkeypatch.setattr(progress, "Progress", Recorded)
    make_dataset(tmp_path / "raw", n=5)
    src = coco.read([tmp_path / "raw" / "annotations" / "instances.json"], tmp_path / "raw" / "images")
    run(ConvertParams(workers=2), src, tmp_path / "out", progress=True)
    assert closed == [("convert coco", 5, 5)]


def test_split_declared_by_file_name_wins_and_hash_split_is_stable(tmp_path):
    root = tmp_path / "raw"
    make_dataset(root, n=4)
    (root / "annotations" / "instances.json").rename(root / "annotations" / "instances_val2017.json")
    src = coco.read([root / "annotations" / "instances_val2017.json"], root / "images", root / "masks")
    m = run(ConvertParams(workers=1), src, tmp_path / "out", progress=False)
    assert m["splits"] == {"val": 4}
    ids = [f"im{i}" for i in range(2000)]
    splits = [hash_split(i, 0.2, 0.1) for i in ids]
    assert splits == [hash_split(i, 0.2, 0.1) for i in ids]
    assert 0.15 < splits.count("val") / 2000 < 0.25 and 0.06 < splits.count("test") / 2000 < 0.14
    # growing val_fraction only moves train images into val, never val images out
    assert all(hash_split(i, 0.3, 0.1) == "val" for i, s in zip(ids, splits) if s == "val")


# --------------------------------------------------------------------------------------
# Bad input: quarantined with a reason naming the item; every good item still converts.
# --------------------------------------------------------------------------------------


def _ann(data, ann_id):
    return next(a for a in data["annotations"] if a["id"] == ann_id)


ANNOTATION_CASES = {
    "polygon4": (lambda d: _ann(d, 11).update(segmentation=[[1, 1, 5, 5]]), "has 4 numbers"),
    "polygon_odd": (lambda d: _ann(d, 11).update(segmentation=[[1, 1, 5, 1, 5, 5, 1]]), "has 7 numbers"),
    "rle_sum": (lambda d: _ann(d, 11).update(segmentation={"size": [H, W], "counts": [5, 10, 3]}), "sum to 18"),
    "rle_string_sum": (lambda d: _ann(d, 11).update(segmentation={"size": [H, W], "counts": "05"}), "sum to"),
    "rle_size": (lambda d: _ann(d, 11).update(segmentation=square_rle(H + 1, W, 0, 4, 0, 4)), "differs from the image size"),
    "rle_bad_chars": (lambda d: _ann(d, 11).update(segmentation={"size": [H, W], "counts": "\x7f\x7f"}), "invalid character"),
    "category": (lambda d: _ann(d, 11).update(category_id=99), "category_id 99 is not declared"),
    "bbox_nan": (lambda d: _ann(d, 11).update(bbox=[float("nan"), 1, 2, 2]), "NaN"),
    "bbox_negative": (lambda d: _ann(d, 11).update(bbox=[1, 1, -2, 2]), "negative width"),
    "bbox_outside": (lambda d: _ann(d, 11).update(bbox=[30, 1, 20, 2]), "outside the 40 x 32 image"),
    "absurd": (lambda d: _ann(d, 11).update(segmentation=[[0, 0, 1e15, 0, 1e15, 1e15]]), "absurd coordinates"),
    "empty": (lambda d: _ann(d, 11).update(segmentation=[]), "segmentation is empty"),
    "iscrowd": (lambda d: _ann(d, 11).update(iscrowd=3), "iscrowd 3"),
}


@pytest.mark.parametrize("case", sorted(ANNOTATION_CASES))
def test_bad_annotation_quarantines_the_annotation_and_keeps_the_rest(tmp_path, case):
    edit, expected = ANNOTATION_CASES[case]
    data = make_dataset(tmp_path / "raw", n=3, edit=lambda d, root: edit(d))
    m = convert(tmp_path / "raw", tmp_path / "out")
    assert len(m["quarantine"]) == 1, m["quarantine"]
    q = m["quarantine"][0]
    assert q["item"] == "image 2 annotation 11" and expected in q["reason"], q
    assert q["file"].endswith("instances.json")
    got = samples(tmp_path / "out")
    assert set(got) == {"1", "2", "3"}
    assert [i["id"] for i in got["2"]["instances"]] == [12]
    n_good = len(data["annotations"]) - 1
    assert sum(len(s["instances"]) for s in got.values()) == n_good


def test_duplicate_annotation_id_is_quarantined(tmp_path):
    def edit(d, root):
        _ann(d, 12).update(id=1)

    make_dataset(tmp_path / "raw", n=3, edit=edit)
    m = convert(tmp_path / "raw", tmp_path / "out")
    assert reasons(m) == [("image 2 annotation 1", "duplicate annotation id 1 (already used by image 1)")]
    assert set(samples(tmp_path / "out")) == {"1", "2", "3"}


def _png_header_only(w, h) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _write(rel, data):
    def edit(d, root):
        p = root / rel
        p.write_bytes(data(p) if callable(data) else data)

    return edit


IMAGE_CASES = {
    "missing": (lambda d, root: (root / "images" / "img001.jpg").unlink(), "image file missing"),
    "empty": (_write("images/img001.jpg", b""), "image file is empty"),
    "truncated": (_write("images/img001.jpg", lambda p: p.read_bytes()[: len(p.read_bytes()) * 3 // 4]), "truncated or corrupt"),
    "undecodable": (_write("images/img001.jpg", b"this is not a jpeg at all"), "not a decodable image"),
    "bomb": (_write("images/img001.jpg", _png_header_only(100_000, 100_000)), "decompression bomb"),
    "declared_size": (lambda d, root: d["images"][1].update(width=41), "annotations declare 41 x 32"),
    "mask_size": (_write("masks/img001.png", lambda p: _png_bytes(np.zeros((H, W + 2), np.uint8))),
                  "label map is 42 x 32, the image is 40 x 32"),
    "mask_value": (_write("masks/img001.png", lambda p: _png_bytes(np.full((H, W), 7, np.uint8))),
                   "label value(s) 7 not in the class table"),
    "mask_missing": (lambda d, root: (root / "masks" / "img001.png").unlink(), "img001.png: file not found"),
    "mask_rgb": (_write("masks/img001.png", lambda p: _png_bytes(np.zeros((H, W, 3), np.uint8))), "mode RGB"),
}


def _png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_image_or_mask_quarantines_the_image_and_keeps_the_rest(tmp_path, case):
    edit, expected = IMAGE_CASES[case]
    make_dataset(tmp_path / "raw", n=3, edit=edit)
    m = convert(tmp_path / "raw", tmp_path / "out")
    assert len(m["quarantine"]) == 1, m["quarantine"]
    q = m["quarantine"][0]
    assert q["item"] == "image 2" and expected in q["reason"], q
    assert "img001" in q["file"]
    assert set(samples(tmp_path / "out")) == {"1", "3"}


def test_decompression_bomb_is_caught_from_the_header_by_the_params_limit(tmp_path):
    make_dataset(tmp_path / "raw", n=2)
    # Both images are over the limit: nothing converts, which is an error, not an empty shard set.
    with pytest.raises(ConvertError, match=r"all 2 image\(s\) were quarantined .*over max_image_pixels=1279"):
        convert(tmp_path / "raw", tmp_path / "out", max_image_pixels=W * H - 1)
    assert not (tmp_path / "out").exists()


def test_duplicate_image_id_first_wins(tmp_path):
    def edit(d, root):
        d["images"][2]["id"] = 1

    make_dataset(tmp_path / "raw", n=3, edit=edit)
    m = convert(tmp_path / "raw", tmp_path / "out")
    items = [(q["item"], q["reason"][:22]) for q in m["quarantine"]]
    assert ("image 1", "duplicate image id 1 (") in items
    # the third image's annotations now point at image 3, which no longer exists
    assert [i for i, _ in items].count("dataset") == 3
    got = samples(tmp_path / "out")
    assert set(got) == {"1", "2"} and [i["id"] for i in got["1"]["instances"]] == [1, 2, 3]


def test_annotation_of_undeclared_image_is_a_dataset_problem(tmp_path):
    def edit(d, root):
        d["annotations"].append({"id": 999, "image_id": 77, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]]})

    make_dataset(tmp_path / "raw", n=2, edit=edit)
    m = convert(tmp_path / "raw", tmp_path / "out")
    assert len(m["quarantine"]) == 1 and "annotation 999 refers to image 77" in m["quarantine"][0]["reason"]
    assert m["quarantine"][0]["item"] == "dataset"


def test_strict_makes_a_bad_item_an_error_and_leaves_no_partial_output(tmp_path):
    make_dataset(tmp_path / "raw", n=3, edit=lambda d, root: _ann(d, 11).update(segmentation=[[1, 1, 5, 5]]))
    with pytest.raises(ConvertError, match=r"instances.json: image 2 annotation 11: polygon 0 has 4 numbers"):
        convert(tmp_path / "raw", tmp_path / "out", strict=True)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temporary leftovers


def test_rerun_replaces_the_output_whole(tmp_path):
    make_dataset(tmp_path / "raw", n=3)
    convert(tmp_path / "raw", tmp_path / "out", rows_per_shard=1)
    convert(tmp_path / "raw", tmp_path / "out", rows_per_shard=256)
    m = read_manifest(tmp_path / "out")
    on_disk = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.parquet"))
    assert on_disk == sorted(s["path"] for s in m["shards"])


# --------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------


def test_tile_origins_cover_and_overlap():
    assert tile_origins(100, 48, 8) == [0, 40, 52]
    assert tile_origins(48, 48, 8) == [0]
    assert tile_origins(30, 48, 8) == [0]


def test_tiling_cuts_image_mask_and_clips_instances(tmp_path):
    make_dataset(tmp_path / "raw", n=1, fmt="PNG")
    m = convert(tmp_path / "raw", tmp_path / "out", tile_size=24, tile_overlap=8, tile_min_area=20)
    got = samples(tmp_path / "out")
    assert set(got) == {"1@0,0", "1@16,0", "1@0,8", "1@16,8"}
    assert sum(m["splits"].values()) == 4 and len({s["split"] for s in got.values()}) == 1
    src_img = np.asarray(Image.open(tmp_path / "raw" / "images" / "img000.png"))
    src_sem = np.asarray(Image.open(tmp_path / "raw" / "masks" / "img000.png"))
    for s in got.values():
        x, y = s["tile_x"], s["tile_y"]
        assert s["source_image_id"] == "1" and s["image"].shape == (24, 24, 3)
        np.testing.assert_array_equal(s["image"], src_img[y:y + 24, x:x + 24])
        np.testing.assert_array_equal(s["semantic"], src_sem[y:y + 24, x:x + 24])
    # the crowd strip (rows 14:18, cols 0:8 = 32 px) is whole in tile (0,0) and (0,8);
    # vehicle (rows 20:30, cols 20:36): in tile (16,0) only rows 20:24 -> 4 x 16 = 64 px
    t = {i["id"]: i for i in got["1@16,0"]["instances"]}
    assert t[2]["area"] == 64 and t[2]["bbox"] == [4.0, 20.0, 16.0, 4.0]
    assert 1 not in t  # the worker (cols 3:15) does not reach x >= 16
    t = {i["id"]: i for i in got["1@0,8"]["instances"]}
    assert t[3]["area"] == 32 and t[1]["area"] == 4 * 12 and t[2]["area"] == 10 * 4
    # a sliver under tile_min_area is dropped: the worker in tile (0,8) is rows 8:12 x cols 3:15 = 48 px
    convert(tmp_path / "raw", tmp_path / "out2", tile_size=24, tile_overlap=8, tile_min_area=50)
    assert 1 not in {i["id"] for i in samples(tmp_path / "out2")["1@0,8"]["instances"]}


# --------------------------------------------------------------------------------------
# Bookkeeping: class pixels, batching into chunks, source hashing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("top", [11, 300])  # few ids: one compare per id; many: a bincount
def test_class_pixels_counts_each_id_and_never_the_ignore_index(top):
    rng = np.random.default_rng(3)
    ignore = 5  # inside 0..top, so it must be left out, not just fall off the end
    sem = rng.integers(0, top + 1, (37, 41)).astype(np.uint16)
    sem[0, :] = 65535  # values above every id are not counted either
    got = class_pixels(sem, frozenset({0, 2, top}), ignore)
    expect = np.bincount(sem[sem <= top].astype(np.int64), minlength=top + 1)
    expect[ignore] = 0
    assert got == expect.tolist() and len(got) == top + 1


def _row(image_id, split, collection, pixels):
    return {"image_id": image_id, "split": split, "collection": collection, "instances": [],
            PIXELS_KEY: pixels}


def test_collect_batches_rows_per_split_in_order_and_sums_their_counts():
    outcomes = [Outcome("a", rows=[_row("a", "train", "x", [1, 2])]),
                Outcome("b", quarantine=[{"item": "image b", "file": "f", "reason": "r"}], image_quarantined=True),
                Outcome("c", rows=[_row("c@0,0", "val", "y", [0, 5]), _row("c@4,0", "val", "y", [3, 0])]),
                Outcome("d", rows=[_row("d", "train", "y", [10, 20])], digests={"d.jpg": "00"})]
    chunk = collect(outcomes)
    assert [o.image_id for o in chunk.outcomes] == ["a", "b", "c", "d"]
    assert all(o.rows == [] for o in chunk.outcomes) and chunk.outcomes[3].digests == {"d.jpg": "00"}
    assert {k: v.column("image_id").to_pylist() for k, v in chunk.rows.items()} == {
        "train": ["a", "d"], "val": ["c@0,0", "c@4,0"]}
    assert {k: v.tolist() for k, v in chunk.class_pixels.items()} == {"train": [11, 22], "val": [3, 5]}
    assert chunk.collections == {"x": {"train": 1}, "y": {"val": 2, "train": 1}}
    assert collect([]).rows == {}


def test_workers_hash_the_files_they_read_and_the_source_hash_stays_that_of_every_file(tmp_path):
    make_dataset(tmp_path / "raw", n=4)
    root = tmp_path / "raw"

    def source():
        return coco.read([root / "annotations" / "instances.json"], root / "images", root / "masks")

    record = next(source().records())
    outcome = process_record(record, make_context(source(), ConvertParams()))
    files = [root / "images" / "img000.jpg", root / "masks" / "img000.png"]
    assert outcome.digests == {str(f): sha256_file(f) for f in files}
    m = run(ConvertParams(workers=2), source(), tmp_path / "out", progress=False)
    assert m["source_sha256"] == source_hash(source().files)  # each file hashed by the parent
    # a digest is trusted as given: one that differs shows in the hash
    assert source_hash(source().files, {str(files[0]): "0" * 64}) != m["source_sha256"]


def test_resolve_paths_equals_path_resolve_through_symbolic_links(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "real" / "a.jpg").write_bytes(b"a")
    (tmp_path / "other" / "t.jpg").write_bytes(b"t")
    (tmp_path / "linkdir").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "l.jpg").symlink_to(tmp_path / "other" / "t.jpg")
    (tmp_path / "real" / "rel").symlink_to("../other")
    monkeypatch.chdir(tmp_path / "real")
    paths = [tmp_path / "real" / "a.jpg", tmp_path / "linkdir" / "a.jpg", tmp_path / "linkdir" / "l.jpg",
             Path("a.jpg"), Path("missing.jpg"), tmp_path / "nope" / "x.jpg", Path("rel/t.jpg"),
             Path("rel/../a.jpg"), tmp_path / "linkdir" / ".." / "other" / "t.jpg", "./a.jpg", Path(".")]
    assert resolve_paths(paths) == [str(Path(p).resolve()) for p in paths]
    assert resolve_paths(paths)[2] == str(tmp_path.resolve() / "other" / "t.jpg")


# --------------------------------------------------------------------------------------
# The real COCO sample and the CLI
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(not (SHARED / "coco_dataset").is_dir(), reason="../shared/formats (sample data) not present")
def test_shared_coco_sample_converts_and_reads_back_equal(tmp_path):
    root = SHARED / "coco_dataset" / "coco_instances"
    out = tmp_path / "out"
    main(["--format", "coco", "--annotations", str(root / "annotations" / "instances_train.json"),
          "--annotations", str(root / "annotations" / "instances_val.json"), "--images", str(root / "images"),
          "--out", str(out), "--no-progress", "--set", "convert.workers=1"])
    m = read_manifest(out)
    assert m["splits"] == {"train": 1, "val": 1}
    # the train file's only annotation is box-only (segmentation []): quarantined, image kept
    assert reasons(m) == [("image 5 annotation 1", "segmentation is empty (no polygon, no RLE: a box-only "
                                                     "annotation has no mask)")]
    got = samples(out)
    assert got["5"]["instances"] == [] and got["5"]["image"].shape == (5, 10, 3)
    val = json.loads((root / "annotations" / "instances_val.json").read_text())
    b = got["40"]
    np.testing.assert_array_equal(b["image"], np.asarray(Image.open(root / "images" / "val" / "b.jpg").convert("RGB")))
    for inst, ann in zip(b["instances"], val["annotations"], strict=True):
        assert (inst["id"], inst["category_id"], inst["iscrowd"]) == (ann["id"], ann["category_id"], ann["iscrowd"])
        np.testing.assert_array_equal(mask_utils.decode(inst["segmentation"]),
                                      mask_utils.decode(source_rle(ann["segmentation"], 10, 5)))
    expect = np.full((10, 5), 255, np.uint8)
    expect[0:2, 0:1] = 1
    expect[:, 0:2] = 2  # the crowd RLE (20 pixels, column-major) comes later and lies on top
    np.testing.assert_array_equal(b["semantic"], expect)


def test_cli_reads_params_file_and_strict_flag(tmp_path, capsys):
    make_dataset(tmp_path / "raw", n=3, edit=lambda d, root: _ann(d, 11).update(category_id=42))
    params = tmp_path / "params.yaml"
    params.write_text("convert:\n  workers: 1\n  rows_per_shard: 2\n  val_fraction: 0.0\n")
    argv = ["--format", "coco", "--annotations", str(tmp_path / "raw/annotations/instances.json"),
            "--images", str(tmp_path / "raw/images"), "--masks", str(tmp_path / "raw/masks"),
            "--out", str(tmp_path / "out"), "--params", str(params), "--no-progress"]
    main(argv)
    m = read_manifest(tmp_path / "out")
    assert m["splits"] == {"train": 3} and len(m["shards"]) == 2 and m["params"]["rows_per_shard"] == 2
    assert "1 quarantined item(s)" in capsys.readouterr().out
    from segpipe.cli import main as cli

    with pytest.raises(SystemExit) as e:  # a ConvertError: one line from the CLI, exit 1
        cli(["convert", *argv, "--strict"])
    assert e.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("segpipe convert: error: --strict:") and "category_id 42 is not declared" in line


def test_params_are_checked():
    from segpipe.params import ParamsError

    with pytest.raises(ParamsError, match="val_fraction"):
        run(dataclasses.replace(ConvertParams(), val_fraction=0.9, test_fraction=0.2), None, Path("x"))


# --------------------------------------------------------------------------------------
# Nothing silent: paths out of the dataset, duplicate class names, runs that produce nothing
# --------------------------------------------------------------------------------------


def _escaping(file_name_of):
    """An edit adding image 99 whose file_name (``file_name_of(root)``) points at a real JPEG
    outside the dataset, ``<tmp>/secret/photo.jpg``."""
    def edit(d, root):
        secret = root.parent / "secret" / "photo.jpg"
        secret.parent.mkdir()
        Image.fromarray(np.full((H, W, 3), 123, np.uint8)).save(secret)
        d["images"].append({"id": 99, "file_name": file_name_of(root), "height": H, "width": W})

    return edit


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_file_name_outside_the_dataset_is_quarantined_and_its_bytes_never_stored(tmp_path, kind, capsys):
    name_of = (lambda root: "../../secret/photo.jpg") if kind == "relative" else (
        lambda root: str(root.parent / "secret" / "photo.jpg"))
    make_dataset(tmp_path / "raw", n=2, edit=_escaping(name_of))
    secret = (tmp_path / "secret" / "photo.jpg").read_bytes()
    argv = ["--format", "coco", "--annotations", str(tmp_path / "raw/annotations/instances.json"),
            "--images", str(tmp_path / "raw/images"), "--out", str(tmp_path / "out"), "--no-progress",
            "--set", "convert.workers=1"]
    main(argv)
    m = read_manifest(tmp_path / "out")
    (q,) = m["quarantine"]
    assert q["item"] == "image 99" and q["file"].endswith("instances.json")
    assert q["reason"].startswith(f"image 99: file_name {name_of(tmp_path / 'raw')!r} ")
    assert set(samples(tmp_path / "out")) == {"1", "2"}
    for part in (tmp_path / "out").rglob("*.parquet"):
        assert secret not in part.read_bytes()
    with pytest.raises(SystemExit) as e:
        main(argv + ["--strict"])
    assert e.value.code == 1 and "image 99: file_name" in capsys.readouterr().err


def test_duplicate_class_names_are_an_error_naming_both_ids(tmp_path, capsys):
    def edit(d, root):
        d["categories"].append({"id": 7, "name": "worker", "isthing": True})

    make_dataset(tmp_path / "raw", n=2, edit=edit)
    (tmp_path / "raw" / "classes.json").unlink()
    argv = ["--format", "coco", "--annotations", str(tmp_path / "raw/annotations/instances.json"),
            "--images", str(tmp_path / "raw/images"), "--out", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1 and not (tmp_path / "out").exists()
    assert "categories: class ids 1 and 7 are both named 'worker'" in capsys.readouterr().err
    # Every format gets the same check: a class table from any reader.
    from segpipe.formats.base import ClassInfo, Source

    twice = [ClassInfo(1, "pipe", True, (0, 0, 0)), ClassInfo(2, "pipe", True, (1, 1, 1))]
    with pytest.raises(ConvertError, match="mem class table: class ids 1 and 2 are both named 'pipe'"):
        run(ConvertParams(workers=1), Source("mem", twice, 255, lambda: iter(()), []), tmp_path / "o", progress=False)


def test_cityscapes_set_whose_only_image_is_quarantined_exits_non_zero(tmp_path, capsys):
    root = tmp_path / "cs"
    for kind in ("gtFine", "leftImg8bit"):
        (root / kind / "val" / "berlin").mkdir(parents=True)
    Image.new("RGB", (3, 1)).save(root / "leftImg8bit/val/berlin/berlin_000000_000001_leftImg8bit.png")
    (root / "gtFine/val/berlin/berlin_000000_000001_gtFine_labelIds.png").write_bytes(b"garbage")
    from segpipe.cli import main as cli

    with pytest.raises(SystemExit) as e:
        cli(["convert", "--format", "cityscapes", "--input", str(root), "--out", str(tmp_path / "out"), "--no-progress"])
    assert e.value.code == 1 and not (tmp_path / "out").exists()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("segpipe convert: error: cityscapes: no image converted: all 1 image(s) were quarantined")
    assert "berlin_000000_000001_gtFine_labelIds.png" in line and "nothing was written" in line


def test_mask_dir_without_label_folder_exits_non_zero(tmp_path, capsys):
    root = tmp_path / "md"
    (root / "images" / "training").mkdir(parents=True)
    Image.new("RGB", (4, 3)).save(root / "images" / "training" / "a.jpg")
    (root / "segmentations" / "training").mkdir(parents=True)  # not a label folder segpipe knows
    with pytest.raises(SystemExit) as e:
        main(["--format", "mask-dir", "--input", str(root), "--out", str(tmp_path / "out"), "--no-progress"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "mask-dir: no image converted: all 1 image(s) were quarantined" in err and "annotations/" in err


# --------------------------------------------------------------------------------------
# A killed convert: no orphaned workers, and its temporary output is cleaned by the next run
# --------------------------------------------------------------------------------------

SLOW_CONVERT = """
import sys, time
from pathlib import Path
from segpipe.formats import coco
from segpipe.params import ConvertParams
from segpipe.stages import convert

def slow(record, ctx):  # workers are forked after this, so they sleep instead of converting
    time.sleep(300)

convert.process_record = slow
source = coco.read([Path(sys.argv[1])], Path(sys.argv[2]))
convert.run(ConvertParams(workers=2), source, Path(sys.argv[3]), progress=False)
"""


def test_killed_convert_leaves_no_workers_and_its_temporaries_go_on_the_next_run(tmp_path):
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    psutil = pytest.importorskip("psutil")
    make_dataset(tmp_path / "raw", n=8)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(tmp_path / "raw/annotations/instances.json"),
                             str(tmp_path / "raw/images"), str(out)])
    workers: list = []
    try:
        deadline = time.monotonic() + 120
        while len(psutil.Process(proc.pid).children()) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the pool never started"
            time.sleep(0.1)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # its temporary output
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert alive == [], f"workers outlived the killed convert: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for worker in workers:  # only when the assertion above failed: leave no orphan behind
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert stale  # a SIGKILL leaves no chance to clean up...
    convert(tmp_path / "raw", out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []  # ...the next run does
    assert sum(read_manifest(out)["splits"].values()) == 8
