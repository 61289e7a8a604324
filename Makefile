# spinedxa: the two set-up commands are `make repro` and `make test`. Both work on a fresh clone on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
# Offline by construction: no telemetry, no weight downloads, no hub look-ups.
export DVC_NO_ANALYTICS := 1
export GIT_PYTHON_REFRESH := quiet
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
PYTEST_ARGS ?=
# make test runs test files on this many workers (pytest-xdist); 0 = in this process, one after another.
TEST_WORKERS ?= 2

.PHONY: install repro repro-timed repro-budget test test-all cluster-test bench bench-noop snakemake dvc-commit plots plots-diff vendor mlflow-server clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip wheel setuptools

# Installs everything the project needs (torch/torchvision come from this machine's disk: see README).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev,cluster]'
	touch $@

install: $(VENV)/.installed

repro: install
	$(BIN)/dvc repro

# The same, timed stage by stage (reports/bench/repro.json: the pipeline budget, with the CPU it ran on).
repro-timed: install
	$(BIN)/python bench/repro_timing.py

# Both budget runs from nothing, in fresh clones of HEAD: this CPU's own fast path, then an emulated AVX2-only CPU
# (oneDNN/ATen limited to AVX2: the fp32 path). Per stage, CPU and flags in reports/bench/repro.json.
repro-budget: install
	$(BIN)/python bench/repro_timing.py --clone $(CURDIR)/.bench/native
	$(BIN)/python bench/repro_timing.py --clone $(CURDIR)/.bench/avx2 --avx2

test: install
	$(BIN)/python -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Scale-out for real (docs/SCALE_OUT.md): the tiny DAG through a one-node Slurm cluster (Debian's packages, installed
# when missing; needs root) logging to one MLflow server, checked against `dvc repro`, and a DVC remote round trip
# through an S3-compatible server; every daemon on loopback, stopped by pid (workflow/cluster/down.sh) in a trap.
cluster-test: install
	PYTHON=$(BIN)/python workflow/cluster/cluster-test.sh $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/burnedin.py
	$(BIN)/python bench/train_throughput.py

# No-op `dvc repro` here against a trivial DVC project of as many stages (reports/bench/noop.json), then the same on a
# copy without code deps, and without code deps and params (reports/bench/noop_decompose.json). Needs a fully
# reproduced tree (`make repro` first); both refuse otherwise.
bench-noop: install
	$(BIN)/python bench/noop.py
	$(BIN)/python bench/noop_decompose.py

# Run the DAG with Snakemake (parallel), then record its outputs in dvc.lock.
CORES ?= 2
snakemake: install
	$(BIN)/snakemake --snakefile workflow/Snakefile --profile workflow/profiles/local --cores $(CORES)
	$(MAKE) dvc-commit

dvc-commit: install
	$(BIN)/dvc commit --force

# Plots as HTML that needs no network (Vega inlined: workflow/plots/offline.html), in dvc_plots/index.html.
PLOTS_TEMPLATE := workflow/plots/offline.html
REV ?= HEAD
plots: install
	$(BIN)/dvc plots show --html-template $(PLOTS_TEMPLATE)

plots-diff: install
	$(BIN)/dvc plots diff $(REV) --html-template $(PLOTS_TEMPLATE)

# Re-vendor the web assets of the Data Docs and the plots template from the npm registry (pinned, sha512-checked).
vendor: install
	$(BIN)/python workflow/vendor_web_assets.py

MLFLOW_PORT ?= 5000
mlflow-server: install
	$(BIN)/mlflow server --backend-store-uri sqlite:///mlflow-server.db \
	  --artifacts-destination ./mlartifacts --host 127.0.0.1 --port $(MLFLOW_PORT)

clean-venv:
	rm -rf $(VENV)
