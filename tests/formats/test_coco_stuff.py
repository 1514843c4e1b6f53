import json
from pathlib import Path

import numpy as np
from format_samples import convert, records_by_id, sample
from PIL import Image
from pycocotools import mask as mask_utils

from segpipe.formats import coco_stuff


def expected_semantic(root: Path) -> dict[str, np.ndarray]:
    """Each annotation's (valid, sample) RLE decoded by pycocotools, painted with its category."""
    out = {}
    for path in sorted((root / "annotations").glob("stuff_*.json")):
        doc = json.loads(path.read_text())
        for img in doc["images"]:
            sem = np.full((img["height"], img["width"]), 255)
            for ann in doc["annotations"]:
                if ann["image_id"] == img["id"]:
                    rle = mask_utils.frPyObjects(ann["segmentation"], img["height"], img["width"])
                    sem[mask_utils.decode(rle).astype(bool)] = ann["category_id"]
            out[Path(img["file_name"]).stem] = sem
    return out


def test_sample_records_classes_and_semantic():
    root = sample("coco_dataset", "coco_stuff")
    source = coco_stuff.read(root)
    assert source.problems == []
    assert [(c.id, c.name, c.isthing) for c in source.classes] == [(1, "a", False), (2, "b", False)]
    records = records_by_id(source)
    assert sorted(records) == ["a", "b"] and records["a"].split == "train" and records["b"].split == "val"
    expected = expected_semantic(root)
    for image_id, record in records.items():
        assert record.problems == [] and record.instances == []
        np.testing.assert_array_equal(record.semantic(), expected[image_id])
    assert (records["a"].semantic() == 1).sum() == 20 and (records["b"].semantic() == 2).sum() == 20


def _dataset(tmp_path: Path, segmentations: list) -> Path:
    root = tmp_path / "stuff"
    (root / "images" / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    doc = {"categories": [{"id": 92, "name": "banner"}, {"id": 183, "name": "other"}], "images": [], "annotations": []}
    for i, seg in enumerate(segmentations):
        Image.new("RGB", (3, 2)).save(root / "images" / "val" / f"im{i}.jpg")
        doc["images"].append({"id": i, "file_name": f"im{i}.jpg", "height": 2, "width": 3})
        doc["annotations"].append({"id": 100 + i, "image_id": i, "category_id": 92, "segmentation": seg})
    (root / "annotations" / "stuff_val2017.json").write_text(json.dumps(doc))
    return root


def test_bad_rle_is_a_problem_and_never_reaches_pycocotools(tmp_path):
    good = mask_utils.encode(np.asfortranarray(np.array([[1, 0, 1], [1, 1, 0]], dtype=np.uint8)))
    segs = [
        {"size": [2, 3], "counts": good["counts"].decode()},  # compressed string
        {"size": [2, 3], "counts": [1, 2, 2]},                # sums to 5, not 6
        {"size": [3, 2], "counts": [6]},                      # size differs from the image
        {"size": [2, 3], "counts": "(((((((("},                # garbage string
        [[0, 0, 1, 0, 1, 1]],                                  # a polygon: COCO-Stuff is RLE
    ]
    records = records_by_id(coco_stuff.read(_dataset(tmp_path, segs)))
    assert records["im0"].problems == []
    np.testing.assert_array_equal(records["im0"].semantic(), [[92, 255, 92], [92, 92, 255]])
    assert "sum to 5" in records["im1"].problems[0] and "annotation id 101" in records["im1"].problems[0]
    assert "differs from the image" in records["im2"].problems[0]
    assert "annotation id 103" in records["im3"].problems[0]
    assert "not an RLE dict" in records["im4"].problems[0]


def test_end_to_end(tmp_path):
    root = sample("coco_dataset", "coco_stuff")
    manifest, samples = convert(coco_stuff.read(root), tmp_path / "shards")
    assert manifest["quarantine"] == [] and manifest["splits"] == {"train": 1, "val": 1}
    expected = expected_semantic(root)
    assert sorted(samples) == sorted(expected)
    for image_id, s in samples.items():
        np.testing.assert_array_equal(s["semantic"], expected[image_id])


def test_file_name_leaving_the_dataset_is_a_problem_and_never_read(tmp_path):
    good = {"size": [2, 3], "counts": [6]}
    root = _dataset(tmp_path, [good, good])
    Image.new("RGB", (3, 2)).save(tmp_path / "secret.jpg")
    doc = json.loads((root / "annotations" / "stuff_val2017.json").read_text())
    doc["images"][1]["file_name"] = str(tmp_path / "secret.jpg")
    (root / "annotations" / "stuff_val2017.json").write_text(json.dumps(doc))
    source = coco_stuff.read(root)
    records = list(source.records())
    assert records[0].problems == []
    assert f"image id 1: file_name {str(tmp_path / 'secret.jpg')!r} is an absolute path" in records[1].problems[0]
    assert records[1].image_path is None and all("secret" not in p.name for p in source.files)
