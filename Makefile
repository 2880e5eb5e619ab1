# Two commands for a fresh machine (Python 3.11, git, make): `make run` and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Every installed package at the version `make test` last passed with (make lock rewrites it): a
# release on PyPI cannot change what a fresh clone installs, its tests or its numbers.
PIP     := $(BIN)/pip install -q -c constraints.txt

.PHONY: setup setup-cluster run test lint ui bench study lock clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (or: make PY=python3)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(PIP) --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[test]'
	@touch $(STAMP)

$(VENV)/.cluster: $(STAMP)
	$(PIP) -e '.[test,cluster]'
	@touch $(VENV)/.cluster

setup: $(STAMP)  ## create .venv and install lfmodel with test extras

setup-cluster: $(VENV)/.cluster  ## also the cluster extra (ray, PostgreSQL): make test, sweeps

run: setup  ## run the default pipeline (dvc repro) and say where results are
	@test -d .git || { git init -q && git add -A && git -c user.name=lfmodel -c user.email=lfmodel@localhost commit -qm "initial snapshot"; }
	@test -d .dvc || { $(BIN)/dvc init -q && $(BIN)/dvc config core.autostage true; }
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show
	@echo
	@echo "Results: reports/metrics.json, reports/figures/*.png, reports/traces/, reports/train/"
	@echo "MLflow store: sqlite:///$(CURDIR)/mlflow.db (artifacts in $(CURDIR)/mlartifacts); browse with: make ui"

test: setup-cluster  ## run the test suite
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest tests
	$(BIN)/ruff check lfmodel stages tests bench

lint: setup
	$(BIN)/ruff check lfmodel stages tests bench

ui: setup  ## MLflow UI on 127.0.0.1:5000 against the store the stages use
	$(BIN)/lfmodel ui --port 5000

bench: setup-cluster  ## benchmarks: one JSON line each (sweep_scaling needs Ray and PostgreSQL)
	@for b in bench/[!_]*.py; do PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python $$b || exit 1; done

study: setup  ## the study grid as a local lfmodel sweep, then reports/study/
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/lfmodel study

lock:  ## re-resolve every dependency at its newest into constraints.txt; then make test, and commit both
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q -e '.[test,cluster]'
	.venv-lock/bin/pip freeze --all --exclude-editable > .venv-lock/freeze.txt
	{ echo "# pip constraints: what make installs (make lock wrote this; local labels such as +cpu dropped)"; \
	  sed -E 's/\+[^+]*$$//' .venv-lock/freeze.txt; } > constraints.txt
	rm -rf .venv-lock
	@echo "constraints.txt: $$(grep -vc '^#' constraints.txt) packages; now: make test"

clean:
	rm -rf data/prepared data/model data/checkpoints reports/train reports/traces reports/figures
