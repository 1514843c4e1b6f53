"""The registry: versions, aliases, verified loading, GTO tags, concurrent updates."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from segpipe.checkpoint import META, WEIGHTS, save_checkpoint
from segpipe.registry import (
    INDEX,
    RegistryError,
    add_score,
    lineage,
    load,
    read_index,
    register,
    resolve,
    rollback,
    score_on,
    set_alias,
    transaction,
    verify,
    write_gto_tags,
)
from segpipe.results import EvalResult

CLASSES = [
    {"id": 0, "name": "background", "isthing": False, "color": [0, 0, 0]},
    {"id": 1, "name": "worker", "isthing": True, "color": [255, 0, 0]},
    {"id": 2, "name": "excavator", "isthing": True, "color": [0, 255, 0]},
]


def make_checkpoint(directory: Path, seed: int = 0, arch: str = "unet", manifest: str = "m" * 64) -> Path:
    """A real checkpoint of a small registered architecture, with distinct weights per seed."""
    from segpipe.models import build_model

    torch.manual_seed(seed)
    model = build_model(arch, len(CLASSES), **MODEL_KWARGS.get(arch, {}))
    meta = {
        "arch": arch,
        "task": "instance" if arch == "mask_rcnn" else "semantic",
        "num_classes": len(CLASSES),
        "model_kwargs": MODEL_KWARGS.get(arch, {}),
        "classes": CLASSES,
        "ignore_index": 255,
        "params": {"epochs": 1, "seed": seed},
        "shards_manifest_sha256": manifest,
        "epoch": 1,
        "metrics": {},
        "image_size": 64,
    }
    return save_checkpoint(directory, model, meta)


MODEL_KWARGS: dict[str, dict] = {"unet": {"base_channels": 4, "depth": 2}}


def fake_metrics(checkpoint: Path, miou: float = 0.5, manifest: str = "m" * 64, scoring: str | None = None) -> dict:
    from segpipe.files import sha256_file

    return {
        "arch": "unet", "task": "semantic",
        "checkpoint": {"path": str(checkpoint), "sha256": sha256_file(checkpoint / WEIGHTS)},
        "shards_manifest_sha256": manifest, "split": "val", "scoring": scoring, "miou": miou, "per_class": {},
    }


def fake_result(checkpoint: Path, **kwargs) -> EvalResult:
    return EvalResult.from_json(fake_metrics(checkpoint, **kwargs), "(test) metrics.json")


def test_register_copies_verifies_and_is_idempotent(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    reg = tmp_path / "registry"
    entry, created = register(reg, ck, fake_result(ck))
    assert created and entry["version"] == "v1"
    assert (reg / "v1" / WEIGHTS).read_bytes() == (ck / WEIGHTS).read_bytes()
    assert entry["files"][META] and entry["params_sha256"] and entry["shards_manifest_sha256"] == "m" * 64
    again, created = register(reg, ck, fake_result(ck))
    assert not created and again["version"] == "v1"
    entry2, created = register(reg, make_checkpoint(tmp_path / "ck2", seed=1))
    assert created and entry2["version"] == "v2"
    assert [v["version"] for v in read_index(reg)["versions"]] == ["v1", "v2"]


def test_register_refuses_checkpoint_changed_since_evaluation(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    result = fake_result(ck)
    make_checkpoint(ck, seed=1)  # retrained in place after its evaluation
    with pytest.raises(RegistryError, match="differs from the evaluated"):
        register(tmp_path / "registry", ck, result)


def test_load_by_alias_version_and_directory(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    reg = tmp_path / "registry"
    register(reg, ck)
    set_alias(reg, "champion", "v1", "test")
    model, meta = load("champion", registry=reg)
    assert meta.arch == "unet" and not model.training
    ref = dict(model.state_dict())
    for other in (load("v1", registry=reg)[0], load(ck)[0]):
        for k, v in other.state_dict().items():
            assert torch.equal(v, ref[k])
    with pytest.raises(RegistryError, match="unknown version 'v7'"):
        load("v7", registry=reg)
    with pytest.raises(RegistryError, match="no 'challenger' yet"):
        load("challenger", registry=reg)
    with pytest.raises(RegistryError, match="neither an alias"):
        resolve(tmp_path / "nowhere", reg)


@pytest.mark.parametrize("name", [WEIGHTS, META])
def test_tampered_checkpoint_is_refused_naming_the_file(tmp_path, name):
    ck = make_checkpoint(tmp_path / "ck")
    reg = tmp_path / "registry"
    register(reg, ck)
    set_alias(reg, "champion", "v1", "test")
    target = reg / "v1" / name
    data = bytearray(target.read_bytes())
    data[-2] ^= 0x01  # one flipped bit in the payload
    target.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=f"v1/{name}: sha256 .* does not match"):
        load("champion", registry=reg)


def test_missing_registered_file_is_refused(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    reg = tmp_path / "registry"
    register(reg, ck)
    (reg / "v1" / WEIGHTS).unlink()
    directory, expected = resolve("v1", reg)
    with pytest.raises(RegistryError, match="registered file is missing"):
        verify(directory, expected)


def test_malformed_index_names_the_key(tmp_path):
    reg = tmp_path / "registry"
    reg.mkdir()
    (reg / INDEX).write_text(json.dumps({"format": "segpipe-registry/1", "name": "x", "versions": [],
                                         "aliases": {"champion": "v3"}, "history": []}))
    with pytest.raises(RegistryError, match="alias 'champion' points to unknown version 'v3'"):
        read_index(reg)
    (reg / INDEX).write_text("{nope")
    with pytest.raises(RegistryError, match="index.json: not valid JSON"):
        read_index(reg)


def test_alias_history_records_moves(tmp_path):
    reg = tmp_path / "registry"
    register(reg, make_checkpoint(tmp_path / "a"))
    register(reg, make_checkpoint(tmp_path / "b", seed=1))
    assert set_alias(reg, "champion", "v1", "first")
    assert not set_alias(reg, "champion", "v1", "again")
    assert set_alias(reg, "champion", "v2", "better")
    history = read_index(reg)["history"]
    assert [(h["from"], h["to"]) for h in history] == [(None, "v1"), ("v1", "v2")]
    with pytest.raises(RegistryError, match="unknown alias 'prod'"):
        set_alias(reg, "prod", "v1", "x")


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_gto_tags_in_a_git_repo(tmp_path, git_repo, git_cmd):
    assert write_gto_tags("segmenter", "v1", True, cwd=tmp_path) == []  # not a repo: nothing, no error
    git_repo(tmp_path)
    assert write_gto_tags("segmenter", "v1", True, cwd=tmp_path) == ["segmenter@v1.0.0", "segmenter#prod#1"]
    assert write_gto_tags("segmenter", "v2", True, cwd=tmp_path) == ["segmenter@v2.0.0", "segmenter#prod#2"]
    assert write_gto_tags("segmenter", "v1", True, cwd=tmp_path) == ["segmenter#prod#3"]
    assert git_cmd(tmp_path, "cat-file", "-t", "segmenter#prod#1") == "tag"  # annotated, as GTO requires


def test_nan_metrics_are_stored_as_null(tmp_path):
    # The index is strict JSON: an undefined metric (NaN) is stored as null, not as invalid JSON.
    ck = make_checkpoint(tmp_path / "ck")
    m = fake_metrics(ck)
    m.update(miou=math.nan, per_class={"worker": {"iou": math.inf}})
    entry, _ = register(tmp_path / "registry", ck, EvalResult.from_json(m, "(test)"))
    assert entry["metrics"]["miou"] is None and entry["metrics"]["per_class"] == {"worker": {"iou": None}}
    assert entry["scores"][0]["metrics"]["miou"] is None
    assert read_index(tmp_path / "registry")["versions"][0]["metrics"]["miou"] is None


def test_entry_path_outside_the_registry_is_refused_naming_version_and_path(tmp_path):
    reg = tmp_path / "registry"
    register(reg, make_checkpoint(tmp_path / "ck"))
    set_alias(reg, "champion", "v1", "test")
    outside = make_checkpoint(tmp_path / "outside", seed=1)  # a real checkpoint beside the registry
    index = json.loads((reg / INDEX).read_text())
    for path in ("../outside", str(outside)):
        index["versions"][0]["path"] = path
        (reg / INDEX).write_text(json.dumps(index))
        with pytest.raises(RegistryError, match=f"version v1: path {path!r} .*refusing to load from outside"):
            load("champion", registry=reg)


def test_promote_on_a_full_disk_rolls_back_and_the_retry_succeeds(tmp_path, capsys, monkeypatch, tiny_shards):
    import errno

    from segpipe.cli import main
    from segpipe.params import EvaluateParams
    from segpipe.shards import open_shards

    ck = make_checkpoint(tmp_path / "ck")
    evaluated = tmp_path / "eval"
    evaluated.mkdir()
    metrics = fake_metrics(ck, manifest=open_shards(tiny_shards).manifest_sha256, scoring=EvaluateParams().scoring_key())
    (evaluated / "metrics.json").write_text(json.dumps(metrics))
    reg = tmp_path / "registry"
    argv = ["promote", "--candidates", str(evaluated), "--shards", str(tiny_shards), "--registry", str(reg),
            "--report", str(tmp_path / "report")]
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the defaults apply

    def full(self, data):  # the checkpoint copy fits; the index (written via Path.write_bytes) does not
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", full)
        with pytest.raises(SystemExit) as e:
            main(argv)
    assert e.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"segpipe promote: error: {reg / INDEX}: No space left on device (the disk is full: free space there and rerun)"
    assert sorted(p.name for p in reg.iterdir()) == [".lock"]  # no unindexed v1, no temporaries

    main(argv)
    assert read_index(reg)["aliases"] == {"champion": "v1"} and (reg / "v1" / WEIGHTS).is_file()
    assert load("champion", registry=reg)[1].arch == "unet"


def test_scores_are_kept_per_data_version(tmp_path):
    """A version is scored once per (shard manifest, split, scoring key): the registered score, then
    each re-score on new data beside it; a re-score on the same data replaces the older one."""
    ck = make_checkpoint(tmp_path / "ck")
    reg = tmp_path / "registry"
    entry, _ = register(reg, ck, fake_result(ck, manifest="a" * 64, scoring="k1"))
    assert score_on(entry, "a" * 64, "val", "k1")["how"] == "registered"
    assert score_on(entry, "b" * 64, "val", "k1") is None  # other data: must be re-scored
    assert score_on(entry, "a" * 64, "val", "k2") is None  # other scoring settings: likewise
    with transaction(reg) as index:
        v1 = index["versions"][0]
        add_score(v1, fake_metrics(ck, miou=0.3, manifest="b" * 64, scoring="k1"), "re-scored")
        add_score(v1, fake_metrics(ck, miou=0.31, manifest="b" * 64, scoring="k1"), "re-scored")
    v1 = read_index(reg)["versions"][0]
    assert [(s["shards_manifest_sha256"][0], s["how"]) for s in v1["scores"]] == [("a", "registered"), ("b", "re-scored")]
    assert score_on(v1, "b" * 64, "val", "k1")["metrics"]["miou"] == 0.31
    assert score_on(v1, "a" * 64, "val", "k1")["metrics"]["miou"] == 0.5


def test_rollback_points_the_alias_back_and_logs_why(tmp_path):
    reg = tmp_path / "registry"
    register(reg, make_checkpoint(tmp_path / "a"))
    register(reg, make_checkpoint(tmp_path / "b", seed=1))
    with pytest.raises(RegistryError, match="'champion' has no earlier version to roll back to"):
        rollback(reg)
    set_alias(reg, "champion", "v1", "first")
    set_alias(reg, "champion", "v2", "better")
    assert rollback(reg, reason="v2 fails on site3") == ("v2", "v1")
    index = read_index(reg)
    assert index["aliases"]["champion"] == "v1"
    assert index["history"][-1]["reason"] == "rollback: v2 fails on site3"
    assert rollback(reg, to="v2") == ("v1", "v2")
    with pytest.raises(RegistryError, match="unknown version 'v9'"):
        rollback(reg, to="v9")


def test_lineage_follows_parents_back_to_the_from_scratch_model(tmp_path):
    from segpipe.checkpoint import load_meta, write_meta

    reg = tmp_path / "registry"
    base = make_checkpoint(tmp_path / "base")
    v1, _ = register(reg, base)
    child = make_checkpoint(tmp_path / "child", seed=1)
    meta = load_meta(child)
    write_meta(child, type(meta)(**{**meta.__dict__, "parent": {"ref": "champion", "version": "v1",
                                                                "sha256": v1["checkpoint_sha256"], "arch": "unet"}}))
    v2, _ = register(reg, child)
    assert v2["parent"]["version"] == "v1"
    chain = lineage("v2", reg)
    assert [(m["model"], bool(m["parent"])) for m in chain] == [("v2", True), ("v1", False)]
    # an unregistered checkpoint fine-tuned from v2
    grandchild = make_checkpoint(tmp_path / "grandchild", seed=2)
    meta = load_meta(grandchild)
    write_meta(grandchild, type(meta)(**{**meta.__dict__, "parent": {"ref": "v2", "version": "v2",
                                                                     "sha256": v2["checkpoint_sha256"], "arch": "unet"}}))
    assert [m["model"] for m in lineage(grandchild, reg)] == [str(grandchild), "v2", "v1"]


def test_the_registry_commands_and_promote_do_not_import_torch(tmp_path):
    """Reading a checkpoint's meta and hashing its weights needs no torch (seconds of import):
    `segpipe registry list / rollback / lineage` run in a process that never imports it, nor does
    a process importing the promote stage and the report."""
    import subprocess
    import sys

    reg = tmp_path / "registry"
    register(reg, make_checkpoint(tmp_path / "a"))
    register(reg, make_checkpoint(tmp_path / "b", seed=1))
    set_alias(reg, "champion", "v2", "better")
    code = ("import sys; from segpipe.cli import main; import segpipe.stages.promote, segpipe.commands.report\n"
            "for args in (['list'], ['rollback', '--to', 'v1'], ['lineage', 'v2']):\n"
            "    main(['registry', *args, '--registry', sys.argv[1]])\n"
            "print('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(reg)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "champion: v2 -> v1" in out.stdout and out.stdout.rstrip().endswith("torch imported: False"), out.stdout
    assert read_index(reg)["aliases"]["champion"] == "v1"
