"""Running the tools the flows wrap (``dvc``, ``git``, ``segpipe``) as subprocesses.

Each command runs in its own process group: ``dvc repro`` starts the stage's shell, which starts
``segpipe train``, which starts Ray. On a timeout, a Prefect cancellation or Ctrl-C, the whole
group is interrupted (SIGINT, so DVC releases its repository lock), then killed after a grace
period: a timed-out stage never keeps training in the background.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from segpipe.errors import UserError

GRACE_S = 10.0  # between SIGINT and SIGKILL of a command's process group
TAIL_CHARS = 4000  # of a failed command's output, kept in its error


class CommandError(UserError, RuntimeError):
    """A command exited with a non-zero status; the message holds the command and its output tail."""

    def __init__(self, argv: list[str], returncode: int, output: str) -> None:
        self.argv, self.returncode, self.output = argv, returncode, output
        super().__init__(f"`{' '.join(argv)}` exited with status {returncode}:\n{output[-TAIL_CHARS:]}")


class CommandTimeout(TimeoutError):
    """A command ran past its time limit and was stopped (its whole process group)."""


@dataclass(frozen=True)
class Completed:
    argv: list[str]
    returncode: int
    output: str  # stdout and stderr, interleaved as written


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for subprocesses: this interpreter's bin folder first on PATH.

    ``dvc.yaml`` calls ``segpipe``, which must be the one installed beside this Python (the
    Makefile does the same), whatever the PATH of the process serving the flows.
    """
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.update(extra or {})
    return env


def python_tool(module: str) -> list[str]:
    """argv prefix that runs ``module`` with this interpreter (``dvc``, ``segpipe``)."""
    return [sys.executable, "-m", module]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGINT the command's process group, SIGKILL whatever is left after GRACE_S."""
    pgid = proc.pid  # start_new_session: the command leads its own group
    try:
        os.killpg(pgid, signal.SIGINT)
    except ProcessLookupError:
        return
    # Children started in the background by a shell ignore SIGINT: wait for the group, not the leader.
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        proc.poll()
        if not _group_alive(pgid):
            break
        time.sleep(0.1)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run(
    argv: list[str],
    cwd: Path,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    echo: bool = True,
) -> Completed:
    """Run ``argv`` in ``cwd``; return its output, raise CommandError on a non-zero exit.

    The output streams to this process's stdout as it comes (``echo``), so Prefect's
    ``log_prints`` and a terminal show progress of long stages.
    """
    proc = subprocess.Popen(
        argv, cwd=cwd, env=tool_env() if env is None else env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    lines: list[str] = []
    try:
        # Reading happens in a thread so the timeout is enforced even while the command is silent.
        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if echo:
                    print(line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            reader.join(timeout=GRACE_S)
            raise CommandTimeout(f"`{' '.join(argv)}` ran past its limit of {timeout_s:g} s and was stopped") from None
        reader.join()
    except BaseException:
        # A Prefect timeout/cancellation or Ctrl-C lands here while we wait: stop the children too.
        if proc.poll() is None:
            _stop_group(proc)
        raise
    output = "".join(lines)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, output)
    return Completed(argv, proc.returncode, output)
