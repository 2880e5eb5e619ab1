# Two commands for a fresh machine (Python 3.11, git, make): `make run` and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup setup-cluster run test lint ui bench study clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (or: make PY=python3)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

$(VENV)/.cluster: $(STAMP)
	$(BIN)/pip install -q -e '.[test,cluster]'
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

clean:
	rm -rf data/prepared data/model data/checkpoints reports/train reports/traces reports/figures
