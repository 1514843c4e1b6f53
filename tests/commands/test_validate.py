import json

import numpy as np
import pytest
from PIL import Image

from segpipe.commands.validate import run
from segpipe.formats import coco
from segpipe.params import ConvertParams


def main(argv: list[str]) -> None:
    """`segpipe validate ARGV` as a user runs it: errors the user can fix end as one line, exit 1."""
    from segpipe.cli import main as cli

    cli(["validate", *argv])


def dataset(root, bad_polygon=True):
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(3):
        Image.fromarray(np.full((8, 10, 3), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": 8, "width": 10})
        anns.append({"id": i, "image_id": i, "category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]})
    if bad_polygon:
        anns[1]["segmentation"] = [[0, 0, 5, 5]]
    (root / "images" / "2.png").write_bytes(b"")
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "pipe"}]}
    (root / "annotations" / "instances.json").write_text(json.dumps(data))
    return root / "annotations" / "instances.json"


def test_report_lists_every_problem_and_writes_nothing_else(tmp_path):
    f = dataset(tmp_path / "raw")
    report = run(ConvertParams(workers=1), coco.read([f], tmp_path / "raw" / "images"), progress=False)
    assert (report["images"], report["images_ok"], report["images_quarantined"]) == (3, 2, 1)
    assert report["annotations_quarantined"] == 1 and report["ok"] is False
    assert [(q["item"], q["reason"][:20]) for q in report["quarantine"]] == [
        ("image 1 annotation 1", "polygon 0 has 4 numb"), ("image 2", "image file is empty ")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_cli_writes_report_and_strict_fails(tmp_path, capsys):
    f = dataset(tmp_path / "raw")
    argv = ["--format", "coco", "--annotations", str(f), "--images", str(tmp_path / "raw" / "images"),
            "--report", str(tmp_path / "report.json"), "--no-progress", "--set", "convert.workers=1"]
    main(argv)
    out = capsys.readouterr().out
    assert "3 image(s): 2 ok, 1 quarantined" in out and "image 2: image file is empty" in out
    assert json.loads((tmp_path / "report.json").read_text())["images_quarantined"] == 1
    with pytest.raises(SystemExit) as e:
        main(argv + ["--strict"])
    assert e.value.code == 1


def test_file_name_outside_the_dataset_fails_validation(tmp_path, capsys):
    f = dataset(tmp_path / "raw", bad_polygon=False)
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(tmp_path / "photo.jpg")
    data = json.loads(f.read_text())
    data["images"][2]["file_name"] = "../../photo.jpg"  # instead of the empty 2.png
    f.write_text(json.dumps(data))
    report = run(ConvertParams(workers=1), coco.read([f], tmp_path / "raw" / "images"), progress=False)
    assert report["ok"] is False and report["images_quarantined"] == 1
    (q,) = report["quarantine"]
    assert q["item"] == "image 2" and "file_name '../../photo.jpg' climbs out of its folder" in q["reason"]
    argv = ["--format", "coco", "--annotations", str(f), "--images", str(tmp_path / "raw" / "images"),
            "--no-progress", "--set", "convert.workers=1", "--strict"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1 and "image 2: file_name '../../photo.jpg'" in capsys.readouterr().out


def test_duplicate_category_names_are_an_error(tmp_path, capsys):
    f = dataset(tmp_path / "raw")
    data = json.loads(f.read_text())
    data["categories"] = [{"id": 1, "name": "pipe"}, {"id": 2, "name": "pipe"}]
    f.write_text(json.dumps(data))
    with pytest.raises(SystemExit) as e:
        main(["--format", "coco", "--annotations", str(f), "--images", str(tmp_path / "raw" / "images"),
              "--no-progress", "--set", "convert.workers=1"])
    assert e.value.code == 1
    assert "instances.json: categories: class ids 1 and 2 are both named 'pipe'" in capsys.readouterr().err


def test_nothing_valid_fails_even_without_strict(tmp_path, capsys):
    f = dataset(tmp_path / "raw", bad_polygon=False)
    for i in range(3):
        (tmp_path / "raw" / "images" / f"{i}.png").write_bytes(b"")
    argv = ["--format", "coco", "--annotations", str(f), "--images", str(tmp_path / "raw" / "images"),
            "--report", str(tmp_path / "report.json"), "--no-progress", "--set", "convert.workers=1"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no image converted: all 3 image(s) were quarantined" in line and "report.json" in line
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images_ok"] == 0 and report["ok"] is False
