"""dvc.yaml lists, for every stage, each segpipe module the stage runs (DVC cannot see imports:
a module missing from a stage's deps means edits to it never rerun the stage)."""

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
    "evaluate": ["segpipe.stages.evaluate"],
    "baselines": ["segpipe.stages.evaluate"],
    "fuse": ["segpipe.stages.evaluate"],
    "promote": ["segpipe.stages.promote", "segpipe.commands.report"],
}


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
