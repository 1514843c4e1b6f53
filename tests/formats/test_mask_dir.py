import json
from pathlib import Path

import numpy as np
from format_samples import convert, records_by_id
from PIL import Image

from segpipe.formats import mask_dir
from segpipe.formats.pngs import label_colormap

LABELS = np.array([[0, 1, 1, 255], [2, 2, 0, 0], [1, 1, 1, 1]], dtype=np.uint8)


def _dataset(tmp_path: Path, masks: str = "masks") -> Path:
    """No shared sample exists for this format: build one (a palette PNG whose palette colours
    are NOT the class ids, a grey PNG, a corrupt PNG, an image without mask, a mask without image)."""
    root = tmp_path / "md"
    for d in ("images/train", "images/val", f"{masks}/train", f"{masks}/val"):
        (root / d).mkdir(parents=True)
    for key in ("train/pal", "train/grey", "val/corrupt", "val/nomask"):
        Image.new("RGB", (4, 3), (50, 60, 70)).save(root / "images" / f"{key}.jpg")
    pal = Image.fromarray(LABELS, mode="P")
    pal.putpalette([v for c in label_colormap(256) for v in c][::-1])  # colours unrelated to the indices
    pal.save(root / masks / "train" / "pal.png")
    Image.fromarray(LABELS).save(root / masks / "train" / "grey.png")
    (root / masks / "val" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    Image.fromarray(LABELS).save(root / masks / "val" / "orphan.png")
    return root


def test_palette_pngs_are_indices_and_classes_from_values(tmp_path):
    source = mask_dir.read(_dataset(tmp_path))
    assert source.problems == []
    assert [(c.id, c.name, c.isthing) for c in source.classes] == [(0, "class_0", False), (1, "class_1", False),
                                                                   (2, "class_2", False)]
    records = records_by_id(source)
    assert sorted(records) == ["train/grey", "train/pal", "val/corrupt", "val/nomask", "val/orphan"]
    for key in ("train/pal", "train/grey"):
        assert records[key].problems == [] and records[key].split == "train"
        np.testing.assert_array_equal(records[key].semantic(), LABELS)
    assert "corrupt.png: cannot decode" in records["val/corrupt"].problems[0]
    assert "no mask named val/nomask.png" in records["val/nomask"].problems[0]
    assert "orphan.png: no image named val/orphan" in records["val/orphan"].problems[0]


def test_class_tables_and_rgb_masks(tmp_path):
    root = _dataset(tmp_path, masks="labels")
    (root / "labels.txt").write_text("ground\nwall\n")
    records = records_by_id(mask_dir.read(root))
    # labels.txt has ids 0 and 1 only: value 2 is not in the class table.
    assert "value(s) [2] are not in the class table" in records["train/grey"].problems[0]
    (root / "labels.txt").unlink()
    classes = [{"id": 0, "name": "ground", "isthing": False, "color": [10, 10, 10]},
               {"id": 1, "name": "crane", "isthing": True, "color": [200, 0, 0]},
               {"id": 2, "name": "worker", "isthing": True, "color": [0, 0, 200]}]
    (root / "classes.json").write_text(json.dumps(classes))
    colours = {0: (10, 10, 10), 1: (200, 0, 0), 2: (0, 0, 200), 255: (255, 255, 255)}
    rgb = np.array([[colours[v] for v in row] for row in LABELS.tolist()], dtype=np.uint8)
    Image.fromarray(rgb).save(root / "labels" / "train" / "grey.png")
    source = mask_dir.read(root)
    assert [(c.id, c.name, c.isthing, c.color) for c in source.classes][1] == (1, "crane", True, (200, 0, 0))
    records = records_by_id(source)
    np.testing.assert_array_equal(records["train/grey"].semantic(), LABELS)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(root / "labels" / "train" / "grey.png")
    assert "(1, 2, 3)" in records_by_id(mask_dir.read(root))["train/grey"].problems[0]


def test_end_to_end(tmp_path):
    manifest, samples = convert(mask_dir.read(_dataset(tmp_path)), tmp_path / "shards")
    assert sorted(samples) == ["train/grey", "train/pal"]
    assert sorted(q["item"] for q in manifest["quarantine"]) == ["image val/corrupt", "image val/nomask",
                                                                 "image val/orphan"]
    for s in samples.values():
        np.testing.assert_array_equal(s["semantic"], LABELS)
        assert s["split"] == "train" and s["image"].shape == (3, 4, 3)


def test_ade_challenge_layout_with_annotations_folder(tmp_path):
    """ADEChallengeData2016 as distributed: images/{training,validation}/*.jpg and
    annotations/{training,validation}/*.png, label 0 = "other", classes 1..150."""
    root = tmp_path / "ADEChallengeData2016"
    for split, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        Image.new("RGB", (4, 3), (50, 60, 70)).save(root / "images" / split / f"{stem}.jpg")
        Image.fromarray(np.array([[0, 1, 1, 150]] * 3, np.uint8)).save(root / "annotations" / split / f"{stem}.png")
    (root / "sceneCategories.txt").write_text("ADE_train_00000001 street\n")
    source = mask_dir.read(root)
    assert source.problems == [] and [c.id for c in source.classes] == [0, 1, 150]
    manifest, samples = convert(source, tmp_path / "shards")
    assert manifest["quarantine"] == [] and manifest["splits"] == {"train": 1, "val": 1}
    assert samples["training/ADE_train_00000001"]["semantic"].tolist() == [[0, 1, 1, 150]] * 3
