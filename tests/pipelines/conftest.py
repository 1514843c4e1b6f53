"""Shared fixtures of the flow tests: one Prefect test server for the session, and throwaway
git + DVC repositories whose stages are cheap shell commands."""

from __future__ import annotations

import os
import subprocess
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


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _init_repo(repo: Path, files: dict[str, str]) -> Path:
    """``git init`` + ``dvc init`` in ``repo``, write ``files`` and commit everything."""
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "tests@segpipe.invalid")
    git(repo, "config", "user.name", "segpipe tests")
    git(repo, "config", "commit.gpgsign", "false")
    commands.run(commands.python_tool("dvc") + ["init", "-q"], cwd=repo, echo=False)
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    return repo


@pytest.fixture
def init_repo():
    """``init_repo(path, {relative path: text})``: a committed git + DVC repository."""
    return _init_repo


@pytest.fixture
def git_cmd():
    """``git_cmd(repo, *args)``: run git, return its stripped stdout."""
    return git
