"""segpipe select: out-of-distribution frames come first, near-duplicates do not fill the list."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from colour_scenes import write_collection
from PIL import Image

from segpipe.commands import select
from segpipe.params import SelectParams, WindowParams

OOD = 4


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """16 ordinary colour scenes and 4 re-lit ones (55 % of the light), unlabelled, in one folder."""
    root = tmp_path_factory.mktemp("pool")
    write_collection(root / "ordinary", images=16, seed=7)
    write_collection(root / "relit", images=OOD, seed=8, gain=0.55)
    frames = root / "frames"
    frames.mkdir()
    for kind in ("ordinary", "relit"):
        for p in sorted((root / kind / "images").iterdir()):
            shutil.copy(p, frames / f"{kind}_{p.name}")
    return frames


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("strategy", ["diverse", "entropy", "margin"])
def test_out_of_distribution_frames_come_first(colour_model, pool, tmp_path, strategy):
    k = 6
    summary = select.run(SelectParams(), colour_model, pool, k, tmp_path, strategy=strategy, progress=False)
    rows = read_csv(tmp_path / "selected.csv")
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, k + 1)]
    picked = [Path(r["file"]).name for r in rows]
    assert sum(name.startswith("relit_") for name in picked) >= OOD - 1, picked  # most of them, in 6 of 20
    assert Path(rows[0]["file"]).name.startswith("relit_")
    assert summary == {"model": str(colour_model), "arch": "unet", "input": str(pool), "frames": 20, "k": k,
                       "selected": k, "strategy": strategy, "engine": "local"}
    assert list(rows[0])[:3] == ["rank", "file", "score"] and ("distance" in rows[0]) == (strategy == "diverse")
    with Image.open(tmp_path / "contact_sheet.png") as sheet:  # 5 columns, 2 rows of thumbnails
        assert sheet.size == (5 * (select.THUMB + 4) + 4, 2 * (select.THUMB + 20) + 4)


def test_diverse_picks_each_duplicate_at_most_once(colour_model, pool, tmp_path):
    dups = tmp_path / "dups"
    dups.mkdir()
    originals = sorted(pool.glob("ordinary_*"))[:5]
    for p in originals:
        for copy in range(3):
            shutil.copy(p, dups / f"{copy}_{p.name}")
    summary = select.run(SelectParams(), colour_model, dups, 8, tmp_path / "out", progress=False)
    rows = read_csv(tmp_path / "out" / "selected.csv")
    contents = [hashlib.sha256(Path(r["file"]).read_bytes()).hexdigest() for r in rows]
    assert len(rows) == 5 and len(set(contents)) == 5  # each frame once, then nothing new is left
    assert summary["selected"] == 5 and "10 others duplicate selected ones" in summary["note"]
    entropy = select.run(SelectParams(), colour_model, dups, 8, tmp_path / "e", strategy="entropy", progress=False)
    assert entropy["selected"] == 8  # uncertainty alone takes the copies of the most uncertain frames


def test_large_frames_go_by_tiles(colour_model, pool, tmp_path):
    """A 150 px frame with 64 px tiles: the sliding window, the same numbers as predict_probabilities."""
    from segpipe.inference import Predictor

    frames = tmp_path / "big"
    frames.mkdir()
    image = np.concatenate([np.concatenate([np.asarray(Image.open(p)) for p in sorted(pool.iterdir())[i:i + 3]], 1)
                            for i in (0, 3, 16)], 0)[:150, :150]  # the last row of scenes is re-lit
    Image.fromarray(image).save(frames / "ortho.png")
    params = SelectParams(window=WindowParams(tile=64, overlap=16, batch_size=2))
    select.run(params, colour_model, frames, 1, tmp_path / "out", strategy="margin", progress=False)
    (row,) = read_csv(tmp_path / "out" / "selected.csv")
    probs = Predictor.load(colour_model).probabilities(image, 64, 16, 2).probs
    assert float(row["confidence"]) == pytest.approx(float(probs.max(0).mean()), abs=1e-4)


def test_cli_and_errors(colour_model, pool, tmp_path, capsys, tiny_checkpoint):
    from segpipe.cli import main

    main(["select", "--model", str(colour_model), "--input", str(pool), "--k", "3", "--out", str(tmp_path / "o"),
          "--no-progress", "--set", "select.strategy=entropy"])
    assert json.loads(capsys.readouterr().out)["strategy"] == "entropy"
    assert len(read_csv(tmp_path / "o" / "selected.csv")) == 3
    for argv, message in ((["--k", "0"], "--k 0: must be >= 1"),
                          (["--k", "2", "--set", "select.near=0"], "select.near = 0")):
        with pytest.raises(SystemExit):
            main(["select", "--model", str(colour_model), "--input", str(pool), "--out", str(tmp_path / "x"), *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["select", "--model", str(colour_model), "--input", str(tmp_path / "none"), "--k", "2",
              "--out", str(tmp_path / "x")])
    assert "no such image or directory" in capsys.readouterr().err
