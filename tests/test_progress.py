"""segpipe.progress: the live line tells the time, library output goes to the command's log, our
own output and errors stay on the console, and a real train stage's output has no line twice."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from segpipe import progress
from segpipe.progress import Console, Progress, State, fmt_duration, log_name, origin, render, session

SITE = os.path.join(os.sep + "venv", "lib", "python3.11", "site-packages")


def wait_for(condition, timeout: float = 30.0, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(every)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


# --------------------------------------------------------------------------------------
# The line (pure)
# --------------------------------------------------------------------------------------


def test_a_train_line_tells_step_rate_budget_time_left_and_validation():
    state = State(step=120, images_per_s=24.8, used_s=88.0, budget_s=140.0, epochs=40, total_epochs=100,
                  total_steps=3000, val=0.0698, received=10.0)
    assert render("train unet", state, 10.0) == ("train unet: step 120, 24.8 img/s, 88/140 s of budget, epoch 40, "
                                                 "10 s so far, ~52 s left, val 0.070")
    # between two reports the train clock runs on (capped by the budget)
    assert "90/140 s of budget" in render("train unet", state, 12.0) and "~50 s left" in render("train unet", state, 12.0)
    assert "140/140 s of budget" in render("train unet", state, 500.0)
    # without a budget the steps and epochs of the total bound the run
    epochs_only = State(step=30, total_steps=300, used_s=60.0, budget_s=0.0, epochs=3, total_epochs=30, received=0.0)
    assert render("train unet", epochs_only, 0.0) == "train unet: step 30/300, epoch 3/30, 0 s so far, ~9:00 left"


def test_before_its_first_step_a_stage_says_what_it_waits_for():
    assert render("train unet", State(phase="starting Ray workers and data"), 75.0) == \
        "train unet: starting Ray workers and data, 1:15 so far"


def test_a_count_line_shows_done_of_total_and_a_rate_from_the_first_item():
    now = [0.0]
    bar = Progress("evaluate unet", total=96, enabled=False, clock=lambda: now[0])
    bar.start()
    now[0] = 5.0  # model loading: no rate yet
    bar.advance(8)
    assert bar.line() == "evaluate unet: 8/96 images, 5 s so far"
    now[0] = 9.0
    bar.advance(16)
    assert bar.line() == "evaluate unet: 24/96 images, 4.0 images/s, 9 s so far, ~18 s left"
    bar.close()


def test_durations_log_names_and_settings():
    assert [fmt_duration(s) for s in (0, 44.6, 125, 3723)] == ["0 s", "45 s", "2:05", "1:02:03"]
    assert log_name("train", ["--arch", "unet", "--shards", "data/shards", "--out", "models/train/unet"]) == "train-unet"
    assert log_name("evaluate", ["--model", "m/checkpoint", "--out=models/eval/fcn8s/"]) == "evaluate-fcn8s"
    assert log_name("promote", ["--candidates", "a", "b"]) == "promote"
    assert log_name("baselines", ["--out", "models/baselines"]) == "baselines"
    assert progress.every_s({}) == 10.0 and progress.every_s({progress.EVERY_ENV: "2.5"}) == 2.5
    with pytest.raises(progress.ProgressError, match="SEGPIPE_PROGRESS_EVERY='0': expected a number of seconds > 0"):
        progress.every_s({progress.EVERY_ENV: "0"})
    assert progress.verbose({progress.LOG_ENV: "DEBUG"}) and not progress.verbose({})
    with pytest.raises(progress.ProgressError, match="SEGPIPE_LOG='loud'"):
        progress.verbose({progress.LOG_ENV: "loud"})


def test_who_wrote_a_message_is_the_first_frame_outside_the_plumbing():
    ours = str(Path(progress.__file__).with_name("cli.py"))
    stdlib = os.path.join(os.path.dirname(os.__file__), "logging", "__init__.py")
    ray = os.path.join(SITE, "ray", "data", "_internal", "logging.py")
    tqdm = os.path.join(SITE, "tqdm", "std.py")
    assert origin([progress.__file__, stdlib, ray, ours]) == "library"  # a Ray logger, called from our code
    assert origin([progress.__file__, tqdm, ours]) == "ours"  # our progress bar
    assert origin([stdlib, "<frozen importlib._bootstrap>", ours]) == "ours"
    assert origin([progress.__file__, stdlib]) == "ours"  # the interpreter's own: an uncaught exception
    assert origin(["/home/me/scripts/check.py", ray]) == "ours"  # a script of the user's
    worker = os.path.join(SITE, "ray", "_private", "worker.py")
    assert progress.forwarded([(progress.__file__, "write"), (worker, "print_worker_logs")])
    assert not progress.forwarded([(worker, "print_to_stdstream")])


# --------------------------------------------------------------------------------------
# The console and the session
# --------------------------------------------------------------------------------------


def test_on_a_terminal_the_line_is_redrawn_in_place_and_cleared_around_other_output():
    out, err = Tty(), Tty()
    con = Console(out, err)
    con.show("train unet: step 1")
    con.write(out, "a result\n")
    con.show("train unet: step 2")
    con.end_live()
    assert err.getvalue() == ("\rtrain unet: step 1\x1b[K" "\r\x1b[K" "\rtrain unet: step 1\x1b[K"
                              "\rtrain unet: step 2\x1b[K" "\r\x1b[K")
    assert out.getvalue() == "a result\n"


def test_off_a_terminal_a_plain_line_comes_every_n_seconds_and_never_twice():
    out, err = io.StringIO(), io.StringIO()
    bar = Progress("convert coco", total=10, every_s=0.2, out=Console(out, err))
    with bar:
        for _ in range(3):
            bar.advance()
            wait_for(lambda: err.getvalue().count("\n") >= 1)
        time.sleep(0.7)
    lines = err.getvalue().splitlines()
    assert lines and all(line.startswith("convert coco: ") and "/10 images" in line for line in lines)
    assert len(lines) == len(set(lines)) and out.getvalue() == ""


def _library_code(filename: str, source: str) -> dict:
    """Functions compiled as if they were a file of an installed package."""
    scope: dict = {"sys": sys, "warnings": warnings}
    exec(compile(source, filename, "exec"), scope)
    return scope


def test_a_session_sends_library_output_to_the_log_and_keeps_ours_and_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(progress.LOG_ENV, raising=False)
    lib = _library_code(os.path.join(SITE, "somelib", "core.py"), (
        "def chatter():\n"
        "    print('Starting execution of Dataset train_1')\n"
        "    sys.stderr.write('INFO streaming_executor.py -- finished\\n')\n"))
    worker = _library_code(os.path.join(SITE, "ray", "_private", "worker.py"), (
        "def print_worker_logs(line, is_err):\n"
        "    print(line, file=sys.stderr if is_err else sys.stdout)\n"))
    capsys.readouterr()
    with session("train", ["--arch", "unet"], log_dir=tmp_path / "logs"):
        print("[unet] best epoch 2 val score 0.361")
        lib["chatter"]()
        lib["chatter"]()
        worker["print_worker_logs"]("[unet] resumed from the checkpoint of epoch 1", False)
        worker["print_worker_logs"]("Moving model to device: cpu", True)
        print("segpipe train: error: data/shards/val/part-0.parquet: checksum does not match", file=sys.stderr)
    captured = capsys.readouterr()
    log = tmp_path / "logs" / "train-unet.log"
    assert captured.out == "[unet] best epoch 2 val score 0.361\n[unet] resumed from the checkpoint of epoch 1\n"
    assert captured.err == (f"(messages of Ray and other libraries: {log})\n"
                            "segpipe train: error: data/shards/val/part-0.parquet: checksum does not match\n")
    text = log.read_text()
    assert text.count("Starting execution of Dataset") == 2 and text.count("streaming_executor") == 2
    assert "Moving model to device" in text and "[unet]" not in text
    assert sys.stdout is not None and not isinstance(sys.stdout, progress.Router)  # restored


WARNS = """
import sys, warnings
sys.path.insert(0, sys.argv[1])
import somelib
from segpipe.progress import session
with session("evaluate", [], log_dir=sys.argv[2]):
    somelib.chatter()
    warnings.warn("our own warning")
"""


def test_a_dependency_s_deprecation_warning_goes_to_the_log_and_ours_to_the_console(tmp_path):
    site = tmp_path / "site-packages"
    (site / "somelib").mkdir(parents=True)
    (site / "somelib" / "__init__.py").write_text(
        "import warnings\n\ndef chatter():\n"
        "    warnings.warn('ExecutionOptions.exclude_resources is deprecated', DeprecationWarning, stacklevel=1)\n")
    env = {k: v for k, v in os.environ.items() if k != progress.LOG_ENV}
    done = subprocess.run([sys.executable, "-W", "always", "-c", WARNS, str(site), str(tmp_path / "logs")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    log = tmp_path / "logs" / "evaluate.log"
    assert "exclude_resources is deprecated" in log.read_text() and "exclude_resources" not in done.stderr
    assert done.stderr.startswith(f"(messages of Ray and other libraries: {log})\n") and "UserWarning: our own warning" \
        in done.stderr


NATIVE = """
import os, sys
from segpipe.progress import native_stderr_to_log, session
with session("evaluate", [], log_dir=sys.argv[1]):
    with native_stderr_to_log():
        os.write(2, b"[E core_worker.cc:2465] Actor with class name ...\\n")  # as Ray's C++ core writes
        print("evaluate unet: 3/11 images", file=sys.stderr)
    os.write(2, b"after the block: the console again\\n")
"""


def test_what_native_code_writes_to_stderr_while_ray_runs_goes_to_the_log(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != progress.LOG_ENV}
    done = subprocess.run([sys.executable, "-c", NATIVE, str(tmp_path / "logs")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    log = tmp_path / "logs" / "evaluate.log"
    assert log.read_text() == "[E core_worker.cc:2465] Actor with class name ...\n"
    # the log is written by a thread reading the pipe: its notice may come before or after our line
    assert sorted(done.stderr.splitlines()) == sorted([f"(messages of Ray and other libraries: {log})",
                                                       "evaluate unet: 3/11 images",
                                                       "after the block: the console again"])
    assert done.stderr.endswith("after the block: the console again\n")


def test_with_segpipe_log_debug_everything_reaches_the_console(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(progress.LOG_ENV, "debug")
    lib = _library_code(os.path.join(SITE, "somelib", "core.py"), "def chatter():\n    print('library says')\n")
    with session("train", [], log_dir=tmp_path / "logs"):
        lib["chatter"]()
    assert capsys.readouterr().out == "library says\n" and not (tmp_path / "logs").exists()


def test_the_segpipe_command_runs_in_a_session_and_v_shows_everything(monkeypatch):
    import types

    from segpipe import cli

    routed: list[bool] = []
    probe = types.ModuleType("segpipe._probe")
    probe.main = lambda argv: routed.append(isinstance(sys.stdout, progress.Router))
    monkeypatch.setitem(sys.modules, "segpipe._probe", probe)
    monkeypatch.setitem(cli.COMMANDS, "probe", ("segpipe._probe", "a test command"))
    monkeypatch.setenv(progress.LOG_ENV, "info")
    cli.main(["probe"])
    cli.main(["-v", "probe"])
    assert routed == [True, False] and os.environ[progress.LOG_ENV] == "debug"


# --------------------------------------------------------------------------------------
# Ray workers feed the driver's line
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_ray_worker_feeds_the_driver_line_through_the_relay(ray_session):
    ray = ray_session
    out, err = io.StringIO(), io.StringIO()
    bar = Progress("train unet", out=Console(out, err), every_s=60)

    @ray.remote(num_cpus=0)
    def worker(relay):
        for step in range(1, 4):
            relay.update(step=step, images_per_s=8.0, used_s=float(step), budget_s=10.0)
        relay.update(epochs=1, val=0.25)  # news is sent at once, whatever the rate limit
        relay.note("[unet] resumed from the checkpoint of epoch 1")
        return True

    with bar, bar.relayed() as relay:
        assert ray.get(worker.remote(relay), timeout=120)
        wait_for(lambda: bar.state.val == 0.25 and "resumed" in out.getvalue(), timeout=60)
    line = bar.line()
    assert line.startswith("train unet: step 3, 8.0 img/s, ") and "epoch 1" in line and line.endswith("val 0.250")
    assert out.getvalue() == "[unet] resumed from the checkpoint of epoch 1\n"
    with pytest.raises(TypeError, match="unknown field"):
        relay.update(steps=3)


# --------------------------------------------------------------------------------------
# Stages, as a person sees them
# --------------------------------------------------------------------------------------


def test_evaluate_counts_every_image_of_the_split(tiny_checkpoint, eval_shards):
    from segpipe.params import EvaluateParams
    from segpipe.scoring import score_checkpoint
    from segpipe.shards import open_shards

    shards = open_shards(eval_shards)
    counted: list[int] = []
    m = score_checkpoint(tiny_checkpoint("unet", shards=eval_shards, base_channels=4, depth=2), shards,
                         EvaluateParams(batch_size=1, num_overlays=0), on_images=counted.append)
    assert sum(counted) == m["images"] == shards.rows("val") and len(counted) >= 1


def test_convert_shows_images_done_of_the_total(tiny_raw, tmp_path, capsys, monkeypatch):
    from segpipe.formats.coco import read_collections
    from segpipe.params import ConvertParams
    from segpipe.stages import convert

    monkeypatch.setenv(progress.EVERY_ENV, "0.001")
    convert.run(ConvertParams(workers=1, val_fraction=0.25), read_collections(tiny_raw.parent), tmp_path / "s")
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("convert coco: ") and "/16 images" in line for line in lines)
    assert len(lines) == len(set(lines))


TRAIN_PARAMS = """train:
  epochs: 100
  budget_s: 8
  batch_size: 4
  image_size: 32
  threads: 1
  val_every: 1
  workers: 1          # a worker actor: Ray Train's own messages (worker group, device) must go to the log
  architectures: [unet]
  overrides: {}
  model: {unet: {base_channels: 4, depth: 2}}
"""


@pytest.mark.slow
def test_a_real_train_stage_prints_no_line_twice_and_a_progress_line_every_n_seconds(tiny_shards, tmp_path,
                                                                                      ray_session):
    """``segpipe train`` as a subprocess whose output is a pipe (not a terminal), with
    ``SEGPIPE_PROGRESS_EVERY=2``: the running stage shows a line at least every 2 s (plus slack
    for a loaded machine), no line comes twice, Ray's messages are in the log, not on the console.
    The stage joins the session's Ray, as a stage of ``make pipeline`` joins the one ``segpipe
    with-ray`` started (its worker actor's messages reach it through Ray's log streaming)."""
    every = 2.0
    params = tmp_path / "params.yaml"
    params.write_text(TRAIN_PARAMS)
    env = {k: v for k, v in os.environ.items() if k != progress.LOG_ENV}
    env["RAY_ADDRESS"] = ray_session.get_runtime_context().gcs_address
    env.update({progress.EVERY_ENV: str(every), progress.LOG_DIR_ENV: str(tmp_path / "logs")})
    cmd = [sys.executable, "-m", "segpipe", "train", "--arch", "unet", "--shards", str(tiny_shards),
           "--out", str(tmp_path / "unet"), "--params", str(params)]
    lines: list[tuple[float, str]] = []
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.monotonic() - started, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert proc.wait(timeout=600) == 0, "\n".join(t for _, t in lines)[-4000:]
    reader.join(timeout=30)
    text = [t for _, t in lines]
    assert len(text) == len(set(text)), f"a line printed twice:\n{chr(10).join(text)}"
    ticks = [at for at, t in lines if t.startswith("train unet: ")]
    assert ticks and ticks[0] < every + 30, text  # the first line: after imports and the Ray start
    assert max(b - a for a, b in zip(ticks, ticks[1:])) < every + 3, lines
    assert any(", step " in t or t.startswith("train unet: step") for t in text), text
    assert sum(t.startswith("[unet] best epoch") for t in text) == 1
    assert sum(t.startswith("(messages of Ray and other libraries: ") for t in text) == 1
    noise = ("Requesting resources", "Starting execution of Dataset", "RayDeprecationWarning", "Moving model to device")
    assert not [t for t in text if t.startswith(noise) or "RayDeprecationWarning" in t], text
    assert "Moving model to device" in (tmp_path / "logs" / "train-unet.log").read_text()
