import json

from segpipe.stages.report import metrics_table, run


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
