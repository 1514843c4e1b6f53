"""What the COCO-family readers share: split names from file names, the category parser and the
merge of several files' class tables."""

from pathlib import Path

import pytest

from segpipe.formats.base import ClassInfo
from segpipe.formats.coco_files import find_image, merge_classes, parse_categories, split_from_name
from segpipe.formats.pngs import class_colour

F = Path("ann/panoptic_val2017.json")


@pytest.mark.parametrize("name, expected", [
    ("instances_train.json", ("train", "train")),
    ("instances_val2017.json", ("val", "val2017")),
    ("instances_test-dev2017.json", ("test", "test-dev2017")),
    ("panoptic_val2017.json", ("val", "val2017")),
    ("stuff_train2017.json", ("train", "train2017")),
    ("stuff_validation.json", ("val", "validation")),
    ("data/annotations/panoptic_training.json", ("train", "training")),
    ("instances.json", (None, None)),
    ("instances_trainval.json", (None, "trainval")),        # two splits: the hash decides
    ("instances_minival2014.json", (None, "minival2014")),
    ("panoptic_default.json", (None, "default")),
])
def test_split_and_folder_from_the_file_name(name, expected):
    assert split_from_name(name) == expected
    assert split_from_name(Path(name)) == expected


def test_images_are_looked_up_in_the_folder_then_the_split(tmp_path):
    for rel in ("images/val/a.jpg", "val2017/b.jpg", "images/c.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert find_image(tmp_path, "val2017", "val", "a.jpg") == tmp_path / "images/val/a.jpg"
    assert find_image(tmp_path, "val2017", "val", "b.jpg") == tmp_path / "val2017/b.jpg"
    assert find_image(tmp_path, None, None, "c.jpg") == tmp_path / "images/c.jpg"
    assert find_image(tmp_path, "default", None, "a.jpg") is None


def test_categories_parse_in_file_order_with_the_callers_isthing_and_the_colour_policy():
    rows = [{"id": 7, "name": "sky", "isthing": 0, "color": [1, 2, 3]}, {"id": 1, "name": "person", "isthing": True},
            {"id": 300, "name": "cone", "supercategory": "x"}]
    classes, problems = parse_categories(rows, F, default_isthing=False)
    assert problems == []
    assert classes == [ClassInfo(7, "sky", False, (1, 2, 3)), ClassInfo(1, "person", True, (128, 0, 0)),
                       ClassInfo(300, "cone", False, class_colour(300))]
    assert [c.isthing for c in parse_categories(rows, F, default_isthing=True)[0]] == [False, True, True]


@pytest.mark.parametrize("rows, message", [
    ([{"id": 1, "name": "a", "isthing": 0}, {"id": 1, "name": "b", "isthing": 0}],
     "panoptic_val2017.json: duplicate category id 1 (categories[0] and categories[1])"),
    ([{"id": 1, "name": "a", "isthing": 0}, {"id": 2, "name": "a", "isthing": 0}],
     "panoptic_val2017.json: categories: class ids 1 and 2 are both named 'a'"),
    ([{"id": "1", "name": "a", "isthing": 0}], "panoptic_val2017.json: categories[0] needs an integer 'id' and a string 'name'"),
    ([{"id": True, "name": "a", "isthing": 0}], "categories[0] needs an integer 'id'"),
    ([{"id": 1, "isthing": 0}], "categories[0] needs an integer 'id' and a string 'name'"),
    ([{"id": 1, "name": "a"}], "panoptic_val2017.json: category id 1 ('a') has isthing=None, expected 0 or 1"),
    ([{"id": 1, "name": "a", "isthing": "yes"}], "category id 1 ('a') has isthing='yes'"),
    ([{"id": 1, "name": "a", "isthing": 0, "color": [1, 2, 300]}], "category id 1 ('a') has color=[1, 2, 300]"),
    ([{"id": 1, "name": "a", "isthing": 0, "color": "red"}], "category id 1 ('a') has color='red'"),
    ({"id": 1}, "panoptic_val2017.json: categories must be a list"),
    (None, "panoptic_val2017.json: categories must be a list"),
])
def test_category_problems_name_the_file_and_id(rows, message):
    classes, problems = parse_categories(rows, F, default_isthing=None)
    assert len(problems) == 1 and message in problems[0], problems


def test_bad_rows_are_left_out_and_names_used_twice_kept():
    rows = [{"id": 1, "name": "a", "isthing": 0}, {"id": 1, "name": "b", "isthing": 0}, {"name": "c"},
            {"id": 2, "name": "a", "isthing": 1}]
    classes, problems = parse_categories(rows, F, default_isthing=None)
    assert [(c.id, c.name) for c in classes] == [(1, "a"), (2, "a")] and len(problems) == 3


def test_ids_outside_max_id_and_class_json_rows():
    classes, problems = parse_categories([{"id": 255, "name": "a"}, {"id": -1, "name": "b"}, {"id": 3, "name": "c"}],
                                         "x/classes.json", default_isthing=False, max_id=254, key=None)
    assert [c.id for c in classes] == [3]
    assert problems == ["x/classes.json: category id 255 ('a') outside 0..254",
                        "x/classes.json: category id -1 ('b') outside 0..254"]
    _, problems = parse_categories([{"id": 3, "name": "c"}, {"id": 4, "name": "c"}, {"id": 4, "name": "d"}],
                                   "x/classes.json", default_isthing=False, key=None)
    assert problems[0] == "x/classes.json: duplicate category id 4 (row 1 and row 2)"
    assert problems[1].startswith("x/classes.json: class ids 3 and 4 are both named 'c'")


def test_merge_keeps_one_definition_per_id_and_names_the_files_that_disagree():
    a, b = Path("panoptic_train.json"), Path("panoptic_val.json")
    crane, sky = ClassInfo(3, "crane", True, (1, 1, 1)), ClassInfo(9, "sky", False, (2, 2, 2))
    assert merge_classes([(a, [sky, crane]), (b, [crane])], 255) == ([crane, sky], [])
    merged, problems = merge_classes([(a, [crane]), (b, [ClassInfo(3, "crane", False, (1, 1, 1)), sky])], 255)
    assert merged == [crane, sky]
    assert problems == ["panoptic_val.json: category id 3 is 'crane' (isthing=False, color=[1, 1, 1]) but "
                        "panoptic_train.json defines it as 'crane' (isthing=True, color=[1, 1, 1])"]
    _, problems = merge_classes([(a, [crane]), (b, [ClassInfo(255, "void", False, (0, 0, 0))])], 255)
    assert problems == ["panoptic_val.json: category id 255 ('void') equals the ignore index 255"]
    merged, problems = merge_classes([(a, [crane]), (b, [ClassInfo(4, "crane", True, (1, 1, 1))])])
    assert [c.id for c in merged] == [3, 4]
    assert len(problems) == 1 and problems[0].startswith("panoptic_val.json: categories: class ids 3 and 4 are both "
                                                         "named 'crane'") and "(id 3 in panoptic_train.json)" in problems[0]
