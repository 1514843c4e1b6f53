import pytest

from segpipe.synth.classes import CLASSES, THING_IDS, class_id, classes_table, coco_categories


def test_ids_are_the_fixed_table():
    names = [c.name for c in CLASSES]
    assert names == [
        "soil",
        "gravel_road",
        "vegetation",
        "water",
        "concrete_slab",
        "solar_panel_row",
        "pipe_segment",
        "trench",
        "excavator",
        "truck",
        "worker",
        "material_stack",
    ]
    assert [c.id for c in CLASSES] == list(range(12))
    assert not CLASSES[0].isthing  # Mask R-CNN reserves label 0 for background
    assert THING_IDS == set(range(5, 12))


def test_tables_agree():
    table, cats = classes_table(), coco_categories()
    assert [r["id"] for r in table] == [c["id"] for c in cats]
    for r, c in zip(table, cats):
        assert r["name"] == c["name"] and int(r["isthing"]) == c["isthing"]
        assert len(r["color"]) == 3 and all(0 <= v <= 255 for v in r["color"])
        assert c["supercategory"]
    assert len({tuple(r["color"]) for r in table}) == len(table)


def test_unknown_class_lists_valid_names():
    assert class_id("trench") == 7
    with pytest.raises(KeyError, match="valid: soil, gravel_road"):
        class_id("crane")
