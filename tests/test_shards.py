import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segpipe.formats.base import ClassInfo, Record, Source
from segpipe.params import ConvertParams
from segpipe.shards import (
    ShardError,
    decode_row,
    decode_semantic,
    encode_semantic,
    iter_rows,
    iter_samples,
    manifest_hash,
    read_manifest,
    semantic_dtype,
    shard_files,
)
from segpipe.stages.convert import run


def small_set(tmp_path, n=5, class_ids=(1, 2), ignore=255):
    """A shard set built from in-memory records (image bytes, label maps, mask instances)."""
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
    src = Source("mem", classes, ignore, lambda: iter(recs), [], count=n)
    run(ConvertParams(workers=1, rows_per_shard=2), src, tmp_path / "out", progress=False)
    return tmp_path / "out"


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
