"""``segpipe params``: validate every section of a params file (and ``--set`` overrides)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from segpipe.params import ParamsError, add_params_arguments, as_dict, check_all, read_yaml


def check_section_shapes(raw: dict[str, Any], path: Path | str) -> None:
    """Every section present must be a mapping of keys (``train: 5`` is not); ParamsError naming
    the file and the section otherwise."""
    for name, value in raw.items():
        if value is not None and not isinstance(value, dict):
            raise ParamsError(f"{path}: section {name!r} is {value!r}; it must be a mapping of keys "
                              f"(e.g. '{name}:' followed by indented 'key: value' lines)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="segpipe params", description=__doc__)
    add_params_arguments(ap)
    args = ap.parse_args(argv)
    check_section_shapes(read_yaml(Path(args.params)), args.params)
    for name, section in check_all(args.params, args.overrides).items():
        print(f"{name}: {as_dict(section)}")
