"""``segpipe validate``: the converter's checks on a dataset, writing a report instead of shards."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from segpipe.files import atomic_write_json
from segpipe.formats.base import Source
from segpipe.params import ConvertParams, add_params_arguments, as_dict, from_args
from segpipe.stages.convert import (
    add_source_arguments,
    check_source,
    dataset_entries,
    make_context,
    nothing_converted,
    process_source,
    read_source,
)


def summarize(source_name: str, images: int, quarantine: list[dict[str, str]], images_quarantined: int,
              warnings: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The report dict: counts plus every quarantine entry and warning (pure)."""
    annotations = sum(1 for e in quarantine if " annotation " in e["item"])
    return {
        "format": source_name,
        "images": images,
        "images_ok": images - images_quarantined,
        "images_quarantined": images_quarantined,
        "annotations_quarantined": annotations,
        "dataset_problems": sum(1 for e in quarantine if e["item"] == "dataset"),
        "ok": not quarantine and images > images_quarantined,
        "quarantine": quarantine,
        "warnings": warnings or [],
    }


def run(params: ConvertParams, source: Source, progress: bool = True) -> dict[str, Any]:
    """Run every check of ``segpipe convert`` on ``source`` and return the report."""
    check_source(source)
    ctx = make_context(source, params, encode=False)
    quarantine = dataset_entries(source)
    warnings: list[dict[str, str]] = []
    images = bad = 0
    for outcome in process_source(source, ctx, params.workers, progress):
        images += 1
        bad += outcome.image_quarantined
        quarantine.extend(outcome.quarantine)
        warnings.extend(outcome.warnings)
    return summarize(source.name, images, quarantine, bad, warnings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segpipe validate", description=__doc__)
    add_source_arguments(parser)
    parser.add_argument("--report", help="write the JSON report here")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any item is bad")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    params = from_args(args, "convert")
    source = read_source(args)  # errors the user can fix end as one line (segpipe.cli)
    report = run(params, source, progress=not args.no_progress)
    report["params"] = as_dict(dataclasses.replace(params, strict=params.strict or args.strict))
    if args.report:
        atomic_write_json(Path(args.report), report)
    print(f"{report['images']} image(s): {report['images_ok']} ok, {report['images_quarantined']} quarantined; "
          f"{report['annotations_quarantined']} annotation(s) and {report['dataset_problems']} dataset problem(s) "
          "quarantined")
    for e in report["quarantine"][:20]:
        print(f"  {e['file']}: {e['item']}: {e['reason']}")
    if len(report["quarantine"]) > 20:
        print(f"  ... {len(report['quarantine']) - 20} more (see the report)")
    for e in report["warnings"][:20]:
        print(f"  warning: {e['file']}: {e['item']}: {e['reason']}")
    if report["images_ok"] == 0:
        # Nothing would convert: that is a failed validation whatever --strict says.
        print(f"segpipe validate: error: {nothing_converted(source, report['images'], report['quarantine'])}"
              f"{'; see ' + args.report if args.report else ''}", file=sys.stderr)
        raise SystemExit(1)
    if (args.strict or params.strict) and not report["ok"]:
        raise SystemExit(1)
