from pathlib import Path

import numpy as np
import pytest
from format_samples import convert, instance_masks, record_masks, records_by_id, same_masks, sample
from PIL import Image

from segpipe.formats import cityscapes

TRAIN_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
               "bicycle"]
# label id -> trainId for the ids the samples use (cityscapesScripts' labels.py)
LABEL_TO_TRAIN = {1: 255, 3: 255, 12: 3, 24: 11, 27: 14, 31: 16}


def expected(root: Path) -> dict[str, tuple[np.ndarray, list[tuple[int, int, bytes]]]]:
    """Decode every *_instanceIds.png by hand: semantic trainIds and (trainId, iscrowd, mask)."""
    out = {}
    for path in sorted(root.glob("gtFine/*/*/*_gtFine_instanceIds.png")):
        ids = np.asarray(Image.open(path)).astype(np.int64)
        labels = np.where(ids >= 1000, ids // 1000, ids)
        sem = np.vectorize(LABEL_TO_TRAIN.get)(labels)
        insts = []
        for v in np.unique(ids).tolist():
            label = v // 1000 if v >= 1000 else v
            if label in (24, 27, 31):  # the sample's classes with instances and a trainId
                insts.append((LABEL_TO_TRAIN[label], int(v < 1000), ids == v))
        out[path.name.split("_gtFine_")[0]] = (sem, sorted(insts, key=lambda t: (t[0], t[1], t[2].tobytes())))
    return out


@pytest.mark.parametrize("name", ["dataset", "train_dataset"])
def test_sample_records_classes_semantic_and_instances(name):
    root = sample("cityscapes_dataset", name)
    source = cityscapes.read(root)
    assert source.problems == [] and source.ignore_index == 255
    assert [c.name for c in source.classes] == TRAIN_NAMES and [c.id for c in source.classes] == list(range(19))
    assert [c.name for c in source.classes if c.isthing] == ["person", "rider", "car", "truck", "bus", "train",
                                                             "motorcycle", "bicycle"]
    assert source.classes[0].color == (128, 64, 128)
    records = records_by_id(source)
    want = expected(root)
    assert sorted(records) == sorted(want)
    assert {k: r.split for k, r in records.items()} == {
        "defaultcity_000001_000031": "test", "defaultcity_000001_000032": "test",
        "defaultcity_000002_000045": "train", "defaultcity_000001_000019": "val"}
    for image_id, record in records.items():
        assert record.problems == [] and record.image_path.is_file()
        np.testing.assert_array_equal(record.semantic(), want[image_id][0])
        assert same_masks(record_masks(record), want[image_id][1])
    if name == "train_dataset":  # labelTrainIds agree with the label ids on every train-class pixel
        for image_id, record in records.items():
            path = next(root.glob(f"gtFine/*/*/{image_id}_gtFine_labelTrainIds.png"))
            given = np.asarray(Image.open(path))
            keep = record.semantic() != 255
            np.testing.assert_array_equal(given[keep], record.semantic()[keep])
        assert [i["id"] for i in records["defaultcity_000001_000031"].instances] == [27001, 27002]


def _city(tmp_path: Path) -> Path:
    root = tmp_path / "cs"
    for split, stem in (("val", "berlin_000000_000001"), ("val", "berlin_000000_000002"), ("val", "berlin_000000_000003")):
        (root / "gtFine" / split / "berlin").mkdir(parents=True, exist_ok=True)
        (root / "leftImg8bit" / split / "berlin").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (3, 1)).save(root / "leftImg8bit" / split / "berlin" / f"{stem}_leftImg8bit.png")
    gt = root / "gtFine" / "val" / "berlin"
    Image.fromarray(np.array([[7, 26, 26]], dtype=np.uint8)).save(gt / "berlin_000000_000001_gtFine_labelIds.png")
    Image.fromarray(np.array([[7, 26001, 26002]], dtype=np.uint16)).save(gt / "berlin_000000_000001_gtFine_instanceIds.png")
    (gt / "berlin_000000_000002_gtFine_labelIds.png").write_bytes(b"garbage")
    Image.fromarray(np.array([[7, 40, 26]], dtype=np.uint8)).save(gt / "berlin_000000_000003_gtFine_labelIds.png")
    return root


def test_label_ids_win_and_bad_files_are_problems(tmp_path):
    records = records_by_id(cityscapes.read(_city(tmp_path)))
    one = records["berlin_000000_000001"]
    assert one.problems == []
    np.testing.assert_array_equal(one.semantic(), [[0, 13, 13]])
    assert [(i["id"], i["category_id"], i["iscrowd"]) for i in one.instances] == [(26001, 13, 0), (26002, 13, 0)]
    assert "berlin_000000_000002_gtFine_labelIds.png: cannot decode" in records["berlin_000000_000002"].problems[0]
    assert "label id(s) [40]" in records["berlin_000000_000003"].problems[0]


def test_missing_image_is_a_problem(tmp_path):
    root = _city(tmp_path)
    (root / "leftImg8bit" / "val" / "berlin" / "berlin_000000_000001_leftImg8bit.png").unlink()
    records = records_by_id(cityscapes.read(root))
    assert "berlin_000000_000001_leftImg8bit.png: image file not found" in records["berlin_000000_000001"].problems[0]
    assert len(records) == 3


@pytest.mark.parametrize("name", ["dataset", "train_dataset"])
def test_end_to_end(tmp_path, name):
    root = sample("cityscapes_dataset", name)
    manifest, samples = convert(cityscapes.read(root), tmp_path / "shards")
    assert manifest["quarantine"] == [] and manifest["splits"] == {"test": 2, "train": 1, "val": 1}
    assert [c["name"] for c in manifest["classes"]] == TRAIN_NAMES
    want = expected(root)
    assert sorted(samples) == sorted(want)
    for image_id, s in samples.items():
        np.testing.assert_array_equal(s["semantic"], want[image_id][0])
        assert same_masks(instance_masks(s), want[image_id][1])


def test_stale_label_train_ids_are_a_warning_and_the_image_is_kept(tmp_path):
    root = _city(tmp_path)
    gt = root / "gtFine" / "val" / "berlin"
    # labelIds and instanceIds (the sources of truth) agree; labelTrainIds says sidewalk (1) where
    # the label ids say car (trainId 13) on 2 pixels.
    Image.fromarray(np.array([[0, 1, 1]], dtype=np.uint8)).save(gt / "berlin_000000_000001_gtFine_labelTrainIds.png")
    source = cityscapes.read(root)
    one = records_by_id(source)["berlin_000000_000001"]
    assert one.problems == []
    np.testing.assert_array_equal(one.semantic(), [[0, 13, 13]])  # derived from labelIds
    (warning,) = one.warnings
    assert "berlin_000000_000001_gtFine_labelTrainIds.png: 2 pixel(s) disagree" in warning
    assert "derived from berlin_000000_000001_gtFine_labelIds.png" in warning
    manifest, samples = convert(source, tmp_path / "shards")
    np.testing.assert_array_equal(samples["berlin_000000_000001"]["semantic"], [[0, 13, 13]])
    assert [w["item"] for w in manifest["warnings"]] == ["image berlin_000000_000001"]
    assert "2 pixel(s) disagree" in manifest["warnings"][0]["reason"]
    assert all(q["item"] != "image berlin_000000_000001" for q in manifest["quarantine"])
