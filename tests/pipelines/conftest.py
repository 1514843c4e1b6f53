"""Shared fixtures of the flow tests: one Prefect test server for the session, and throwaway
git + DVC repositories whose stages are cheap shell commands."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from pipelines import commands


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API and database for every flow test (its start-up takes seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    # The test server need not phone home (its heartbeat task only logs errors offline).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=180):
        yield


def _init_repo(git_repo, git, repo: Path, files: dict[str, str]) -> Path:
    """A git repository with ``dvc init``, ``files`` written, everything committed."""
    git_repo(repo)
    commands.run(commands.python_tool("dvc") + ["init", "-q"], cwd=repo, echo=False)
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    return repo


@pytest.fixture
def init_repo(git_repo, git_cmd):
    """``init_repo(path, {relative path: text})``: a committed git + DVC repository."""
    return functools.partial(_init_repo, git_repo, git_cmd)
