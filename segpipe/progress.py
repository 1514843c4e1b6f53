"""What a stage shows on the console: one live progress line, its own results, and nothing else.

Two pieces, used by every stage:

- :class:`Progress`: one line per running stage that tells the time. On a terminal it is
  redrawn in place (with tqdm's terminal handling); when the output is not a terminal (CI, a log
  file) a plain line is printed every ``SEGPIPE_PROGRESS_EVERY`` seconds (default 10) instead,
  never the same line twice. A count stage (convert, evaluate) shows images done of the total,
  the rate and the time left; a train stage shows step, images/s, seconds used of its budget (or
  epochs of the total), the time left and the last validation score. Code that runs in Ray
  workers (the train loop) feeds the driver's line through :meth:`Progress.relayed`.
- :func:`session`: what the ``segpipe`` command wraps every command in. Output of third-party
  code (Ray's and Ray Data's start-up and execution messages, what Ray's workers log to stderr
  and Ray forwards to the driver, dependency warnings) goes to a per-command log file,
  ``logs/<command>[-<name>].log``, whose path is printed once, when the first such message
  arrives. What segpipe itself prints (results, its own warnings, what its code in a Ray worker
  prints to stdout, the error a command ends with) stays on the console.
  ``SEGPIPE_LOG=debug`` (or ``segpipe -v COMMAND``) shows everything on the console, as before.

Who wrote a message is decided by the call stack of the write (:func:`origin`): the first frame
that is neither the standard library nor plumbing (tqdm, this module) names its author: a
module of segpipe (or of any file outside an installed package) is ours, a module of an
installed package is a library. Ray's forwarding thread, its loggers and ``warnings.warn``
called by a dependency all land in the log that way, wherever they were configured.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shutil
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from segpipe.errors import UserError

LOG_ENV = "SEGPIPE_LOG"  # "debug": every message on the console, as without a session
EVERY_ENV = "SEGPIPE_PROGRESS_EVERY"  # seconds between plain progress lines (not a terminal)
LOG_DIR_ENV = "SEGPIPE_LOG_DIR"  # where the per-command log files go (default: logs)
DEFAULT_EVERY_S = 10.0
LIVE_REFRESH_S = 0.5  # how often a terminal line is redrawn (its clock moves even without updates)
RELAY_EVERY_S = 0.5  # at most one worker update per this many seconds crosses to the driver


class ProgressError(UserError, ValueError):
    """A progress or logging setting (an environment variable) is invalid; the message names it."""


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


def verbose(env: dict[str, str] | None = None) -> bool:
    """Whether ``SEGPIPE_LOG=debug``: everything reaches the console."""
    value = (os.environ if env is None else env).get(LOG_ENV, "").strip().lower()
    if value not in ("", "info", "debug"):
        raise ProgressError(f"{LOG_ENV}={value!r}: valid values are 'info' (default) and 'debug'")
    return value == "debug"


def every_s(env: dict[str, str] | None = None) -> float:
    """Seconds between two plain progress lines when the output is not a terminal."""
    raw = (os.environ if env is None else env).get(EVERY_ENV, "")
    if not raw.strip():
        return DEFAULT_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ProgressError(f"{EVERY_ENV}={raw!r}: expected a number of seconds > 0")
    return value


def log_name(command: str, argv: Sequence[str]) -> str:
    """The log file's name for ``segpipe COMMAND ARGV``: the command, and the architecture
    (``--arch``) or the output folder's name (``--out``) when there is one, e.g. ``train-unet``,
    ``evaluate-unet``, ``promote``."""
    args = list(argv)
    name = None
    for flag in ("--arch", "--out"):
        for i, a in enumerate(args):
            value = args[i + 1] if a == flag and i + 1 < len(args) else a.split("=", 1)[1] if a.startswith(flag + "=") else None
            if value:
                name = name or Path(value.rstrip("/")).name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{command}-{name}" if name and name != command else command)
    return slug.strip("._") or "segpipe"


def fmt_duration(seconds: float) -> str:
    """``45 s``, ``2:05``, ``1:02:03``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# --------------------------------------------------------------------------------------
# What the line says (pure)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """What a stage reported so far. A count stage sets ``done`` (of ``total``); a train stage
    the rest. ``used_s`` is the train loop's own clock (seconds of its budget), ``received`` the
    stage's clock when it was reported (the line's clock runs on between reports)."""

    done: int = 0
    total: int | None = None
    unit: str = "images"
    phase: str | None = None
    step: int | None = None
    total_steps: int | None = None
    images_per_s: float | None = None
    used_s: float | None = None
    budget_s: float | None = None
    epochs: int | None = None
    total_epochs: int | None = None
    val: float | None = None
    received: float = 0.0
    first_done_at: float | None = None  # the stage's clock at the first count > 0 (for the rate)
    first_done: int = 0


def time_left(state: State, now: float) -> float | None:
    """Estimated seconds left, ``None`` when unknown.

    A train stage ends at whichever limit comes first, its budget or its steps (``segpipe.stages.train.Schedule``):
    progress is the larger of the two shares, and what is left takes as long per share as what
    was done. A count stage extrapolates its rate since the first item counted (start-up, such as
    loading a model, is not a rate)."""
    if state.used_s is not None:
        used = used_s(state, now)
        shares = []
        if state.budget_s:
            shares.append(used / state.budget_s)
        if state.total_steps and state.step is not None:
            shares.append(state.step / state.total_steps)
        if state.total_epochs and state.epochs is not None and not state.budget_s and not state.total_steps:
            shares.append(state.epochs / state.total_epochs)
        p = min(max(shares, default=0.0), 1.0)
        return used * (1 - p) / p if p > 0 else None
    if state.total is None or state.first_done_at is None or state.done <= state.first_done:
        return None
    rate = (state.done - state.first_done) / max(now - state.first_done_at, 1e-9)
    return max(state.total - state.done, 0) / rate


def used_s(state: State, now: float) -> float:
    """The train loop's seconds now: as reported, plus the time since (capped by the budget)."""
    used = (state.used_s or 0.0) + max(now - state.received, 0.0)
    return min(used, state.budget_s) if state.budget_s else used


def render(stage: str, state: State, now: float) -> str:
    """The progress line of ``stage`` at ``now`` (seconds since the stage started)."""
    parts: list[str] = []
    if state.used_s is not None or state.step is not None:
        # a budget is the limit that ends a budgeted run: the step and epoch totals only without one
        limit = not state.budget_s
        if state.step is not None:
            parts.append(f"step {state.step}" + (f"/{state.total_steps}" if state.total_steps and limit else ""))
        if state.images_per_s is not None:
            parts.append(f"{state.images_per_s:.1f} img/s")
        if state.budget_s:
            parts.append(f"{used_s(state, now):.0f}/{state.budget_s:.0f} s of budget")
        if state.epochs is not None:
            parts.append(f"epoch {state.epochs}" + (f"/{state.total_epochs}" if state.total_epochs and limit else ""))
    elif state.total is not None:
        parts.append(f"{state.done}/{state.total} {state.unit}")
        if state.first_done_at is not None and state.done > state.first_done and now > state.first_done_at:
            parts.append(f"{(state.done - state.first_done) / (now - state.first_done_at):.1f} {state.unit}/s")
    elif state.done:
        parts.append(f"{state.done} {state.unit}")
    if state.phase and not (state.step or state.done):
        parts.append(state.phase)
    parts.append(f"{fmt_duration(now)} so far")
    left = time_left(state, now)
    if left is not None:
        parts.append(f"~{fmt_duration(left)} left")
    if state.val is not None:
        parts.append(f"val {state.val:.3f}")
    return f"{stage}: " + ", ".join(parts)


# --------------------------------------------------------------------------------------
# Who wrote it (pure)
# --------------------------------------------------------------------------------------

OURS = tuple(str(Path(__file__).resolve().parents[1] / p) + os.sep for p in ("segpipe", "pipelines"))
STDLIB = tuple({str(Path(sysconfig.get_paths()[k]).resolve()) + os.sep for k in ("stdlib", "platstdlib")})
PACKAGES = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)
# Writers that only pass text on: tqdm, this module, and the replacements of ``print`` that Ray
# installs (its distributed tqdm's, and Ray Train's in workers).
PLUMBING = (os.sep + "tqdm" + os.sep, str(Path(__file__).resolve()),
            os.path.join(os.sep + "ray", "experimental", "tqdm_ray.py"),
            os.path.join(os.sep + "ray", "train", "v2", "_internal", "logging", "patch_print.py"))


def origin(filenames: Sequence[str]) -> str:
    """``"ours"`` or ``"library"``: who wrote a message, from the files of the call stack of the
    write (innermost first). The standard library, tqdm and this module are plumbing: the first
    other frame decides. An installed package is a library; segpipe, pipelines and any other file
    (a script, a test) are ours. No deciding frame (the interpreter printing an uncaught
    exception, a thread of the standard library) is ours: an error is never hidden."""
    for name in filenames:
        if name.startswith("<"):
            continue  # <frozen importlib._bootstrap>, <string>
        path = os.path.abspath(name)
        if any(p in path for p in PLUMBING):
            continue
        if path.startswith(OURS):
            return "ours"
        if any(p in path for p in PACKAGES):
            return "library"
        if path.startswith(STDLIB):
            continue
        return "ours"
    return "ours"


# Ray's driver-side function that prints what its workers and actors wrote (log_to_driver).
RAY_FORWARDER = (os.path.join(os.sep + "ray", "_private", "worker.py"), "print_worker_logs")


def forwarded(frames: Sequence[tuple[str, str]]) -> bool:
    """Whether a write is Ray printing what a worker wrote (``frames``: file and function of each
    frame of the call stack)."""
    return any(f.endswith(RAY_FORWARDER[0]) and fn == RAY_FORWARDER[1] for f, fn in frames)


def _stack() -> list[tuple[str, str]]:
    frame: Any = sys._getframe(1)
    out = []
    while frame is not None:
        out.append((frame.f_code.co_filename, frame.f_code.co_name))
        frame = frame.f_back
    return out


# --------------------------------------------------------------------------------------
# The console: real streams, the live line, the log
# --------------------------------------------------------------------------------------


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Console:
    """The process's real output streams, the one live progress line (on ``err``), and the log
    file that library output goes to. Writes are serialised; a write to a terminal first clears
    the live line, which is redrawn once the line written is complete. Nothing is put in the
    middle of a line being written (``print`` writes the text and its newline apart): the live
    line and lines of the console's own wait for its end."""

    def __init__(self, out: TextIO, err: TextIO, log_path: Path | None = None) -> None:
        self.out, self.err, self.log_path = out, err, log_path
        self.lock = threading.RLock()
        self.live = ""
        self.live_shown = False
        self.partial = {"out": False, "err": False}  # a stream's last write did not end its line
        self.pending: list[tuple[str, str]] = []  # (stream, line) waiting for a partial line to end
        self._log: TextIO | None = None
        self._log_failed = False

    def _role(self, stream: TextIO) -> str | None:
        return "err" if stream is self.err else "out" if stream is self.out else None

    def _mid_line(self) -> bool:
        return any(self.partial.values())

    @property
    def tty(self) -> bool:
        return _isatty(self.err)

    def _clear(self) -> None:
        if self.live_shown:
            self.err.write("\r\x1b[K")
            self.live_shown = False

    def _draw(self) -> None:
        if self.live and self.tty and not self._mid_line():
            width = shutil.get_terminal_size((100, 24)).columns
            from tqdm.utils import disp_trim

            self.err.write("\r" + disp_trim(self.live, max(width - 1, 10)) + "\x1b[K")
            self.err.flush()
            self.live_shown = True

    def write(self, stream: TextIO, text: str) -> None:
        """Write ``text`` to ``stream`` (``out`` or ``err``) around the live line."""
        with self.lock:
            if self.live_shown and _isatty(stream):
                self._clear()
                self.err.flush()
            stream.write(text)
            stream.flush()
            role = self._role(stream)
            if role is not None:
                self.partial[role] = not text.endswith("\n")
            if self._mid_line():
                return
            pending, self.pending = self.pending, []
            for role, line in pending:
                getattr(self, role).write(line)
                getattr(self, role).flush()
            if self.live and not self.live_shown:
                self._draw()

    def show(self, line: str) -> None:
        """Draw ``line`` as the live line (a terminal only)."""
        with self.lock:
            self.live = line
            self._draw()

    def line(self, text: str, stream: TextIO | None = None) -> None:
        """Print ``text`` as a line of its own (on ``err`` unless ``stream`` is given), above the
        live line; after the line being written, if one is."""
        target = self.err if stream is None else stream
        with self.lock:
            if self._mid_line():
                self.pending.append((self._role(target) or "err", text + "\n"))
            else:
                self.write(target, text + "\n")

    def end_live(self) -> None:
        """Remove the live line (its stage ended; its result line follows)."""
        with self.lock:
            self._clear()
            self.live = ""
            self.err.flush()

    def log(self, text: str) -> None:
        """Append library output to the log file, opened (and its path printed) on first use.
        Without a log path, or when the file cannot be written, the text goes to the console."""
        with self.lock:
            if self._log is None and self.log_path is not None and not self._log_failed:
                try:
                    self.log_path.parent.mkdir(parents=True, exist_ok=True)
                    self._log = open(self.log_path, "w", encoding="utf-8", errors="replace")
                    self.line(f"(messages of Ray and other libraries: {self.log_path})")
                except OSError:
                    self._log_failed = True
            if self._log is None:
                self.write(self.err, text)
                return
            self._log.write(text)
            self._log.flush()

    def close(self) -> None:
        with self.lock:
            self.end_live()
            if self._log is not None:
                self._log.close()
                self._log = None


class Router(io.TextIOBase):
    """Stands in for ``sys.stdout`` or ``sys.stderr`` during a session: each write goes to the
    console stream or to the log, by who wrote it (:func:`origin`).

    What Ray forwards from its workers is split by the stream the worker wrote to: a worker's
    stdout holds what segpipe's code prints there (a train worker's resume notice), its stderr
    what Ray, Ray Data, Ray Train and warnings log (``forward_stdout``: this router stands for
    stdout, and keeps the former on the console)."""

    def __init__(self, console: Console, role: str) -> None:
        super().__init__()
        if role not in ("out", "err"):
            raise ValueError(f"Router role {role!r}: valid: out, err")
        self.console, self.role = console, role
        self.forward_stdout = role == "out"

    @property
    def stream(self) -> TextIO:
        """The console stream this router stands for (looked up at each write: see :func:`native_stderr_to_log`)."""
        return getattr(self.console, self.role)

    def write(self, text: str) -> int:
        if not text:
            return 0
        frames = _stack()
        if origin([f for f, _ in frames]) == "library" and not (self.forward_stdout and forwarded(frames)):
            self.console.log(text)
        else:
            self.console.write(self.stream, text)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.stream.flush()

    def isatty(self) -> bool:
        return _isatty(self.stream)

    def fileno(self) -> int:
        return self.stream.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.stream, "errors", None)


_active: Console | None = None


def console() -> Console:
    """The session's console, or one over the current ``sys.stdout`` / ``sys.stderr``."""
    return _active if _active is not None else Console(sys.stdout, sys.stderr)


def detail(text: str) -> None:
    """A line worth keeping but not worth the console (an epoch's numbers): the session's log file,
    or stderr outside a session (a Ray worker: Ray forwards it to the driver, whose session logs it)
    and with ``SEGPIPE_LOG=debug``."""
    if _active is not None and _active.log_path is not None:
        _active.log(text.rstrip("\n") + "\n")
    else:
        print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def session(command: str, argv: Sequence[str] = (), log_dir: Path | str | None = None) -> Iterator[Console]:
    """Route library output to ``LOG_DIR/<log_name>.log`` while the command runs (see the module
    docstring); a no-op with ``SEGPIPE_LOG=debug``. Nested sessions use the outer one."""
    global _active
    if _active is not None:
        yield _active
        return
    out, err = sys.stdout, sys.stderr
    if verbose():
        yield Console(out, err)
        return
    folder = Path(log_dir if log_dir is not None else os.environ.get(LOG_DIR_ENV) or "logs")
    con = Console(out, err, folder / f"{log_name(command, argv)}.log")
    _active = con
    sys.stdout, sys.stderr = Router(con, "out"), Router(con, "err")
    try:
        yield con
    finally:
        sys.stdout, sys.stderr = out, err
        _active = None
        con.close()


@contextlib.contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """While the block runs, what native code in this process writes to file descriptor 2 (Ray's
    C++ core worker, in a driver) goes to the session's log; the console keeps writing to the real
    stderr through a duplicate of it. A no-op outside a session, or when stderr is not fd 2.
    ``segpipe.cluster.connect`` runs Ray inside it."""
    con = _active
    try:
        fd = con.err.fileno() if con is not None and con.log_path is not None else -1
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        fd = -1
    if fd != 2:
        yield
        return
    original = con.err
    original.flush()
    read_end, write_end = os.pipe()
    saved = os.fdopen(os.dup(2), "w", encoding=getattr(original, "encoding", None) or "utf-8", errors="replace",
                      buffering=1)
    with con.lock:
        con.err = saved
        os.dup2(write_end, 2)
    os.close(write_end)

    def drain() -> None:
        while chunk := os.read(read_end, 65536):
            con.log(chunk.decode("utf-8", errors="replace"))
        os.close(read_end)

    thread = threading.Thread(target=drain, name="native stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with con.lock:
            saved.flush()
            os.dup2(saved.fileno(), 2)  # the pipe's last write end in this process closes: the drain ends
            con.err = original
            saved.close()
        thread.join(timeout=2)  # a child process still holding the pipe keeps it open: do not wait for it


# --------------------------------------------------------------------------------------
# The progress line
# --------------------------------------------------------------------------------------


TRAIN_FIELDS = ("step", "total_steps", "images_per_s", "used_s", "budget_s", "epochs", "total_epochs", "val", "phase")


@dataclass
class Progress:
    """One live progress line for ``stage`` (e.g. ``"train unet"``, ``"evaluate unet"``).

    ``total``: items to do (a count stage; ``unit`` names them). Use as a context manager: the
    line starts on entry and is removed on exit, before the stage prints its result line.
    ``enabled=False`` shows nothing (``--no-progress``). ``every_s``: seconds between plain lines
    when not on a terminal (default: ``SEGPIPE_PROGRESS_EVERY``, else 10).
    """

    stage: str
    total: int | None = None
    unit: str = "images"
    enabled: bool = True
    every_s: float | None = None
    phase: str | None = None
    out: Console | None = None
    clock: Any = time.monotonic
    state: State = field(init=False)
    _started: float = field(init=False, default=0.0)
    _last_plain: str = field(init=False, default="")
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _thread: threading.Thread | None = field(init=False, default=None)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.state = State(total=self.total, unit=self.unit, phase=self.phase)
        if self.every_s is None:
            self.every_s = every_s()

    # -- the stage's side

    def __enter__(self) -> Progress:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._started = self.clock()
        if not self.enabled:
            return
        self.out = self.out or console()
        self._thread = threading.Thread(target=self._tick, name=f"progress {self.stage}", daemon=True)
        self._thread.start()

    def now(self) -> float:
        """Seconds since the stage started."""
        return self.clock() - self._started

    def advance(self, n: int = 1) -> None:
        """``n`` more items done (a count stage)."""
        with self._lock:
            self._count(self.state.done + int(n))

    def update(self, done: int | None = None, *, step: int | None = None, total_steps: int | None = None,
               images_per_s: float | None = None, used_s: float | None = None, budget_s: float | None = None,
               epochs: int | None = None, total_epochs: int | None = None, val: float | None = None,
               phase: str | None = None) -> None:
        """Report where the stage is; fields left out keep their last value. A train stage reports
        ``step`` (optimizer steps so far), ``images_per_s``, ``used_s`` of ``budget_s`` (its
        schedule's clock; budget 0 = none), ``epochs`` of ``total_epochs``, ``total_steps`` (the
        step limit, 0 = none) and ``val`` (the last validation score); ``phase`` says what it
        waits for before its first step."""
        given = {k: v for k, v in {"step": step, "total_steps": total_steps, "images_per_s": images_per_s,
                                   "used_s": used_s, "budget_s": budget_s, "epochs": epochs,
                                   "total_epochs": total_epochs, "val": val, "phase": phase}.items() if v is not None}
        with self._lock:
            if given:
                self.state = replace(self.state, received=self.now(), **given)
            if done is not None:
                self._count(int(done))

    def _count(self, done: int) -> None:
        first = self.state.first_done_at
        if first is None and done > 0:
            # the rate counts from the first item done; what was done by then is not part of it
            self.state = replace(self.state, done=done, first_done_at=self.now(), first_done=done)
        else:
            self.state = replace(self.state, done=done)

    def note(self, text: str) -> None:
        """Print ``text`` as a line of its own on stdout (a notice of the stage, such as a resumed
        run), above the live line."""
        out = self.out or console()
        out.line(text, out.out)

    def line(self) -> str:
        with self._lock:
            return render(self.stage, self.state, self.now())

    def close(self) -> None:
        """Stop the line and remove it (a terminal) before the stage's result line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.out is not None and self.enabled:
            self.out.end_live()

    def _tick(self) -> None:
        assert self.out is not None and self.every_s is not None
        live = self.out.tty
        next_plain = self.every_s
        while not self._stop.wait(LIVE_REFRESH_S if live else min(LIVE_REFRESH_S, self.every_s)):
            text = self.line()
            if live:
                self.out.show(text)
            elif self.now() >= next_plain:
                next_plain = self.now() + self.every_s
                if text != self._last_plain:
                    self._last_plain = text
                    self.out.line(text)

    # -- Ray workers' side

    @contextlib.contextmanager
    def relayed(self) -> Iterator[ProgressRelay]:
        """A :class:`ProgressRelay` for code running in Ray workers (needs a connected Ray; see
        ``segpipe.cluster.connect``): their updates and notes reach this line. Polled while the
        block runs; the relay's actor is stopped on exit."""
        import ray

        box = ray.remote(num_cpus=0)(RelayBox).remote()
        stop = threading.Event()

        def poll() -> None:
            while True:
                stopping = stop.wait(RELAY_EVERY_S)
                try:
                    updates, notes = ray.get(box.take.remote(), timeout=30)
                except Exception:  # Ray shut down or the actor died: the line just stops moving
                    return
                for text in notes:
                    self.note(text)
                if updates:
                    self.update(**updates)
                if stopping:
                    return

        thread = threading.Thread(target=poll, name=f"progress relay {self.stage}", daemon=True)
        thread.start()
        try:
            yield ProgressRelay(box)
        finally:
            stop.set()
            thread.join(timeout=35)
            with contextlib.suppress(Exception):
                ray.kill(box)


class RelayBox:
    """The Ray actor between workers and the driver: the latest fields, and notes in order."""

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}
        self.notes: list[str] = []

    def put(self, fields: dict[str, Any], note: str | None = None) -> None:
        self.fields.update(fields)
        if note:
            self.notes.append(note)

    def take(self) -> tuple[dict[str, Any], list[str]]:
        fields, notes = self.fields, self.notes
        self.fields, self.notes = {}, []
        return fields, notes


class ProgressRelay:
    """What a Ray worker holds (picklable; pass it in the train loop's config): ``update`` takes
    the same train fields as :meth:`Progress.update` and sends at most one update per
    ``RELAY_EVERY_S`` (a new ``val`` or ``epochs`` is always sent); ``note`` prints a line on the
    driver's console. Neither blocks the worker."""

    def __init__(self, box: Any, every_s: float = RELAY_EVERY_S) -> None:
        self.box, self.every_s = box, every_s
        self._sent_at = -math.inf
        self._sent: dict[str, Any] = {}
        self._pending: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"box": self.box, "every_s": self.every_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["box"], state["every_s"])

    def update(self, **fields: Any) -> None:
        bad = sorted(set(fields) - set(TRAIN_FIELDS))
        if bad:
            raise TypeError(f"ProgressRelay.update: unknown field(s) {bad}; valid: {', '.join(TRAIN_FIELDS)}")
        self._pending.update({k: v for k, v in fields.items() if v is not None})
        now = time.monotonic()
        news = any(k in self._pending and self._pending[k] != self._sent.get(k) for k in ("val", "epochs"))
        if news or now - self._sent_at >= self.every_s:
            self.box.put.remote(self._pending)
            self._sent.update(self._pending)
            self._pending, self._sent_at = {}, now

    def note(self, text: str) -> None:
        self.box.put.remote({}, text)


__all__ = ["Console", "DEFAULT_EVERY_S", "EVERY_ENV", "LOG_DIR_ENV", "LOG_ENV", "Progress", "ProgressError",
           "ProgressRelay", "RelayBox", "Router", "State", "TRAIN_FIELDS", "console", "every_s", "fmt_duration",
           "forwarded", "log_name", "native_stderr_to_log", "origin", "render", "session", "time_left", "used_s", "verbose"]
