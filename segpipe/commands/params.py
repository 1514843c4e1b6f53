"""``segpipe params``: validate every section of a params file (and ``--set`` overrides)."""

from __future__ import annotations

import argparse

from segpipe.params import add_params_arguments, as_dict, check_all


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="segpipe params", description=__doc__)
    add_params_arguments(ap)
    args = ap.parse_args(argv)
    for name, section in check_all(args.params, args.overrides).items():
        print(f"{name}: {as_dict(section)}")
