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
