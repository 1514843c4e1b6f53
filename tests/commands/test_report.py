import json

from segpipe.commands.report import collection_table, metrics_table, run

BASE = {"shards_manifest_sha256": "m" * 64, "split": "val", "per_class": {}}


def model(arch: str, **metrics) -> dict:
    """A metrics.json of segpipe evaluate (segpipe.results checks its keys)."""
    return {"arch": arch, "task": "semantic", "checkpoint": {"path": f"models/train/{arch}/checkpoint", "sha256": "s" * 64},
            **BASE, **metrics}


def write(folder, name, m):
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / name / "metrics.json").write_text(json.dumps(m))


def test_table_has_a_row_per_arch_and_dashes_for_missing():
    table = metrics_table({"unet": {"task": "semantic", "miou": 0.61234}, "mask_rcnn": {"task": "instance",
                           "segm": {"AP": 0.2}}}, {"unet": {"epochs": 8}})
    rows = table.splitlines()
    assert len(rows) == 4 and rows[2].startswith("| mask_rcnn | instance") and "0.200" in rows[2]
    assert "| unet | semantic |" in rows[3] and "0.612" in rows[3] and "| 8 |" in rows[3]


def test_run_writes_summary_with_promotion_and_names_an_unreadable_result(tmp_path):
    for arch, miou in (("unet", 0.6), ("fcn8s", 0.4)):
        write(tmp_path / "eval", arch, model(arch, miou=miou))
    write(tmp_path / "eval", "broken", {"task": "semantic", "miou": 0.9})  # no provenance: not shown, named
    (tmp_path / "promo").mkdir()
    (tmp_path / "promo" / "promotion.json").write_text(json.dumps({
        "metric": "miou", "champion_before": None, "created": ["v1"],
        "champion_judged": None, "champion_after": {"version": "v1", "arch": "unet"},
        "candidates": [{"arch": "unet", "decision": "promoted to champion"}, {"arch": "fcn8s", "decision": "not best"}]}))
    text = run(tmp_path / "eval", tmp_path / "promo", tmp_path / "summary.md")
    assert (tmp_path / "summary.md").read_text() == text
    assert "after: v1 (unet)" in text and "| fcn8s | not best |" in text
    assert "| broken |" not in text and "## Not shown" in text and "broken/metrics.json: missing key(s)" in text


def test_baselines_are_rows_and_the_training_share_is_stated(tmp_path):
    write(tmp_path / "eval", "unet", model("unet", miou=0.55))
    for name, miou in (("colour", 0.21), ("majority", 0.06)):
        write(tmp_path / "baselines", name, {"arch": f"baseline:{name}", "task": "semantic", "miou": miou,
                                             "baseline": name, **BASE})
    write(tmp_path / "train", "unet", {"train_s": 90.0, "startup_s": 10.0, "steps": 400})
    text = run(tmp_path / "eval", tmp_path / "promo", tmp_path / "summary.md", tmp_path / "train", tmp_path / "baselines")
    rows = [r for r in text.splitlines() if r.startswith("| ")]
    assert rows[1].startswith("| unet | semantic") and "| 400 | 90.000 | 10.000 |" in rows[1]
    assert rows[2].startswith("| baseline: colour | semantic") and "0.210" in rows[2]
    assert rows[3].startswith("| baseline: majority")
    assert "90 s in epochs and 10 s of start-up over 1 train stage(s); training share 0.90" in text


def test_collection_table_has_a_row_per_collection_and_a_column_per_model(tmp_path):
    per = {"synth": {"images": 100, "miou": 0.61}, "site2": {"images": 15, "miou": 0.32}}
    evals = {"unet": model("unet", miou=0.58, per_collection=per),
             "fcn8s": model("fcn8s", miou=0.3, per_collection={"synth": {"images": 100, "miou": 0.35}})}
    table = collection_table(evals, {"colour": {"per_collection": {"synth": {"miou": 0.2}, "site2": {"miou": 0.1}}}})
    rows = table.splitlines()
    assert rows[0] == "| collection | images | fcn8s | unet | baseline: colour |"
    assert rows[2] == "| site2 | 15 | – | 0.320 | 0.100 |" and rows[3] == "| synth | 100 | 0.350 | 0.610 | 0.200 |"
    for arch, m in evals.items():
        write(tmp_path / "eval", arch, m)
    text = run(tmp_path / "eval", tmp_path / "promo", tmp_path / "summary.md")
    assert "## Per collection" in text and "| site2 | 15 | – | 0.320 |" in text


def test_pq_table_has_maskformer_and_the_fused_pair_and_the_panoptic_champion(tmp_path):
    pan = {"pq": 0.41, "sq": 0.8, "rq": 0.5, "pq_things": 0.3, "pq_stuff": 0.52}
    write(tmp_path / "eval", "unet", model("unet", miou=0.6))
    write(tmp_path / "eval", "maskformer", model("maskformer", miou=0.5, panoptic=pan, images=5))
    (tmp_path / "fused").mkdir()
    ref = {"path": "x", "sha256": "s" * 64}
    (tmp_path / "fused" / "metrics.json").write_text(json.dumps({
        "task": "panoptic", "arch": "fused", "images": 5, "panoptic": {**pan, "pq": 0.45, "pq_stuff": None},
        "fusion": {}, **BASE, "checkpoints": {"semantic": {"arch": "unet", **ref}, "instance": {"arch": "mask_rcnn", **ref}}}))
    (tmp_path / "promo").mkdir()
    (tmp_path / "promo" / "promotion.json").write_text(json.dumps({
        "metric": "miou", "champion_before": None, "champion_after": None, "candidates": [],
        "panoptic": {"metric": "panoptic.pq", "champion_before": None,
                     "champion_after": {"version": "v2", "arch": "fused"}}}))
    text = run(tmp_path / "eval", tmp_path / "promo", tmp_path / "summary.md", fused_dir=tmp_path / "fused")
    assert "## Panoptic quality" in text
    assert "| model | PQ | SQ | RQ | PQ things | PQ stuff | images |" in text
    assert "| maskformer | 0.410 | 0.800 | 0.500 | 0.300 | 0.520 | 5 |" in text
    assert "| fused: unet + mask_rcnn | 0.450 | 0.800 | 0.500 | 0.300 | – | 5 |" in text
    assert "panoptic champion before: none; after: v2 (fused)" in text
    assert "| unet | semantic" in text and "| fused | panoptic" not in text


def test_no_pq_section_without_panoptic_models(tmp_path):
    write(tmp_path / "eval", "unet", model("unet", miou=0.6))
    assert "Panoptic" not in run(tmp_path / "eval", tmp_path / "promo", tmp_path / "summary.md")
