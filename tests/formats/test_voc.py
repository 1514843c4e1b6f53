from pathlib import Path

import numpy as np
from format_samples import convert, instance_masks, record_masks, records_by_id, same_masks, sample
from PIL import Image

from segpipe.formats import voc
from segpipe.formats.pngs import label_colormap

VOC_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def palette_index(path: Path) -> np.ndarray:
    """The sample PNGs are RGB in VOC colours: invert the colour map by brute force."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    out = np.full(rgb.shape[:2], -1)
    for i, c in enumerate(label_colormap(256)):
        out[(rgb == c).all(axis=-1)] = i
    assert (out >= 0).all()
    return out


def test_sample_records_classes_and_semantic():
    root = sample("voc_dataset", "voc_dataset1")
    source = voc.read(root)
    assert source.problems == [] and source.ignore_index == 255
    assert [c.name for c in source.classes] == VOC_NAMES
    assert [c.isthing for c in source.classes] == [False] + [True] * 20
    assert source.classes[15].color == (192, 128, 128) and source.classes[0].color == (0, 0, 0)
    records = records_by_id(source)
    assert {k: r.split for k, r in records.items()} == {"2007_000001": "train", "2007_000002": "test"}
    one = records["2007_000001"]
    assert one.problems == []
    expected = palette_index(root / "SegmentationClass" / "2007_000001.png")
    np.testing.assert_array_equal(one.semantic(), expected)
    assert set(np.unique(expected).tolist()) == {2}  # bicycle everywhere
    objects = palette_index(root / "SegmentationObject" / "2007_000001.png")
    assert [(i["id"], i["category_id"]) for i in one.instances] == [(1, 2)]
    np.testing.assert_array_equal(one.instances[0]["mask"], objects == 1)
    # 2007_000002 is listed in test.txt but has no SegmentationClass PNG.
    two = records["2007_000002"]
    assert len(two.problems) == 1 and "SegmentationClass/2007_000002.png: file not found" in two.problems[0]


def _palette_png(path: Path, indices: np.ndarray) -> None:
    im = Image.fromarray(indices.astype(np.uint8), mode="P")
    im.putpalette([v for c in label_colormap(256) for v in c])
    im.save(path)


def test_palette_pngs_are_read_as_indices_and_bad_files_are_problems(tmp_path):
    root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    cls = np.array([[0, 15, 15, 255], [0, 15, 7, 7]])
    obj = np.array([[0, 1, 1, 255], [0, 1, 2, 2]])
    for name in ("good", "corrupt", "mixed"):
        Image.new("RGB", (4, 2)).save(root / "JPEGImages" / f"{name}.jpg")
    _palette_png(root / "SegmentationClass" / "good.png", cls)
    _palette_png(root / "SegmentationObject" / "good.png", obj)
    (root / "SegmentationClass" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    _palette_png(root / "SegmentationClass" / "mixed.png", cls)
    _palette_png(root / "SegmentationObject" / "mixed.png", np.array([[0, 1, 1, 255], [0, 1, 1, 1]]))
    (root / "ImageSets/Segmentation/val.txt").write_text("good\ncorrupt\nmixed\n")
    (root / "ImageSets/Segmentation/trainval.txt").write_text("good\ncorrupt\nmixed\n")
    records = records_by_id(voc.read(root))
    good = records["good"]
    assert good.problems == [] and good.split == "val"
    np.testing.assert_array_equal(good.semantic(), cls)
    assert [(i["id"], i["category_id"], i["mask"].sum()) for i in good.instances] == [(1, 15, 3), (2, 7, 2)]
    assert "corrupt.png" in records["corrupt"].problems[0]
    assert "object 1 covers SegmentationClass value(s) [7, 15]" in records["mixed"].problems[0]


def test_end_to_end(tmp_path):
    root = sample("voc_dataset", "voc_dataset1")
    source = voc.read(root)
    records = records_by_id(source)
    manifest, samples = convert(source, tmp_path / "shards")
    assert sorted(samples) == ["2007_000001"]
    assert [q["item"] for q in manifest["quarantine"]] == ["image 2007_000002"]
    assert [c["name"] for c in manifest["classes"]] == VOC_NAMES
    s = samples["2007_000001"]
    assert s["split"] == "train"
    np.testing.assert_array_equal(s["semantic"], palette_index(root / "SegmentationClass" / "2007_000001.png"))
    assert same_masks(instance_masks(s), record_masks(records["2007_000001"]))


def test_listed_ids_leaving_the_dataset_are_problems_and_never_read(tmp_path):
    root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    Image.new("RGB", (4, 2)).save(root / "JPEGImages" / "good.jpg")
    _palette_png(root / "SegmentationClass" / "good.png", np.zeros((2, 4), int))
    Image.new("RGB", (4, 2)).save(tmp_path / "secret.jpg")
    _palette_png(tmp_path / "secret.png", np.zeros((2, 4), int))
    (root / "ImageSets/Segmentation/train.txt").write_text("good\n../../secret\n")
    source = voc.read(root)
    records = records_by_id(source)
    assert records["good"].problems == []
    bad = records["../../secret"]
    assert bad.image_path is None and bad.semantic is None
    assert "train.txt: image id '../../secret' climbs out of its folder" in bad.problems[0]
    assert all("secret" not in p.name for p in source.files)
