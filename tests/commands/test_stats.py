import json

import numpy as np
from PIL import Image

from segpipe.commands.stats import compute, main
from segpipe.formats.base import ClassInfo, Record, Source
from segpipe.params import ConvertParams
from segpipe.stages.convert import run


def shard_set(tmp_path):
    recs = []
    for i in range(4):
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / f"{i}.png")
        sem = np.zeros((6, 8), np.uint8)
        sem[:2, :3] = 1  # 6 px of class 1
        sem[5, :] = 255  # 8 ignore px
        m = np.zeros((6, 8), bool)
        m[:2, :3] = True
        recs.append(Record(image_id=str(i), source="mem", image_path=tmp_path / f"{i}.png",
                           split="train" if i else "val", semantic=lambda s=sem: s,
                           instances=[{"id": 1, "category_id": 1, "iscrowd": i % 2, "mask": m}]))
    classes = [ClassInfo(0, "ground", False, (0, 0, 0)), ClassInfo(1, "worker", True, (255, 0, 0))]
    run(ConvertParams(workers=1), Source("mem", classes, 255, lambda: iter(recs), []), tmp_path / "out",
        progress=False)
    return tmp_path / "out"


def test_counts_per_split(tmp_path):
    stats = compute(shard_set(tmp_path))
    assert stats["train"]["images"] == 3 and stats["val"]["images"] == 1
    assert stats["train"]["classes"]["worker"] == {"id": 1, "pixels": 18, "instances": 1, "crowd": 2}
    assert stats["train"]["classes"]["ground"]["pixels"] == 3 * (48 - 6 - 8)
    assert stats["val"]["ignore_pixels"] == 8 and stats["val"]["classes"]["worker"]["instances"] == 1


def test_cli_table_and_json(tmp_path, capsys):
    out = shard_set(tmp_path)
    main([str(out)])
    text = capsys.readouterr().out
    assert "train: 3 image(s), 144 pixels" in text and "worker" in text
    main([str(out), "--json"])
    assert json.loads(capsys.readouterr().out)["val"]["classes"]["ground"]["pixels"] == 34
    main([str(out), "--json", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text())["train"]["images"] == 3


def test_empty_shard_set_is_an_error_not_an_empty_table(tmp_path, capsys):
    import pytest

    from segpipe.cli import main as cli
    from segpipe.shards import ShardError, write_manifest

    out = shard_set(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    for part in out.rglob("*.parquet"):
        part.unlink()
    write_manifest(out, {**manifest, "splits": {}, "shards": []})
    with pytest.raises(ShardError, match="the shard set has no rows"):
        compute(out)
    with pytest.raises(SystemExit) as e:
        cli(["stats", str(out)])
    assert e.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"segpipe stats: error: {out}: the shard set has no rows")
