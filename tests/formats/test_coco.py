import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.formats import FORMATS, get_reader
from segpipe.formats.coco import CocoError, read
from segpipe.formats.pngs import class_colour

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "formats" / "coco_dataset" / "coco_instances"


def test_registry_lists_every_format_and_rejects_unknown():
    assert set(FORMATS) == {"coco", "coco-panoptic", "coco-stuff", "mask-dir", "voc", "cityscapes", "ade20k"}
    with pytest.raises(ValueError, match="unknown format 'yolo'; valid: coco, coco-panoptic"):
        get_reader("yolo")


def write(root: Path, data: dict, classes=None) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    f = root / "annotations" / "instances.json"
    f.write_text(json.dumps(data))
    if classes is not None:
        (root / "classes.json").write_text(json.dumps(classes))
    return f


BASE = {"images": [{"id": 7, "file_name": "x.jpg", "height": 4, "width": 5}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "segmentation": [[0, 0, 2, 0, 2, 2]]}],
        "categories": [{"id": 3, "name": "crane"}]}


def test_class_table_from_classes_json_includes_stuff(tmp_path):
    f = write(tmp_path, BASE, [{"id": 0, "name": "sky", "isthing": False, "color": [0, 0, 200]},
                               {"id": 3, "name": "crane", "isthing": True, "color": [200, 0, 0]}])
    src = read([f], tmp_path / "images")
    assert [(c.id, c.name, c.isthing, c.color) for c in src.classes] == [
        (0, "sky", False, (0, 0, 200)), (3, "crane", True, (200, 0, 0))]
    assert src.ignore_index == 255 and src.count == 1
    rec = next(src.records())
    assert rec.image_id == "7" and rec.split is None and (rec.height, rec.width) == (4, 5)
    assert rec.instances == [{"id": 1, "category_id": 3, "iscrowd": 0, "segmentation": [[0, 0, 2, 0, 2, 2]]}]
    assert tmp_path / "classes.json" in src.files


def test_class_table_from_categories_with_isthing(tmp_path):
    data = {**BASE, "categories": [{"id": 3, "name": "crane", "isthing": 1}, {"id": 9, "name": "road", "isthing": 0}]}
    src = read([write(tmp_path, data)], tmp_path / "images")
    assert [(c.id, c.isthing) for c in src.classes] == [(3, True), (9, False)]


def test_categories_without_isthing_or_colour_are_things_in_the_voc_colour_of_their_id(tmp_path):
    data = {**BASE, "categories": [{"id": 3, "name": "crane"}, {"id": 9, "name": "road", "color": [1, 2, 3]}]}
    src = read([write(tmp_path, data)], tmp_path / "images")
    assert [(c.id, c.isthing, c.color) for c in src.classes] == [(3, True, (128, 128, 0)), (9, True, (1, 2, 3))]
    assert class_colour(3) == (128, 128, 0)


def test_classes_json_rows_without_colour_get_the_voc_colour_and_bad_rows_are_errors(tmp_path):
    f = write(tmp_path, BASE, [{"id": 3, "name": "crane"}])
    assert [(c.id, c.isthing, c.color) for c in read([f], tmp_path / "images").classes] == [(3, True, (128, 128, 0))]
    (tmp_path / "classes.json").write_text(json.dumps([{"id": 3, "name": "crane"}, {"id": 3, "name": "crane"}]))
    with pytest.raises(CocoError, match=r"classes.json: duplicate category id 3 \(row 0 and row 1\)"):
        read([f], tmp_path / "images")
    (tmp_path / "classes.json").write_text(json.dumps([{"id": 3, "name": "crane", "color": [0, 0]}]))
    with pytest.raises(CocoError, match=r"classes.json: category id 3 \('crane'\) has color=\[0, 0\]"):
        read([f], tmp_path / "images")


def test_classes_json_missing_a_category_is_an_error(tmp_path):
    f = write(tmp_path, BASE, [{"id": 0, "name": "sky", "isthing": False, "color": [0, 0, 0]}])
    with pytest.raises(CocoError, match=r"classes.json: category id\(s\) \[3\]"):
        read([f], tmp_path / "images")


def test_large_class_ids_move_the_ignore_index(tmp_path):
    data = {**BASE, "categories": [{"id": 3, "name": "crane"}, {"id": 255, "name": "other"}]}
    assert read([write(tmp_path, data)], tmp_path / "images").ignore_index == 65535


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "images").mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CocoError, match="bad.json: not valid JSON"):
        read([bad], tmp_path / "images")
    bad.write_text(json.dumps({"images": {}, "categories": []}))
    with pytest.raises(CocoError, match="key 'images' must be a list"):
        read([bad], tmp_path / "images")
    with pytest.raises(CocoError, match="annotation file not found"):
        read([tmp_path / "nope.json"], tmp_path / "images")
    with pytest.raises(CocoError, match="image folder not found"):
        read([bad], tmp_path / "no-images")


def test_conflicting_category_names_across_files(tmp_path):
    a = write(tmp_path, BASE)
    b = tmp_path / "annotations" / "instances_val.json"
    b.write_text(json.dumps({**BASE, "categories": [{"id": 3, "name": "excavator"}]}))
    with pytest.raises(CocoError, match=r"instances_val.json: category id 3 is 'excavator' .* but .*instances.json "
                                        r"defines it as 'crane'"):
        read([a, b], tmp_path / "images")


def test_split_and_image_folder_from_the_annotation_file_name(tmp_path):
    (tmp_path / "annotations").mkdir()
    jpeg(tmp_path / "images" / "val2017" / "x.jpg")
    f = tmp_path / "annotations" / "instances_val2017.json"
    f.write_text(json.dumps(BASE))
    rec = next(read([f], tmp_path / "images").records())
    assert rec.split == "val" and rec.image_path == tmp_path / "images" / "val2017" / "x.jpg"


def test_mask_pngs_are_read_as_every_label_png(tmp_path):
    f = write(tmp_path, BASE)
    (tmp_path / "masks").mkdir()
    pal = Image.fromarray(np.array([[3] * 5] * 4, np.uint8), "P")
    pal.putpalette([9] * 768)
    pal.save(tmp_path / "masks" / "x.png")
    rec = next(read([f], tmp_path / "images", tmp_path / "masks").records())
    assert rec.semantic_source == str(tmp_path / "masks" / "x.png")
    np.testing.assert_array_equal(rec.semantic(), np.full((4, 5), 3))  # indices, not colours
    Image.new("RGB", (5, 4), (3, 3, 3)).save(tmp_path / "masks" / "x.png")
    with pytest.raises(ValueError, match=r"masks/x.png: PNG mode 'RGB' is not a single-channel label map"):
        rec.semantic()


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/formats (sample data) not present")
def test_shared_sample_records():
    src = read([SHARED / "annotations" / "instances_train.json", SHARED / "annotations" / "instances_val.json"],
               SHARED / "images")
    recs = list(src.records())
    assert [(r.image_id, r.split, r.image_path.relative_to(SHARED).as_posix()) for r in recs] == [
        ("5", "train", "images/train/a.jpg"), ("40", "val", "images/val/b.jpg")]
    assert [c.name for c in src.classes] == ["a", "b", "c"]
    # The sample's categories bring no colour: the VOC colour of the id (was a hash of the id).
    assert [(c.id, c.color) for c in src.classes] == [(1, (128, 0, 0)), (2, (0, 128, 0)), (4, (0, 0, 128))]
    assert [i["id"] for i in recs[1].instances] == [1, 2] and recs[1].instances[1]["iscrowd"] == 1
    assert src.problems == [] and len(src.files) == 4


def test_folder_of_collections_converts_every_collection(tmp_path):
    from segpipe.formats.coco import read_collections
    from segpipe.params import ConvertParams, SynthParams
    from segpipe.shards import iter_samples
    from segpipe.stages import convert, synth

    raw = tmp_path / "raw"
    synth.run(SynthParams(images=3, size=(48, 48), seed=1, workers=1), raw / "synth")
    synth.run(SynthParams(images=2, size=(48, 48), seed=2, workers=1), raw / "site1")
    (raw / "site1.dvc").write_text("outs: []\n")  # what `dvc add` leaves beside a collection
    (raw / ".gitignore").write_text("/site1\n")
    source = read_collections(raw)
    manifest = convert.run(ConvertParams(workers=1), source, tmp_path / "shards", progress=False)
    ids = sorted(s["image_id"] for s in iter_samples(tmp_path / "shards"))
    assert sum(manifest["splits"].values()) == 5
    assert [i.split("/")[0] for i in ids] == ["site1"] * 2 + ["synth"] * 3
    # one collection given directly keeps its own ids
    assert all("/" not in r.image_id for r in read_collections(raw / "synth").records())
    # collections must share one class table
    classes = json.loads((raw / "site1" / "classes.json").read_text())
    classes[0]["name"] = "mud"
    (raw / "site1" / "classes.json").write_text(json.dumps(classes))
    with pytest.raises(CocoError, match=r"raw/synth: class table differs from collection 'site1'"):
        read_collections(raw)
    with pytest.raises(CocoError, match="no COCO collection"):
        read_collections(tmp_path / "shards")


def jpeg(path: Path, size=(5, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (9, 9, 9)).save(path, "JPEG")
    return path


@pytest.mark.parametrize("escape", ["relative", "absolute"])
def test_file_name_leaving_the_image_folder_is_quarantined_never_read_nor_hashed(tmp_path, escape):
    secret = jpeg(tmp_path / "secret" / "photo.jpg")
    root = tmp_path / "drop"
    name = "../../secret/photo.jpg" if escape == "relative" else str(secret)
    data = {**BASE, "images": [BASE["images"][0], {"id": 8, "file_name": name, "height": 4, "width": 5}]}
    f = write(root, data)
    jpeg(root / "images" / "x.jpg")
    (root / "masks").mkdir()
    src = read([f], root / "images", root / "masks")
    records = {r.image_id: r for r in src.records()}
    assert records["7"].problems == [] and records["8"].image_path is None and records["8"].semantic is None
    (problem,) = records["8"].problems
    assert problem.startswith(f"image 8: file_name {name!r} ")
    assert ("climbs out of its folder with '..'" if escape == "relative" else "is an absolute path") in problem
    assert all(p.resolve() != secret.resolve() for p in src.files)


def test_duplicate_category_names_are_an_error_naming_both_ids(tmp_path):
    data = {**BASE, "categories": [{"id": 1, "name": "pipe"}, {"id": 2, "name": "pipe"}, {"id": 3, "name": "crane"}]}
    f = write(tmp_path, data)
    with pytest.raises(CocoError, match=r"instances.json: categories: class ids 1 and 2 are both named 'pipe'"):
        read([f], tmp_path / "images")
    (tmp_path / "classes.json").write_text(json.dumps([{"id": 3, "name": "crane"}, {"id": 4, "name": "crane"}]))
    f.write_text(json.dumps(BASE))
    with pytest.raises(CocoError, match=r"classes.json: class ids 3 and 4 are both named 'crane'"):
        read([f], tmp_path / "images")
