"""``segpipe registry``: look at the model registry, follow a model's lineage, roll an alias back.

    segpipe registry list [--registry DIR]
    segpipe registry lineage MODEL [--registry DIR]        # champion | vN | CHECKPOINT_DIR
    segpipe registry rollback [--alias champion] [--to vN] [--reason TEXT] [--registry DIR]

``lineage`` prints a model's ancestry back to its from-scratch ancestor: every fine-tuned model
(``train.init_from``) records its parent's registry version and sha256. ``rollback`` points an
alias back at the version it pointed at before (or ``--to``), logged in the alias history; the
promote stage depends on the registry, so the next ``dvc repro`` judges against the restored
champion.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segpipe.registry import ALIASES, DEFAULT_REGISTRY, lineage, read_index, rollback, scores_of


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segpipe registry", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb in ("list", "lineage", "rollback"):
        p = sub.add_parser(verb)
        p.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="registry directory (default: %(default)s)")
        if verb == "lineage":
            p.add_argument("model", help="champion | challenger | vN | CHECKPOINT_DIR")
        if verb == "rollback":
            p.add_argument("--alias", default="champion", choices=ALIASES)
            p.add_argument("--to", help="the version to point at (default: the one before)")
            p.add_argument("--reason", default="", help="why, for the alias history")
    args = parser.parse_args(argv)
    if args.verb == "list":
        index = read_index(args.registry)
        by_version = {}
        for alias, version in index["aliases"].items():
            by_version.setdefault(version, []).append(alias)
        for v in index["versions"]:
            parent = v.get("parent") or {}
            print(f"{v['version']:>4}  {v['arch']:<10} {v['task']:<9} {v['checkpoint_sha256'][:12]}  "
                  f"scored on {len(scores_of(v))} data version(s)  parent {parent.get('version') or parent.get('ref') or '-'}"
                  f"  {' '.join(by_version.get(v['version'], []))}")
        return
    if args.verb == "lineage":
        for depth, m in enumerate(lineage(args.model, args.registry)):
            how = "missing from the registry" if m.get("missing") else \
                f"fine-tuned from {m['parent'].get('version') or m['parent'].get('ref')}" if m["parent"] else "trained from scratch"
            print(f"{'  ' * depth}{m['model']} ({m['arch']}, {str(m['sha256'])[:12]}): {how}")
        return
    before, after = rollback(args.registry, args.alias, args.to, args.reason)
    print(f"{args.alias}: {before} -> {after} ({args.registry / 'index.json'})")
