import json
from pathlib import Path

import numpy as np
import pytest
from format_samples import convert, instance_masks, record_masks, records_by_id, same_masks, sample
from PIL import Image

from segpipe.formats import ade20k

PERSON = "person, individual, someone, somebody, mortal, soul"
CAR = "car, auto, automobile, machine, motorcar"


def expected_2021(root: Path) -> dict[str, np.ndarray]:
    """ADE class index from R/G (R // 10 * 256 + G) -> the JSON's name for that name_ndx."""
    out = {}
    for js in sorted(root.rglob("*.json")):
        objects = json.loads(js.read_text())["annotation"]["object"]
        name_of = {o["name_ndx"]: o["name"] for o in objects if o["parts"]["part_level"] == 0}
        seg = np.asarray(Image.open(js.with_name(f"{js.stem}_seg.png"))).astype(np.int64)
        out[js.relative_to(root).with_suffix("").as_posix()] = np.vectorize(
            lambda v, name_of=name_of: name_of.get(v, ""))(seg[..., 0] // 10 * 256 + seg[..., 1])
    return out


def expected_2017(root: Path) -> dict[str, np.ndarray]:
    """Instance (k-th smallest B value) -> its atr row's class name."""
    out = {}
    for atr in sorted(root.rglob("*_atr.txt")):
        names = {}
        for line in atr.read_text().splitlines():
            cols = [c.strip() for c in line.split("#")]
            if cols[1] == "0":
                names[int(cols[0])] = cols[3]
        seg = np.asarray(Image.open(atr.with_name(atr.name.replace("_atr.txt", "_seg.png"))))
        _, inst = np.unique(seg[..., 2], return_inverse=True)
        key = atr.relative_to(root).as_posix().replace("_atr.txt", "")
        out[key] = np.vectorize(lambda k, names=names: names.get(k, ""))(inst.reshape(seg.shape[:2]))
    return out


def named(semantic: np.ndarray, classes) -> np.ndarray:
    names = {c.id: c.name for c in classes}
    return np.vectorize(lambda v: names.get(int(v), ""))(semantic)


@pytest.mark.parametrize("year,expected", [("2017", expected_2017), ("2020", expected_2021)])
def test_sample_records_classes_and_semantic(year, expected):
    root = sample(f"ade20k{year}_dataset", "dataset")
    source = ade20k.read(root)
    assert source.problems == [] and source.ignore_index == 255
    names = [PERSON, "sky"] if year == "2017" else [CAR, PERSON]
    assert [(c.id, c.name, c.isthing) for c in source.classes] == [(0, names[0], True), (1, names[1], True)]
    records = records_by_id(source)
    want = expected(root)
    assert sorted(records) == sorted(want) == ["training/street/1", "validation/2"]
    assert records["training/street/1"].split == "train" and records["validation/2"].split == "val"
    for image_id, record in records.items():
        assert record.problems == []
        np.testing.assert_array_equal(named(record.semantic(), source.classes), want[image_id])
        assert (record.semantic() == 255).sum() == (want[image_id] == "").sum() > 0
    if year == "2020":  # instances are the level-0 objects' instance PNGs (door and rim are parts)
        one = records["training/street/1"]
        masks = {i["id"]: i["mask"] for i in one.instances}
        assert sorted(masks) == [0, 1]
        np.testing.assert_array_equal(
            masks[0], np.asarray(Image.open(root / "training/street/1/instance_000_ADE_train_1.png")) > 0)


def test_bad_inputs_are_problems(tmp_path):
    root = tmp_path / "ade"
    val = root / "validation"
    val.mkdir(parents=True)
    seg = np.zeros((2, 2, 3), np.uint8)
    seg[0, :, 2] = 5
    seg[0, :, 1] = 3
    for name in ("good", "corrupt", "noatr", "extra"):
        Image.new("RGB", (2, 2)).save(val / f"{name}.jpg")
    Image.fromarray(seg).save(val / "good_seg.png")
    (val / "good_atr.txt").write_text('001 # 0 # 0 # wall # wall # ""\n')
    (val / "corrupt_seg.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (val / "corrupt_atr.txt").write_text('001 # 0 # 0 # wall # wall # ""\n')
    seg[1, 0, 2] = 9  # a second instance with no atr row
    Image.fromarray(seg).save(val / "extra_seg.png")
    (val / "extra_atr.txt").write_text('001 # 0 # 0 # wall # wall # ""\n')
    records = records_by_id(ade20k.read(root))
    assert records["validation/good"].problems == []
    np.testing.assert_array_equal(records["validation/good"].semantic(), [[0, 0], [255, 255]])
    assert "corrupt_seg.png: cannot decode" in records["validation/corrupt"].problems[0]
    assert "noatr_atr.txt" in records["validation/noatr"].problems[0]
    assert "instance(s) [2]" in records["validation/extra"].problems[0]


@pytest.mark.parametrize("year,expected", [("2017", expected_2017), ("2020", expected_2021)])
def test_end_to_end(tmp_path, year, expected):
    root = sample(f"ade20k{year}_dataset", "dataset")
    source = ade20k.read(root)
    records = records_by_id(source)
    manifest, samples = convert(source, tmp_path / "shards")
    assert manifest["quarantine"] == [] and manifest["splits"] == {"train": 1, "val": 1}
    want = expected(root)
    for image_id, s in samples.items():
        np.testing.assert_array_equal(named(s["semantic"], source.classes), want[image_id])
        assert same_masks(instance_masks(s), record_masks(records[image_id]))


def _distributed(tmp_path: Path, year: str) -> tuple[Path, Path]:
    """The sample laid out as ADE distributes it: (dataset root, the folder holding training/).

    2016 full release: ``ADE20K_2016_07_26/images/training/<letter>/<scene>/...`` (atr files);
    2021: ``ADE20K_2021_17_01/images/ADE/training/<scene>/...`` (JSON + instance PNGs). Either
    has one training and one validation image, and files beside images/ that are not images.
    """
    import shutil

    src = sample(f"ade20k{year}_dataset", "dataset")
    if year == "2017":
        root = tmp_path / "ADE20K_2016_07_26"
        images = root / "images"
        shutil.copytree(src / "training" / "street", images / "training" / "s" / "street")
        (root / "index_ade20k.mat").write_bytes(b"MATLAB 5.0")
    else:
        root = tmp_path / "ADE20K_2021_17_01"
        images = root / "images" / "ADE"
        shutil.copytree(src / "training", images / "training")
        (root / "objects.txt").write_text("car\nperson\n")
    shutil.copytree(src / "validation", images / "validation")
    return root, images


@pytest.mark.parametrize("year", ["2017", "2020"])
def test_split_comes_from_the_training_validation_folder_wherever_it_sits(tmp_path, year):
    root, images = _distributed(tmp_path, year)
    for given in (root, root / "images", images):
        records = records_by_id(ade20k.read(given))
        assert sorted((r.split, r.problems) for r in records.values()) == [("train", []), ("val", [])], given
    source = ade20k.read(root)
    manifest, samples = convert(source, tmp_path / "shards")
    assert manifest["splits"] == {"train": 1, "val": 1} and manifest["quarantine"] == []
    prefix = "images/training/s/street/1" if year == "2017" else "images/ADE/training/street/1"
    assert samples[prefix]["split"] == "train"


def _amodal_2021(tmp_path: Path) -> Path:
    """The 2021 sample with its car instance PNG written as ADE writes them: 255 where the car is
    visible (columns 2-4) and 128 where it is hidden behind the person (column 1)."""
    import shutil

    root = tmp_path / "ade"
    shutil.copytree(sample("ade20k2020_dataset", "dataset"), root)
    car = root / "training/street/1/instance_000_ADE_train_1.png"
    visible = np.asarray(Image.open(car)) == 1
    values = np.where(visible, 255, 0).astype(np.uint8)
    values[:, 1] = 128
    Image.fromarray(values).save(car)
    return root


def test_2021_instances_are_the_visible_pixels_only(tmp_path):
    root = _amodal_2021(tmp_path)
    source = ade20k.read(root)
    one = records_by_id(source)["training/street/1"]
    assert one.problems == [] and one.annotation_problems == []
    car = next(i for i in one.instances if i["id"] == 0)
    assert car["mask"][:, 2:].all() and not car["mask"][:, :2].any()  # not the hidden column 1
    assert car["bbox"] == [2.0, 0.0, 3.0, 5.0]
    semantic = one.semantic()
    for inst in one.instances:  # modal: every instance pixel carries the instance's class
        assert (semantic[inst["mask"]] == inst["category_id"]).all(), inst["id"]
    _, samples = convert(source, tmp_path / "shards")
    (stored,) = [m for c, _, m in instance_masks(samples["training/street/1"]) if c == car["category_id"]]
    np.testing.assert_array_equal(stored, car["mask"])


def test_2021_wholly_hidden_object_and_escaping_mask_path(tmp_path):
    root = _amodal_2021(tmp_path)
    person = root / "training/street/1/instance_001_ADE_train_1.png"
    Image.fromarray(np.where(np.asarray(Image.open(person)) == 1, 128, 0).astype(np.uint8)).save(person)
    one = records_by_id(ade20k.read(root))["training/street/1"]
    assert one.problems == [] and [i["id"] for i in one.instances] == [0]
    (aid, reason), = one.annotation_problems
    assert aid == 1 and "no visible pixel" in reason
    js = root / "validation/2.json"
    doc = json.loads(js.read_text())
    doc["annotation"]["object"][0]["instance_mask"] = "../../../secret.png"
    js.write_text(json.dumps(doc))
    two = records_by_id(ade20k.read(root))["validation/2"]
    assert any("instance_mask '../../../secret.png' climbs out" in p for p in two.problems)
