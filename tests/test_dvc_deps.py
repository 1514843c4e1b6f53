"""dvc.yaml lists, for every stage, each segpipe module the stage runs and each params key it reads
(DVC sees neither imports nor which keys a program reads: a module or key missing from a stage
means edits to it never rerun the stage). Both are derived from the code here, not listed by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# What each dvc.yaml stage runs: the `segpipe` command line imports segpipe.cli, which imports
# the command's module.
ENTRIES = {
    "synth": ["segpipe.stages.synth"],
    "convert": ["segpipe.stages.convert"],
    "train": ["segpipe.stages.train"],
    "tune": ["segpipe.stages.tune"],
    "evaluate": ["segpipe.stages.evaluate"],
    "baselines": ["segpipe.stages.baselines"],
    "fuse": ["segpipe.stages.fuse"],
    "promote": ["segpipe.stages.promote", "segpipe.commands.report"],
}
# Train keys that are not one architecture's: the foreach list itself, and the per-architecture
# mappings each train@<arch> stage lists as train.overrides.${item} and train.model.${item}.
# The tune section likewise: its foreach list, and tune.space.${item}.
PER_ITEM = {"train": {"architectures": None, "overrides": "train.overrides.${item}", "model": "train.model.${item}"},
            "tune": {"architectures": None, "space": "tune.space.${item}"}}


def module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(name: str) -> set[str]:
    """segpipe modules imported anywhere in module ``name`` (top level and inside functions)."""
    path = module_file(name)
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m.split(".")[0] == "segpipe" and module_file(m) is not None}


def closure(entries: list[str]) -> set[str]:
    todo, seen = ["segpipe.cli", "segpipe", *entries], set()
    while todo:
        m = todo.pop()
        if m in seen or module_file(m) is None:  # a namespace package (segpipe/stages) runs no code
            continue
        seen.add(m)
        parts = m.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # importing a.b.c runs a and a.b
        todo.extend(imports_of(m))
    return seen


def stage_deps(stage: dict) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else d for d in (stage.get("do", stage).get("deps") or [])]


def test_every_module_a_stage_runs_is_one_of_its_deps():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(ENTRIES) == set(stages), "a new stage needs its entry modules in ENTRIES"
    missing = {}
    for name, entries in ENTRIES.items():
        deps = [Path(d) for d in stage_deps(stages[name])]
        files = sorted(module_file(m).relative_to(REPO) for m in closure(entries))
        lacking = [str(f) for f in files if not any(f == d or d in f.parents for d in deps)]
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml stages miss deps on modules they run: {missing}"


def test_the_closure_follows_function_level_imports():
    # train imports segpipe.data only inside functions; the closure must still find it
    assert "segpipe.data" in closure(["segpipe.stages.train"])
    assert "segpipe.inference" in closure(["segpipe.stages.evaluate"])


def sections_read(name: str) -> set[str]:
    """The params sections module ``name`` loads: the literal section names of its
    ``from_args(args, "SECTION")`` and ``load_section("SECTION", ...)`` calls."""
    tree = ast.parse(module_file(name).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "from_args", "load_section"):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.add(arg.value)
                    break
    return found


def covered(key: str, listed: list[str]) -> bool:
    """``key`` (section.field) is listed itself, or one of its parents is (a whole section)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in listed for i in range(1, len(parts) + 1))


def stage_params(stage: dict) -> list[str]:
    return [p for p in stage.get("do", stage).get("params") or [] if isinstance(p, str)]


def test_every_params_key_a_stage_reads_is_one_of_its_params():
    """Each stage's entry modules load some params sections; every field of those dataclasses must
    be a params entry of the stage (itself, or its whole section)."""
    import dataclasses

    from segpipe.params import SECTIONS

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, entries in ENTRIES.items():
        listed = stage_params(stages[name])
        sections = set().union(*(sections_read(m) for m in entries))
        assert sections, f"stage {name}: its entry modules load no params section (the scan found no from_args call)"
        lacking = []
        for section in sorted(sections):
            for f in dataclasses.fields(SECTIONS[section]):
                per_item = PER_ITEM.get(section, {})
                if f.name in per_item:
                    if per_item[f.name] is not None and per_item[f.name] not in listed and section not in listed:
                        lacking.append(per_item[f.name])
                elif not covered(f"{section}.{f.name}", listed):
                    lacking.append(f"{section}.{f.name}")
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml stages miss params they read: {missing}"


def test_the_params_scan_finds_what_the_stages_load():
    assert sections_read("segpipe.stages.train") == {"train"}
    assert sections_read("segpipe.stages.tune") == {"tune", "train"}
    assert sections_read("segpipe.stages.fuse") == {"fuse", "evaluate"}
    assert sections_read("segpipe.stages.promote") == {"promote", "evaluate"}


def test_no_stage_module_imports_another_stage_module():
    """What two stages share lives below them (segpipe.scoring, segpipe.results, ...)."""
    stages = sorted(f"segpipe.stages.{p.stem}" for p in (REPO / "segpipe" / "stages").glob("*.py")
                    if p.stem != "__init__")
    # every trial of a search is the train stage's run (segpipe tune runs that stage, as validate runs convert's)
    runs_stage = {"segpipe.stages.tune": {"segpipe.stages.train"}}
    wrong = {m: sorted(i for i in imports_of(m) if i in stages and i != m and i not in runs_stage.get(m, ()))
             for m in stages}
    assert not {m: i for m, i in wrong.items() if i}, f"stage modules import other stages: {wrong}"
    # `segpipe validate` is the convert stage's checks without the writing: it runs that stage
    allowed = {"segpipe.commands.validate": {"segpipe.stages.convert"}}
    commands = sorted(f"segpipe.commands.{p.stem}" for p in (REPO / "segpipe" / "commands").glob("*.py"))
    wrong = {m: sorted(i for i in imports_of(m) if i in stages and i not in allowed.get(m, ())) for m in commands}
    assert not {m: i for m, i in wrong.items() if i}, f"commands import stage modules: {wrong}"
