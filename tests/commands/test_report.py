import json

from segpipe.commands.report import metrics_table, run


def test_table_has_a_row_per_arch_and_dashes_for_missing():
    table = metrics_table({"unet": {"task": "semantic", "miou": 0.61234}, "mask_rcnn": {"task": "instance",
                           "segm": {"AP": 0.2}}}, {"unet": {"epochs": 8}})
    rows = table.splitlines()
    assert len(rows) == 4 and rows[2].startswith("| mask_rcnn | instance") and "0.200" in rows[2]
    assert "| unet | semantic |" in rows[3] and "0.612" in rows[3] and "| 8 |" in rows[3]


def test_run_writes_summary_with_promotion(tmp_path):
    for arch, miou in (("unet", 0.6), ("fcn8s", 0.4)):
        (tmp_path / "eval" / arch).mkdir(parents=True)
        (tmp_path / "eval" / arch / "metrics.json").write_text(json.dumps({"task": "semantic", "miou": miou}))
    (tmp_path / "promo").mkdir()
    (tmp_path / "promo" / "promotion.json").write_text(json.dumps({
        "metric": "miou", "champion_before": None, "created": ["v1"],
        "champion_after": {"version": "v1", "arch": "unet", "value": 0.6},
        "candidates": [{"arch": "unet", "decision": "promoted to champion"}, {"arch": "fcn8s", "decision": "not best"}]}))
    text = run(tmp_path / "eval", tmp_path / "promo", tmp_path / "summary.md")
    assert (tmp_path / "summary.md").read_text() == text
    assert "after: v1 (unet, miou 0.600)" in text and "| fcn8s | not best |" in text


def test_baselines_are_rows_and_the_training_share_is_stated(tmp_path):
    for folder, name, m in (("eval", "unet", {"task": "semantic", "miou": 0.55}),
                            ("baselines", "colour", {"task": "semantic", "miou": 0.21, "baseline": "colour"}),
                            ("baselines", "majority", {"task": "semantic", "miou": 0.06, "baseline": "majority"}),
                            ("train", "unet", {"train_s": 90.0, "startup_s": 10.0, "steps": 400})):
        (tmp_path / folder / name).mkdir(parents=True)
        (tmp_path / folder / name / "metrics.json").write_text(json.dumps(m))
    text = run(tmp_path / "eval", tmp_path / "promo", tmp_path / "summary.md", tmp_path / "train", tmp_path / "baselines")
    rows = [r for r in text.splitlines() if r.startswith("| ")]
    assert rows[1].startswith("| unet | semantic") and "| 400 | 90.000 | 10.000 |" in rows[1]
    assert rows[2].startswith("| baseline: colour | semantic") and "0.210" in rows[2]
    assert rows[3].startswith("| baseline: majority")
    assert "90 s in epochs and 10 s of start-up over 1 train stage(s); training share 0.90" in text


def test_pq_table_has_maskformer_and_the_fused_pair_and_the_panoptic_champion(tmp_path):
    pan = {"pq": 0.41, "sq": 0.8, "rq": 0.5, "pq_things": 0.3, "pq_stuff": 0.52}
    for arch, m in (("unet", {"task": "semantic", "miou": 0.6}),
                    ("maskformer", {"task": "semantic", "miou": 0.5, "panoptic": pan, "images": 5})):
        (tmp_path / "eval" / arch).mkdir(parents=True)
        (tmp_path / "eval" / arch / "metrics.json").write_text(json.dumps(m))
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "metrics.json").write_text(json.dumps({
        "task": "panoptic", "arch": "fused", "images": 5, "panoptic": {**pan, "pq": 0.45, "pq_stuff": None},
        "checkpoints": {"semantic": {"arch": "unet"}, "instance": {"arch": "mask_rcnn"}}}))
    (tmp_path / "promo").mkdir()
    (tmp_path / "promo" / "promotion.json").write_text(json.dumps({
        "metric": "miou", "champion_before": None, "champion_after": None, "candidates": [],
        "panoptic": {"metric": "panoptic.pq", "champion_before": None,
                     "champion_after": {"version": "v2", "arch": "fused", "value": 0.45}}}))
    text = run(tmp_path / "eval", tmp_path / "promo", tmp_path / "summary.md", fused_dir=tmp_path / "fused")
    assert "## Panoptic quality" in text
    assert "| model | PQ | SQ | RQ | PQ things | PQ stuff | images |" in text
    assert "| maskformer | 0.410 | 0.800 | 0.500 | 0.300 | 0.520 | 5 |" in text
    assert "| fused: unet + mask_rcnn | 0.450 | 0.800 | 0.500 | 0.300 | – | 5 |" in text
    assert "panoptic champion before: none; after: v2 (fused, panoptic.pq 0.450)" in text
    assert "| unet | semantic" in text and "| fused | panoptic" not in text


def test_no_pq_section_without_panoptic_models(tmp_path):
    (tmp_path / "eval" / "unet").mkdir(parents=True)
    (tmp_path / "eval" / "unet" / "metrics.json").write_text(json.dumps({"task": "semantic", "miou": 0.6}))
    assert "Panoptic" not in run(tmp_path / "eval", tmp_path / "promo", tmp_path / "summary.md")
