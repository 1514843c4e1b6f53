"""``segpipe params``: validate every section of a params file (and ``--set`` overrides).

``--merge FRAGMENT`` writes a params fragment (``segpipe tune``'s ``best.yaml``) into the params
file first: only the fragment's keys change; comments, order and every other key stay. The merged
file is validated before it replaces the old one (atomically); an invalid merge changes nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segpipe.params import (
    ParamsError,
    TrainParams,
    add_params_arguments,
    arch_train_params,
    as_dict,
    check_all,
    check_model_keys,
)


def check_per_architecture(train: TrainParams) -> None:
    """What ``segpipe train`` checks per architecture before it runs: ``train.overrides.<arch>`` on top
    of the section (types and ranges), and the keys of ``train.model.<arch>`` (build kwargs)."""
    from segpipe.models import MODELS, default_kwargs

    for arch in train.overrides:
        arch_train_params(train, arch)
    for arch, kwargs in train.model.items():
        if arch in MODELS:
            check_model_keys(arch, kwargs or {}, default_kwargs(arch))


def merge(params: Path | str, fragment: Path | str) -> Path:
    """Merge the fragment file into the params file ``params``, validated, atomically; returns ``params``."""
    import tempfile

    from segpipe.files import atomic_write_text
    from segpipe.tune import merged_params_text, read_fragment

    params = Path(params)
    try:
        text = params.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{params}: params file not found (--merge writes into an existing file)") from None
    merged = merged_params_text(text, read_fragment(fragment))
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / params.name
        probe.write_text(merged)
        try:
            check_per_architecture(check_all(probe)["train"])
        except ParamsError as e:
            raise ParamsError(f"--merge {fragment}: the merged {params} would not be valid: "
                              f"{str(e).replace(str(probe), str(params))}") from None
    atomic_write_text(params, merged)
    return params


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="segpipe params", description=__doc__.split("\n\n")[0])
    add_params_arguments(ap)
    ap.add_argument("--merge", metavar="FRAGMENT", default=None,
                    help="write this params fragment (e.g. segpipe tune's best.yaml) into --params first")
    args = ap.parse_args(argv)
    if args.merge:
        merge(args.params, args.merge)
        print(f"merged {args.merge} into {args.params}")
    for name, section in check_all(args.params, args.overrides).items():
        print(f"{name}: {as_dict(section)}")
