# The two commands: `make pipeline` and `make test`. Both create .venv if missing and
# install the project into it; a second run re-installs nothing while pyproject.toml is unchanged.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN    := PYTHONDONTWRITEBYTECODE= PATH="$(CURDIR)/$(BIN):$$PATH"
STAMP  := $(VENV)/.segpipe-installed

.PHONY: pipeline test test-fast install lint bench bench-learning clean-data

# One local Ray serves every train stage of the DAG (segpipe/cluster.py), stopped afterwards.
# The outcome (champion, baselines, what was promoted or refused, where the report is) is the
# last thing shown: the report stage writes it (SEGPIPE_ENDING=later: without printing it), and it
# is printed after DVC's own closing lines, also when nothing had to be rerun.
pipeline: install
	$(RUN) SEGPIPE_ENDING=later $(BIN)/segpipe with-ray $(BIN)/dvc repro
	@cat reports/ending.txt

# The full suite (what CI runs), with the 25 slowest tests listed at the end. It runs in
# PYTEST_WORKERS processes (pytest-xdist), a whole test module to one process (loadfile: a module's
# fixtures, a Ray or a trained checkpoint, are built once); the longest modules are handed out first
# (tests/conftest.py; --no-loadscope-reorder keeps that order, where xdist would sort by test
# count). Two processes on two cores: on one host of this kind three finished sooner (10:40
# against 11:47), on another later (21:59 against 18:15): three Rays training at once on two cores
# collapse (three copies of one Ray Train test took 1.08x their serial time, two copies 0.78x).
# With two, the cores are busy: 97% of 5-s samples over a whole run (2026-12-03).
# PYTEST_WORKERS=0 runs it in this one process.
PYTEST_WORKERS ?= 2
PYTEST := $(RUN) $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: install
	$(PYTEST) --durations=25

# For local work: the unit tests only (no test marked slow: no pipeline, no cluster, no server),
# in the same PYTEST_WORKERS processes as make test.
test-fast: install
	$(PYTEST) -m "not slow" --durations=10

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch/torchvision resolve to the pinned 2.14.1/0.29.1 wheels on local disk (see pyproject.toml).
# --no-compile: pip's up-front byte-compile of all 19,000 modules costs about two minutes here.
# Python compiles what is imported on first use instead, and caches it: RUN clears
# PYTHONDONTWRITEBYTECODE (often set on CI machines), without which every process of the
# pipeline (each stage, each Ray worker) would compile torch, Ray and pyarrow from source again.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev,export]"
	@touch $(STAMP)

lint: install
	$(BIN)/ruff check segpipe pipelines tests benchmarks

bench: install
	$(BIN)/python benchmarks/convert.py
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/predict_startup.py
	$(BIN)/python benchmarks/registry_startup.py

# The seven architectures at an equal budget through the real train stage, on one local Ray it
# starts itself (about an hour here at the default 4 minutes x 2 seeds).
bench-learning: install
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(RUN) $(BIN)/python benchmarks/learning.py

clean-data:
	rm -rf data reports models/checkpoints models/eval
