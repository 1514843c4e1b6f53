"""segpipe audit: a trained model finds annotations whose class was changed, names them by the
source's own ids, and draws the most suspicious."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from colour_scenes import THINGS, convert_collection, write_collection
from PIL import Image

from segpipe.commands import audit
from segpipe.params import AuditParams

SWAPPED = 6


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory) -> dict:
    """16 new colour scenes in which 6 annotations (chosen by a seed) have another thing's class."""
    root = tmp_path_factory.mktemp("corrupted")
    ids = write_collection(root / "clean", images=16, seed=5)["annotation_ids"]
    coco = json.loads((root / "clean" / "annotations" / "instances.json").read_text())
    classes = {a["id"]: a["category_id"] for a in coco["annotations"]}
    rng = np.random.default_rng(1)
    chosen = sorted(int(i) for i in rng.choice(ids, SWAPPED, replace=False))
    swap = {i: int(rng.choice([c for c in THINGS if c != classes[i]])) for i in chosen}
    write_collection(root / "raw", images=16, seed=5, swap=swap)
    return {"swap": swap, "raw": root / "raw", "shards": convert_collection(root / "raw", root / "shards", 0.25)}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", ["confident_learning", "self_confidence"])
def test_audit_ranks_the_changed_annotations_first(colour_model, corrupted, tmp_path, method):
    out = tmp_path / "audit"
    summary = audit.run(AuditParams(method=method, top=3), colour_model, corrupted["shards"], out, progress=False)
    rows = read_csv(out / "suspects.csv")
    assert list(rows[0]) == list(audit.COLUMNS)
    top = [int(r["annotation_id"]) for r in rows[:SWAPPED] if r["annotation_id"]]
    assert len(set(top) & set(corrupted["swap"])) >= SWAPPED - 1, rows[:SWAPPED]  # precision at K >= 5/6
    # the untouched annotations rank below every swapped one but at most one
    ranks = {int(r["annotation_id"]): int(r["rank"]) for r in rows if r["annotation_id"]}
    worst_swapped = sorted(ranks[i] for i in corrupted["swap"])[-2]
    assert sum(1 for a, rank in ranks.items() if a not in corrupted["swap"] and rank < worst_swapped) <= 1
    first = rows[0]
    names = {2: "truck", 3: "worker", 4: "stack"}
    assert first["class"] == names[corrupted["swap"][int(first["annotation_id"])]] != first["predicted_class"]
    assert summary["images"] == 16 and summary["annotations"] == len(ranks) == 48 and summary["method"] == method


def test_audit_names_source_ids_and_stuff_regions(colour_model, corrupted, tmp_path):
    out = tmp_path / "audit"
    audit.run(AuditParams(top=2), colour_model, corrupted["shards"], out, split="val", progress=False)
    rows = read_csv(out / "suspects.csv")
    coco = json.loads((corrupted["raw"] / "annotations" / "instances.json").read_text())
    annotations = {a["id"]: a for a in coco["annotations"]}
    split_images = {r["image_id"] for r in rows}
    assert split_images and split_images < {str(i["id"]) for i in coco["images"]}  # the val split: the COCO ids
    for r in rows:
        assert r["collection"] == "raw" and -1 <= float(r["score"]) <= 1
        if r["annotation_id"]:
            ann = annotations[int(r["annotation_id"])]
            assert str(ann["image_id"]) == r["image_id"] and int(r["area"]) == ann["area"]
            assert [int(v) for v in r["bbox"].split()] == ann["bbox"]
        else:
            assert r["class"] in ("ground", "road") and int(r["area"]) >= AuditParams().min_area
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    pictures = sorted((out / "suspects").iterdir())
    assert [p.name[:5] for p in pictures] == ["0001_", "0002_"]
    assert pictures[0].name.startswith(f"0001_{rows[0]['image_id']}_")
    with Image.open(pictures[0]) as im:  # three 64 px panels scaled 4x, a caption above, a colour legend below
        assert im.size[0] == 3 * 256 + 8 and im.size[1] > 256 + 30


def test_an_annotation_cut_by_tiles_is_scored_once(colour_model, corrupted, tmp_path):
    from segpipe.formats.coco import read_collection
    from segpipe.params import ConvertParams
    from segpipe.stages import convert

    convert.run(ConvertParams(workers=1, val_fraction=0.0, tile_size=40, tile_overlap=16),
                read_collection(corrupted["raw"]), tmp_path / "tiled", progress=False)
    (tmp_path / "audit" / "suspects").mkdir(parents=True)
    (tmp_path / "audit" / "suspects" / "0001_old.png").write_bytes(b"a previous run's")
    audit.run(AuditParams(top=0), colour_model, tmp_path / "tiled", tmp_path / "audit", progress=False)
    rows = [r for r in read_csv(tmp_path / "audit" / "suspects.csv") if r["annotation_id"]]
    coco = json.loads((corrupted["raw"] / "annotations" / "instances.json").read_text())
    ids = [int(r["annotation_id"]) for r in rows]
    assert sorted(ids) == sorted(a["id"] for a in coco["annotations"])  # once each
    areas = {int(r["annotation_id"]): (int(r["area"]), [int(v) for v in r["bbox"].split()]) for r in rows}
    assert all(areas[a["id"]] == (a["area"], a["bbox"]) for a in coco["annotations"])  # the union of the pieces
    top = {int(r["annotation_id"]) for r in rows[:SWAPPED]}
    assert len(top & set(corrupted["swap"])) >= SWAPPED - 1
    assert list((tmp_path / "audit" / "suspects").iterdir()) == []  # a previous run's overlays never linger


def test_audit_refuses_a_model_without_class_probabilities_and_other_classes(tiny_checkpoint, corrupted, tmp_path,
                                                                            tiny_shards):
    from segpipe.checkpoint import CheckpointError
    from segpipe.quality import NoProbabilities

    rcnn = tiny_checkpoint("mask_rcnn", shards=corrupted["shards"])
    with pytest.raises(NoProbabilities, match=r"mask_rcnn has no semantic output"):
        audit.run(AuditParams(), rcnn, corrupted["shards"], tmp_path / "a", progress=False)
    other = tiny_checkpoint("unet", shards=tiny_shards, out=tmp_path / "synth-unet", base_channels=4, depth=2)
    with pytest.raises(CheckpointError, match="class table differs"):
        audit.run(AuditParams(), other, corrupted["shards"], tmp_path / "a", progress=False)


def test_cli(colour_model, corrupted, tmp_path, capsys):
    from segpipe.cli import main

    main(["audit", "--model", str(colour_model), "--shards", str(corrupted["shards"]), "--out", str(tmp_path / "o"),
          "--top", "1", "--split", "train", "--no-progress", "--set", "audit.min_area=30"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["overlays"] == 1 and summary["min_area"] == 30 and summary["split"] == "train"
    assert all(int(r["area"]) >= 30 for r in read_csv(tmp_path / "o" / "suspects.csv"))
    with pytest.raises(SystemExit) as e:
        main(["audit", "--model", str(tmp_path / "nope"), "--shards", str(corrupted["shards"]), "--out",
              str(tmp_path / "o")])
    assert e.value.code == 1 and "neither an alias" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_engine_gives_the_same_suspects(colour_model, corrupted, tmp_path, ray_session, two_torch_threads):
    audit.run(AuditParams(top=2), colour_model, corrupted["shards"], tmp_path / "local", progress=False)
    audit.run(AuditParams(top=2), colour_model, corrupted["shards"], tmp_path / "ray", engine="ray", progress=False)
    assert (tmp_path / "ray" / "suspects.csv").read_text() == (tmp_path / "local" / "suspects.csv").read_text()
    assert sorted(p.name for p in (tmp_path / "ray" / "suspects").iterdir()) == sorted(
        p.name for p in (tmp_path / "local" / "suspects").iterdir())
