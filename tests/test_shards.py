import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segpipe.formats.base import ClassInfo, Record, Source
from segpipe.params import ConvertParams
from segpipe.shards import (
    SCHEMA,
    ShardError,
    ShardWriter,
    decode_row,
    decode_semantic,
    encode_semantic,
    iter_rows,
    iter_samples,
    manifest_hash,
    open_shards,
    read_manifest,
    read_shard,
    record_batch,
    semantic_dtype,
    shard_files,
    table_rows,
    verify_split,
)
from segpipe.stages.convert import run


def small_source(tmp_path, n=5, class_ids=(1, 2), ignore=255, fail_after=None):
    """In-memory records (image files, label maps, mask instances); reading record ``fail_after``
    raises, as a source that breaks mid-conversion."""
    rng = np.random.default_rng(1)
    recs = []
    for i in range(n):
        img = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(img)
        sem = np.full((12, 16), class_ids[0], np.uint16 if ignore > 255 else np.uint8)
        sem[:4, :4] = class_ids[1]
        sem[-1] = ignore
        m = np.zeros((12, 16), bool)
        m[:4, :4] = True
        recs.append(Record(image_id=f"im{i}", source="mem", image_path=img, split="train" if i < 3 else "val",
                           semantic=lambda s=sem: s,
                           instances=[{"id": i, "category_id": class_ids[1], "iscrowd": 0, "mask": m}]))
    classes = [ClassInfo(c, f"c{c}", True, (c % 256, 0, 0)) for c in class_ids]

    def records():
        for i, r in enumerate(recs):
            if i == fail_after:
                raise OSError(f"{r.image_path}: read error")
            yield r

    return Source("mem", classes, ignore, records, [], count=n)


def small_set(tmp_path, n=5, class_ids=(1, 2), ignore=255, out=None):
    """A shard set built from in-memory records, at ``out`` (a folder or a URI; default tmp_path/out)."""
    out = tmp_path / "out" if out is None else out
    run(ConvertParams(workers=1, rows_per_shard=2), small_source(tmp_path, n, class_ids, ignore), out, progress=False)
    return out


def test_semantic_roundtrip_uint8_and_uint16():
    for dtype, top in ((np.uint8, 255), (np.uint16, 65535)):
        a = np.random.default_rng(0).integers(0, top + 1, (7, 9)).astype(dtype)
        data, enc = encode_semantic(a, semantic_dtype(top))
        assert enc == f"zstd-{np.dtype(dtype).name}"
        np.testing.assert_array_equal(decode_semantic(data, 7, 9, enc), a)
    with pytest.raises(ShardError, match="63 values, expected 7 x 10"):
        decode_semantic(bytes(63), 7, 10, "raw-uint8")
    with pytest.raises(ShardError, match="does not decompress as 7 x 10 uint8"):
        decode_semantic(bytes(63), 7, 10, "zstd-uint8")
    with pytest.raises(ShardError, match="unknown semantic encoding"):
        decode_semantic(b"", 1, 1, "jpeg")


def rows_by_hand(n: int, seed: int = 0) -> list[dict]:
    """Shard rows as the converter builds them: encoded bytes, 0-3 instances each."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        sem, enc = encode_semantic(rng.integers(0, 3, (6, 5)).astype(np.uint8), np.uint8)
        rows.append({"image_id": f"im{i}", "split": "train", "height": 6, "width": 5,
                     "image": rng.bytes(int(rng.integers(0, 40))), "image_format": "PNG", "semantic": sem,
                     "semantic_encoding": enc, "source_image_id": f"im{i}", "tile_x": 0, "tile_y": i,
                     "collection": "site", "instances": [
                         {"id": 10 * i + k, "category_id": k, "iscrowd": k % 2, "bbox": [0.0, 1.0, 2.5, 3.0],
                          "area": 7 + k, "counts": f"0{k}5", "size": [6, 5]} for k in range(i % 4)]})
    return rows


def test_record_batch_equals_from_pylist():
    rows = rows_by_hand(7)
    rows[2]["instances"] = None  # a null list, unlike []
    rows[3] = {"image_id": "sparse", "instances": [rows[1]["instances"][0]]}  # missing keys are null
    rows[4]["image"] = b"\x00ends in zero bytes\x00\x00"
    got = record_batch(rows)
    assert got.equals(pa.RecordBatch.from_pylist(rows, schema=SCHEMA))
    assert got.column("instances").null_count == 1 and got.column("split").null_count == 1
    assert table_rows(rows).to_pylist() == pa.Table.from_pylist(rows, schema=SCHEMA).to_pylist()
    assert record_batch([]).num_rows == 0
    with pytest.raises(ValueError, match=r"row 0 \(image im0\): an instance needs a bbox of 4"):
        record_batch([{**rows[1], "image_id": "im0", "instances": [{**rows[1]["instances"][0], "bbox": [1, 2]}]}])


def test_record_batch_does_not_import_pandas():
    # pa.array and from_pylist import pandas on first use: about 1 s of CPU in each converter worker
    code = ("import sys; from segpipe.shards import record_batch; from tests.test_shards import rows_by_hand; "
            "record_batch(rows_by_hand(3)); print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False", out.stderr


def test_shard_bytes_and_checksums_do_not_depend_on_how_rows_are_batched(tmp_path):
    rows = rows_by_hand(11)
    batchings = {"one batch": [rows], "row by row": [[r] for r in rows],
                 "uneven": [rows[:3], rows[3:4], [], rows[4:10], rows[10:]]}
    written = {}
    for name, batches in batchings.items():
        out = tmp_path / name.replace(" ", "_")
        writer = ShardWriter(out, "train", rows_per_shard=4, row_group_rows=3)
        for batch in batches:
            writer.write(record_batch(batch))
        entries = writer.close()
        written[name] = (entries, [(out / e["path"]).read_bytes() for e in entries])
    (entries, data), *others = written.values()
    assert all(other == (entries, data) for other in others)
    assert [e["rows"] for e in entries] == [4, 4, 3]
    assert [pq.ParquetFile(tmp_path / "one_batch" / e["path"]).metadata.num_row_groups for e in entries] == [2, 2, 1]
    for e, blob in zip(entries, data):  # the checksum taken while writing is that of the file
        assert e["bytes"] == len(blob) and e["sha256"] == hashlib.sha256(blob).hexdigest()
    assert pq.read_table(tmp_path / "uneven" / "train" / "part-00002.parquet").to_pylist() == \
        table_rows(rows[8:]).to_pylist()


def test_writer_refuses_rows_outside_the_schema(tmp_path):
    writer = ShardWriter(tmp_path, "train", rows_per_shard=4)
    with pytest.raises(ValueError, match="rows for train are not in the shard schema"):
        writer.write(pa.record_batch({"image_id": ["a"]}))
    assert writer.close() == [] and not any(tmp_path.iterdir())


def test_reader_api(tmp_path):
    out = small_set(tmp_path)
    m = read_manifest(out)
    assert m["splits"] == {"train": 3, "val": 2} and m["semantic_encoding"] == "zstd-uint8"
    assert [p.relative_to(out).as_posix() for p in shard_files(out, "train")] == [
        "train/part-00000.parquet", "train/part-00001.parquet"]
    assert len(manifest_hash(out)) == 64
    val = list(iter_samples(out, split="val"))
    assert [s["image_id"] for s in val] == ["im3", "im4"]
    s = val[0]
    assert s["image"].shape == (12, 16, 3) and s["image"].dtype == np.uint8
    assert s["semantic"][0, 0] == 2 and s["semantic"][-1, 0] == 255
    inst = s["instances"][0]
    assert inst["bbox"] == [0.0, 0.0, 4.0, 4.0] and mask_utils.decode(inst["segmentation"]).sum() == 16
    # a single shard file works too (its manifest is found two levels up)
    one = list(iter_samples(shard_files(out, "train")[1]))
    assert [x["image_id"] for x in one] == ["im2"]
    with pytest.raises(ShardError, match="no split 'test'"):
        shard_files(out, "test")


def test_decode_row_on_numpy_values_like_ray_data(tmp_path):
    out = small_set(tmp_path)
    table = pq.read_table(shard_files(out, "train")[0])
    df = table.to_pandas()  # lists become numpy arrays, as Ray Data hands them out
    row = {k: df[k].iloc[0] for k in df.columns}
    assert isinstance(row["instances"], np.ndarray)
    s = decode_row(row)
    ref = next(iter_samples(out))
    assert s["image_id"] == ref["image_id"] and s["instances"] == ref["instances"]
    np.testing.assert_array_equal(s["semantic"], ref["semantic"])
    np.testing.assert_array_equal(s["image"], ref["image"])


def test_uint16_labels_when_class_ids_exceed_uint8(tmp_path):
    out = small_set(tmp_path, class_ids=(300, 7), ignore=65535)
    assert read_manifest(out)["semantic_encoding"] == "zstd-uint16"
    s = next(iter_samples(out))
    assert s["semantic"].dtype == np.uint16 and s["semantic"][0, 0] == 7 and s["semantic"][5, 5] == 300


def test_tampered_shard_is_detected(tmp_path):
    out = small_set(tmp_path)
    shard = shard_files(out, "val")[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.chmod(0o644)
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="checksum does not match the manifest"):
        list(iter_samples(out, split="val"))
    # without the sha256 check, Parquet's page checksums still catch a flipped data byte
    with pytest.raises((ShardError, ValueError, OSError)):
        list(iter_samples(out, split="val", verify=False))
    assert len(list(iter_samples(out, split="train"))) == 3


def test_page_checksums_are_written(tmp_path):
    out = small_set(tmp_path, n=2)
    shard = shard_files(out)[0]
    data = bytearray(shard.read_bytes())
    # flip a byte inside the first image's bytes (PNG signature follows its page header)
    pos = bytes(data).index(b"\x89PNG") + 40
    data[pos] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="cannot read shard"):
        list(iter_rows(out, verify=False))


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(ShardError, match="manifest not found"):
        read_manifest(tmp_path)


def test_malformed_manifest_names_the_key_and_shard_paths_stay_inside(tmp_path):
    import json

    out = small_set(tmp_path, n=2)
    manifest = json.loads((out / "manifest.json").read_text())
    for broken, match in (
        ({**manifest, "classes": None}, "key 'classes' missing or not a list"),
        ({**manifest, "shards": [{"path": "train/part-00000.parquet"}]}, r"shards\[0\] needs path, split, rows"),
        ({**manifest, "shards": [{**manifest["shards"][0], "path": "../../etc/passwd"}]},
         r"shards\[0\]: path '../../etc/passwd' climbs out of its folder"),
    ):
        (out / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(ShardError, match=match):
            read_manifest(out)


# ----------------------------------------------------------------------------- on moto's S3 server


def test_shard_set_on_s3_reads_like_a_local_one(s3, tmp_path):
    local = small_set(tmp_path)
    uri = small_set(tmp_path, out=s3.uri("shards"))
    assert s3.files("shards") == ["manifest.json", "train/part-00000.parquet", "train/part-00001.parquet",
                                  "val/part-00000.parquet"]
    assert not any(p.name.endswith(":") for p in tmp_path.rglob("*"))  # nothing local named after a scheme
    # the same input gives the same manifest, wherever it is written
    assert manifest_hash(uri) == manifest_hash(local) and read_manifest(uri) == read_manifest(local)
    shards = open_shards(uri)
    assert shards.root == uri and shards.location_of(shards.files_of("val")[0]).uri == f"{uri}/val/part-00000.parquet"
    verify_split(shards, "train")
    ids = [s["image_id"] for s in iter_samples(uri)]
    assert ids == [s["image_id"] for s in iter_samples(local)] == ["im0", "im1", "im2", "im3", "im4"]
    assert len(list(iter_rows(uri, verify=False, split="val", columns=["image_id"]))) == 2


def test_shard_set_on_s3_is_verified_on_read(s3, tmp_path):
    uri = small_set(tmp_path, out=s3.uri("shards"))
    shards = open_shards(uri)
    key = f"{s3.bucket}/shards/val/part-00000.parquet"
    data = bytearray(s3.read("shards/val/part-00000.parquet"))
    data[len(data) // 3] ^= 0xFF
    with s3.fs().open_output_stream(key) as f:
        f.write(bytes(data))
    with pytest.raises(ShardError, match=f"{uri}/val/part-00000.parquet: checksum does not match the manifest"):
        verify_split(shards, "val")
    with pytest.raises(ShardError, match="checksum does not match the manifest"):
        list(iter_samples(uri, split="val"))
    s3.fs().delete_file(key)
    with pytest.raises(ShardError, match=f"{uri}/val/part-00000.parquet: shard listed in the manifest is missing"):
        read_shard(shards, shards.files_of("val")[0])
    with pytest.raises(ShardError, match=f"{uri}/val/part-00000.parquet: shard listed in the manifest is missing"):
        verify_split(shards, "val")


def test_no_partial_shard_set_is_ever_visible_on_s3(s3, tmp_path):
    uri = s3.uri("shards")
    small_set(tmp_path, n=5, out=uri)
    with pytest.raises(OSError, match="read error"):  # a conversion that breaks after some shards were uploaded
        run(ConvertParams(workers=1, rows_per_shard=1), small_source(tmp_path, fail_after=3), uri, progress=False)
    with pytest.raises(ShardError, match=f"{uri}/manifest.json: manifest not found \\(a write to it is unfinished"):
        open_shards(uri)
    small_set(tmp_path, n=2, out=uri)  # the next conversion replaces it whole; stale shards are deleted
    assert s3.files("shards") == ["manifest.json", "train/part-00000.parquet"]
    assert [s["image_id"] for s in iter_samples(uri)] == ["im0", "im1"]
