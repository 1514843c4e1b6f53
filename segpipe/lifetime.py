"""How segpipe's processes end: with their parent, and cleanly on SIGTERM.

A pool worker of ``segpipe convert`` outlives a killed convert, blocked on a queue nobody writes
to; a ``segpipe train`` outlives a killed ``dvc repro`` and writes outputs DVC never records.
Both ask the kernel for a signal when their parent dies (Linux's ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import os
import signal
import sys
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.context import BaseContext

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def pool_context() -> BaseContext:
    """The start method for a worker pool: ``fork`` unless this process runs a Ray, then ``spawn``.

    Fork is cheap (a spawned worker re-imports numpy, pyarrow, PIL and segpipe: 3-4 s of a 300-image
    conversion on 2 cores). A Ray driver runs threads that take locks; one held at the fork stays
    held in the child for ever: a forked pool worker of a synth run inside a test process with a Ray
    hung that way. The commands fork beside their own progress-line thread and the idle pools of C
    libraries, as they always have. Not covered: other threads of a caller's that hold locks."""
    ray = sys.modules.get("ray")
    in_ray = ray is not None and hasattr(ray, "is_initialized") and ray.is_initialized()
    return get_context("spawn" if in_ray or "fork" not in get_all_start_methods() else "fork")


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux; elsewhere a no-op).

    If the parent is already gone (it died before the request took effect), exit at once.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
        except (OSError, AttributeError):
            return
    if os.getppid() != parent_pid:
        os._exit(1)


def terminate_as_interrupt() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so ``finally`` blocks (stopping a Ray this process
    started, removing temporaries) run when a parent or a scheduler stops the process."""

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
