import json
import shutil
from pathlib import Path

import numpy as np
from format_samples import convert, instance_masks, record_masks, records_by_id, same_masks, sample
from PIL import Image

from segpipe.formats import coco_panoptic
from segpipe.formats.base import ClassInfo


def expected_semantic(root: Path, split: str) -> dict[str, np.ndarray]:
    """PNG pixel id -> segments_info -> category, computed straight from the files."""
    doc = json.loads((root / "annotations" / f"panoptic_{split}.json").read_text())
    out = {}
    for ann in doc["annotations"]:
        rgb = np.asarray(Image.open(root / "annotations" / f"panoptic_{split}" / ann["file_name"])).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        sem = np.full(ids.shape, 255)
        for seg in ann["segments_info"]:
            sem[ids == seg["id"]] = seg["category_id"]
        out[Path(ann["file_name"]).stem] = sem
    return out


def test_sample_records_classes_and_semantic():
    root = sample("coco_dataset", "coco_panoptic")
    source = coco_panoptic.read(root)
    assert source.problems == []
    # No colour in the sample's categories: the VOC colour of the id, as for every reader.
    assert source.classes == [ClassInfo(1, "a", False, (128, 0, 0)), ClassInfo(2, "b", False, (0, 128, 0))]
    records = records_by_id(source)
    assert sorted(records) == ["a", "b"]
    assert (records["a"].split, records["b"].split) == ("train", "val")
    assert records["b"].image_path == root / "images" / "val" / "b.jpg"
    # b: all segments are stuff (isthing 0): semantic only, no instances.
    b = records["b"]
    assert b.problems == []
    np.testing.assert_array_equal(b.semantic(), expected_semantic(root, "val")["b"])
    assert set(np.unique(b.semantic()).tolist()) == {1, 2, 255}
    assert b.instances == []
    # a: the sample's PNG is 5 x 5 but its image is declared 10 x 5: quarantined, naming the PNG.
    a = records["a"]
    assert len(a.problems) == 1 and "panoptic_train/a.png" in a.problems[0] and "10 x 5" in a.problems[0]
    np.testing.assert_array_equal(a.semantic(), expected_semantic(root, "train")["a"])


def _things_dataset(tmp_path: Path) -> Path:
    """A panoptic dataset with things (instances), stuff and an unlabelled pixel, plus a second
    image whose PNG is corrupt and a third whose PNG is missing."""
    root = tmp_path / "pan"
    (root / "annotations" / "panoptic_val2017").mkdir(parents=True)
    (root / "val2017").mkdir()
    ids = np.array([[0, 300, 300, 70000], [5, 5, 300, 70000], [5, 5, 5, 5]])
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(root / "annotations" / "panoptic_val2017" / "x.png")
    (root / "annotations" / "panoptic_val2017" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for name in ("x", "bad", "gone"):
        Image.new("RGB", (4, 3), (9, 9, 9)).save(root / "val2017" / f"{name}.jpg")
    doc = {
        "categories": [{"id": 1, "name": "person", "isthing": 1}, {"id": 7, "name": "sky", "isthing": 0}],
        "images": [{"id": i, "file_name": f"{n}.jpg", "height": 3, "width": 4} for i, n in enumerate(["x", "bad", "gone"])],
        "annotations": [
            {"image_id": 0, "file_name": "x.png", "segments_info": [
                {"id": 300, "category_id": 1, "iscrowd": 0}, {"id": 70000, "category_id": 1, "iscrowd": 1},
                {"id": 5, "category_id": 7, "iscrowd": 0}]},
            {"image_id": 1, "file_name": "bad.png", "segments_info": [{"id": 5, "category_id": 7}]},
            {"image_id": 2, "file_name": "gone.png", "segments_info": [{"id": 5, "category_id": 7}]},
        ],
    }
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(doc))
    return root


def test_things_become_instances_and_bad_pngs_are_problems(tmp_path):
    source = coco_panoptic.read(_things_dataset(tmp_path))
    records = records_by_id(source)
    x = records["x"]
    assert x.problems == [] and x.split == "val"
    np.testing.assert_array_equal(x.semantic(), [[255, 1, 1, 1], [7, 7, 1, 1], [7, 7, 7, 7]])
    got = {i["id"]: (i["category_id"], i["iscrowd"], i["mask"].astype(int).tolist(), i["bbox"]) for i in x.instances}
    assert got == {
        300: (1, 0, [[0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]], [1.0, 0.0, 2.0, 2.0]),
        70000: (1, 1, [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]], [3.0, 0.0, 1.0, 2.0]),
    }
    assert len(records["bad"].problems) == 1 and "bad.png" in records["bad"].problems[0]
    assert "cannot decode" in records["bad"].problems[0]
    assert len(records["gone"].problems) == 1 and "gone.png: file not found" in records["gone"].problems[0]


def test_id_mismatches_are_problems(tmp_path):
    root = _things_dataset(tmp_path)
    doc = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    doc["annotations"][0]["segments_info"][0]["id"] = 301  # pixels 300 lose their segment; 301 has none
    doc["annotations"][0]["segments_info"][2]["category_id"] = 99
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(doc))
    problems = records_by_id(coco_panoptic.read(root))["x"].problems
    assert any("undeclared category_id 99" in p for p in problems)
    assert any("[300]" in p and "no segments_info entry" in p for p in problems)
    assert any("[301]" in p and "no pixels" in p for p in problems)


def test_unreadable_json_is_a_source_problem(tmp_path):
    root = _things_dataset(tmp_path)
    shutil.copy(root / "annotations" / "panoptic_val2017.json", root / "annotations" / "panoptic_train2017.json")
    (root / "annotations" / "panoptic_train2017.json").write_text("{not json")
    source = coco_panoptic.read(root)
    assert len(source.problems) == 1 and "panoptic_train2017.json" in source.problems[0]
    assert sorted(records_by_id(source)) == ["bad", "gone", "x"]


def test_end_to_end(tmp_path):
    root = sample("coco_dataset", "coco_panoptic")
    manifest, samples = convert(coco_panoptic.read(root), tmp_path / "shards")
    assert sorted(samples) == ["b"]
    assert [q["item"] for q in manifest["quarantine"]] == ["image a"]
    assert [(c["id"], c["name"], c["isthing"]) for c in manifest["classes"]] == [(1, "a", False), (2, "b", False)]
    np.testing.assert_array_equal(samples["b"]["semantic"], expected_semantic(root, "val")["b"])
    assert samples["b"]["split"] == "val" and samples["b"]["instances"] == []

    source = coco_panoptic.read(_things_dataset(tmp_path))
    records = records_by_id(source)
    manifest, samples = convert(source, tmp_path / "things")
    assert sorted(samples) == ["x"] and len(manifest["quarantine"]) == 2
    np.testing.assert_array_equal(samples["x"]["semantic"], records["x"].semantic())
    assert same_masks(instance_masks(samples["x"]), record_masks(records["x"]))


def test_file_names_leaving_the_dataset_are_problems_and_never_read(tmp_path):
    root = _things_dataset(tmp_path)
    Image.new("RGB", (4, 3)).save(tmp_path / "secret.jpg")
    doc = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    doc["images"][1]["file_name"] = "../../secret.jpg"        # the image, from images/<folder>/
    doc["annotations"][2]["file_name"] = "../../../secret.png"  # the PNG, from annotations/panoptic_val2017/
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(doc))
    source = coco_panoptic.read(root)
    records = {r.image_id: r for r in source.records()}
    assert records["x"].problems == []
    (problem,) = records["../../secret"].problems
    assert "image id 1: file_name '../../secret.jpg' climbs out" in problem and records["../../secret"].image_path is None
    (problem,) = records["gone"].problems
    assert "image id 2: annotation file_name '../../../secret.png' climbs out" in problem
    assert records["gone"].semantic is None
    assert all("secret" not in p.name for p in source.files)
