import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

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


# --------------------------------------------------------------------------------------
# reports/index.html, the outcome, the browser
# --------------------------------------------------------------------------------------

CLASSES = [{"id": 0, "name": "ground", "isthing": False, "color": [120, 90, 60]},
           {"id": 1, "name": "worker", "isthing": True, "color": [255, 0, 255]},
           {"id": 2, "name": "excavator", "isthing": True, "color": [255, 200, 0]}]
PAN = {"pq": 0.41, "sq": 0.8, "rq": 0.5, "pq_things": 0.3, "pq_stuff": 0.52}


def gate_rows(arch: str, fail_at: str | None, detail: str = "miou 0.40 vs champion v1 0.61 + margin 0.0") -> list[dict]:
    gates = []
    for name in ("readable", "current_data", "metric", "min_value", "beats_baseline", "margin"):
        gates.append({"gate": name, "passed": name != fail_at, "detail": detail if name == fail_at else f"{name} ok"})
        if name == fail_at:
            break
    return gates


@pytest.fixture
def results(tmp_path):
    """A realistic set of results on disk: three evaluated models (one instance, one with a
    panoptic output), two baselines, a fused pair, train histories, a promotion and a drift report."""
    import numpy as np
    from PIL import Image

    from segpipe.inference import palette
    from segpipe.scoring import overlay

    per_class = {c["name"]: {"iou": 0.5} for c in CLASSES}
    per_col = {"synth": {"images": 12, "miou": 0.6}, "site2": {"images": 4, "miou": 0.3}}
    evals = {"unet": model("unet", miou=0.61, per_class=per_class, per_collection=per_col, images=16),
             "fcn8s": model("fcn8s", miou=0.40, per_class=per_class, per_collection=per_col, images=16),
             "maskformer": model("maskformer", miou=0.35, per_class=per_class, panoptic=PAN, images=16)}
    for arch, m in evals.items():
        write(tmp_path / "eval", arch, m)
        folder = tmp_path / "eval" / arch
        (folder / "per_class_iou.csv").write_text("class,iou\nground,0.9\nworker,0.25\nexcavator,0.5\n")
        (folder / "confusion_counts.csv").write_text(
            "actual,predicted,count\nground,ground,900\nground,worker,100\nworker,worker,30\nworker,ground,70\n"
            "excavator,excavator,50\n")
        (folder / "overlays").mkdir()
        rng = np.random.default_rng(0)
        for i in range(2):
            image = rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)
            gt = np.zeros((32, 40), np.uint8)
            gt[8:20, 10:30] = 1
            pred = np.where(rng.random((32, 40)) < 0.1, 255, 2).astype(np.uint8)
            Image.fromarray(overlay(image, gt, pred, palette(CLASSES), CLASSES)).save(folder / "overlays" / f"00{i}_im{i}.png")
    for name, miou in (("colour", 0.21), ("majority", 0.06)):
        write(tmp_path / "baselines", name, {"arch": f"baseline:{name}", "task": "semantic", "miou": miou,
                                             "baseline": name, **BASE, "per_collection": per_col})
    ref = {"path": "x", "sha256": "s" * 64}
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "metrics.json").write_text(json.dumps({
        "task": "panoptic", "arch": "fused", "images": 16, "panoptic": {**PAN, "pq": 0.45}, "fusion": {}, **BASE,
        "checkpoints": {"semantic": {"arch": "unet", **ref}, "instance": {"arch": "mask_rcnn", **ref}}}))
    for arch, vals in (("unet", ["0.2", "0.5", "0.61"]), ("fcn8s", ["", "", ""])):
        (tmp_path / "train" / arch).mkdir(parents=True)
        rows = [f"{e}\t{10 * e}\t{20.0 * e}\t{2.0 / e}\t{v}\t30\t0.001" for e, v in zip((1, 2, 3), vals)]
        (tmp_path / "train" / arch / "history.tsv").write_text(
            "epoch\tsteps\telapsed_s\ttrain_loss\tval_score\timages_per_s\tlr\n" + "\n".join(rows) + "\n")
        (tmp_path / "train" / arch / "metrics.json").write_text(json.dumps({"epochs": 3, "steps": 30, "train_s": 60.0,
                                                                            "startup_s": 10.0, "images_per_s": 30.0}))
    (tmp_path / "promo").mkdir()
    (tmp_path / "promo" / "promotion.json").write_text(json.dumps({
        "name": "segmenter", "time": "2026-01-02T03:04:05+00:00", "metric": "miou",
        "data": {"manifest": "m" * 64, "split": "val", "scoring": "k"},
        "champion_before": {"version": "v1", "arch": "fcn8s"}, "champion_after": {"version": "v2", "arch": "unet"},
        "champion_judged": {"version": "v1", "arch": "fcn8s", "how": "registered", "registered": 0.38,
                            "registered_manifest": "m" * 64, "on_this_data": 0.38},
        "created": ["v2", "v3"], "baselines": {"colour": 0.21, "majority": 0.06},
        "candidates": [
            {"eval_dir": f"{tmp_path}/eval/fcn8s", "arch": "fcn8s", "task": "semantic", "value": 0.40,
             "gates": gate_rows("fcn8s", "margin"), "decision": "rejected at margin: miou 0.40 vs champion v1 0.61"},
            {"eval_dir": f"{tmp_path}/eval/unet", "arch": "unet", "task": "semantic", "value": 0.61,
             "gates": gate_rows("unet", None), "decision": "promoted to champion"},
            {"eval_dir": f"{tmp_path}/eval/maskformer", "arch": "maskformer", "task": "semantic", "value": 0.35,
             "gates": gate_rows("maskformer", "margin"), "decision": "rejected at margin: miou 0.35 vs champion"}],
        "panoptic": {"metric": "panoptic.pq", "champion_before": None, "champion_after": {"version": "v3", "arch": "fused", "pair": "unet + mask_rcnn"},
                     "champion_judged": None, "challenger": None,
                     "candidates": [{"eval_dir": f"{tmp_path}/fused", "arch": "fused", "task": "panoptic", "value": 0.45,
                                     "gates": gate_rows("fused", None), "decision": "promoted to champion"},
                                    {"eval_dir": f"{tmp_path}/eval/maskformer", "arch": "maskformer",
                                     "task": "semantic", "value": 0.41, "gates": gate_rows("maskformer", "margin"),
                                     "decision": "passed every gate, but models/fused ranks higher"}]}}))
    (tmp_path / "drift.json").write_text(json.dumps({"collections": [{"name": "site2", "psi": 0.31, "drifted": True},
                                                                      {"name": "synth", "psi": 0.02, "drifted": False}],
                                                     "summary": "site2 drifted"}))
    return tmp_path


def write_report(results, html_name: str = "index.html") -> tuple[str, Path]:
    page = results / "reports" / html_name
    run(results / "eval", results / "promo", results / "reports" / "summary.md", results / "train",
        results / "baselines", results / "fused", html=page, drift=results / "drift.json")
    return page.read_text(), page


class PageParser(HTMLParser):
    """Every tag with its attributes, every table's rows (by the id of the section holding it)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.section: str | None = None
        self.tables: dict[str, list[list[str]]] = {}
        self.depth = 0  # of nested tables (the gates' lists and the drift's tables sit inside cells)
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.title = ""
        self.in_title = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "section":
            self.section = attrs.get("id")
        elif tag == "title":
            self.in_title = True
        elif tag == "table":
            self.depth += 1
            if self.depth == 1:
                self.tables.setdefault(self.section, [])
        elif tag == "tr" and self.depth == 1:
            self.row = []
        elif tag in ("td", "th") and self.depth == 1:
            self.cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self.depth -= 1
        elif tag in ("td", "th") and self.depth == 1 and self.cell is not None:
            self.row.append(" ".join("".join(self.cell).split()))
            self.cell = None
        elif tag == "tr" and self.depth == 1 and self.row is not None:
            self.tables[self.section].append(self.row)
            self.row = None
        elif tag == "title":
            self.in_title = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        if self.in_title:
            self.title += data


def parse(text: str) -> PageParser:
    p = PageParser()
    p.feed(text)
    return p


def test_html_report_is_self_contained_and_has_every_part(results):
    import base64
    import io

    from PIL import Image

    text, page = write_report(results)
    p = parse(text)
    assert p.title == "segpipe report"
    # nothing is loaded from elsewhere: no script, stylesheet link, font or remote image
    assert not [t for t, _ in p.tags if t in ("script", "link", "iframe", "object", "embed")]
    assert "@import" not in text and "url(" not in text
    referenced = [a[k] for t, a in p.tags for k in ("src", "href") if k in a]
    assert referenced and all(not r.startswith(("http:", "https:", "//", "ftp:")) for r in referenced)
    images = [a["src"] for t, a in p.tags if t == "img"]
    for src in images:  # every image exists: inline PNGs that decode, or files beside the page
        if src.startswith("data:"):
            assert src.startswith("data:image/png;base64,")
            with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
                assert im.width > 10 and im.height > 10
        else:
            assert (page.parent / src).is_file(), src
    # learning curves, IoU bars, one confusion heatmap per model, the champion's two overlays
    assert len(images) == 1 + 1 + 3 + 2
    sections = [a.get("id") for t, a in p.tags if t == "section"]
    assert sections == ["outcome", "summary", "curves", "per-class-iou", "confusion", "overlays", "pq", "collections",
                        "promotion", "drift"]
    summary = p.tables["summary"]
    assert [r[0] for r in summary] == ["arch", "fcn8s", "maskformer", "unet", "baseline: colour", "baseline: majority"]
    assert summary[3][4] == "0.610" and len({len(r) for r in summary}) == 1
    assert 'class="best"><td>unet</td>' in text  # the champion's row
    assert [r[0] for r in p.tables["pq"]] == ["model", "maskformer", "fused: unet + mask_rcnn"]
    assert p.tables["collections"] == [["collection", "images", "fcn8s", "unet", "baseline: colour", "baseline: majority"],
                                       ["site2", "4", "0.300", "0.300", "0.300", "0.300"],
                                       ["synth", "12", "0.600", "0.600", "0.600", "0.600"]]
    gates = p.tables["promotion"]
    assert [r[0] for r in gates] == ["candidate", "fcn8s", "unet", "maskformer", "candidate", "fused", "maskformer"]
    assert gates[1][3].startswith("rejected at margin") and "FAIL margin: miou 0.40 vs champion v1" in gates[1][4]
    assert gates[2][4].count("PASS") == 6
    assert [r[0] for r in p.tables["drift"]] == ["collections", "summary"] and "site2 drifted" in text
    assert "fcn8s" in text and "Not validated during training" in text  # fcn8s has no validation scores


def test_the_outcome_names_the_champion_the_baseline_the_panoptic_champion_and_every_decision(results):
    write_report(results)
    outcome = (results / "reports" / "ending.txt").read_text()
    assert outcome.splitlines()[:2] == [
        "== segpipe: the outcome (promotion of 2026-01-02T03:04:05+00:00) ==",
        "Champion: v2 (unet), newly promoted (was v1 (fcn8s)): miou 0.6100 on val; best baseline colour 0.2100 (+0.4000)."]
    assert ("Panoptic champion: v3 (fused) = unet + mask_rcnn, newly promoted: panoptic.pq 0.4500."
            in outcome.splitlines())
    assert "  fcn8s       rejected at margin: miou 0.40 vs champion v1 0.61" in outcome
    assert "New registry versions: v2, v3." in outcome
    assert outcome.rstrip().endswith(f"Report: {results / 'reports' / 'index.html'} (tables: "
                                     f"{results / 'reports' / 'summary.md'})")
    assert len(outcome.splitlines()) <= 12  # short: it ends make pipeline


def test_the_command_prints_the_outcome_or_leaves_it_for_later(results, capsys, monkeypatch):
    from segpipe.commands import report

    argv = ["--evals", str(results / "eval"), "--promotion", str(results / "promo"), "--out",
            str(results / "r" / "summary.md"), "--html", str(results / "r" / "index.html")]
    report.main(argv)
    out = capsys.readouterr().out
    assert out.startswith("== segpipe: the outcome (promotion of ") and "\nChampion: v2 (unet)" in out
    assert out.splitlines()[-1].startswith("Report: ")
    monkeypatch.setenv(report.ENDING_ENV, "later")
    report.main(argv)
    assert capsys.readouterr().out == f"report: wrote {results / 'r' / 'index.html'}, {results / 'r' / 'summary.md'}\n"
    assert (results / "r" / "ending.txt").read_text() == out
    with pytest.raises(report.ReportError, match="--screenshot needs --html"):
        report.main(argv[:6] + ["--screenshot", str(results / "x.png")])


def test_browser_renders_the_report_with_its_title(results):
    """The page as a person sees it: headless Chromium renders it (offline: it loads nothing),
    the screenshot is not blank, and the title is drawn where the page puts it. The title's
    pixels are found by rendering the page again with the heading's text removed: the two
    screenshots differ in the header band, where the title sits. (Below the header two shots
    of one page may differ: headless Chromium sometimes shoots before the last tiles are painted.)"""
    import numpy as np
    from PIL import Image

    from segpipe.report_html import INSTALL_CHROMIUM, find_chromium, screenshot

    if find_chromium() is None:
        pytest.skip(f"browser test not run: no chromium on PATH; install it with: sudo {INSTALL_CHROMIUM}")
    text, page = write_report(results)
    untitled = page.with_name("untitled.html")
    heading = "<header><h1>segpipe report</h1>"
    assert heading in text
    untitled.write_text(text.replace(heading, "<header><h1>&nbsp;</h1>"))
    shots = [np.asarray(Image.open(screenshot(p, results / f"{p.stem}.png", width=1000, height=900)).convert("RGB"))
             for p in (page, untitled)]
    shot = shots[0]
    assert shot.shape == (900, 1000, 3)
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 50  # text, tables, figures: not a blank page
    header = np.all(shot == (0x1F, 0x4E, 0x79), axis=2)  # the header's background colour
    rows = np.nonzero(header.mean(axis=1) > 0.5)[0]
    assert len(rows) > 30, "the page header was not drawn"
    top, bottom = rows.min(), rows.max()
    changed = np.any(shots[0][top:bottom + 1] != shots[1][top:bottom + 1], axis=2)
    ys, xs = np.nonzero(changed)
    assert len(ys) > 200, "the title's text was not drawn"
    assert xs.max() < 500 and ys.max() - ys.min() < 60  # one line of large text at the left of the header
