# cnnlab: every target works from a fresh clone; it creates .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The torch build installed first; override on machines that need another one.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
EXP ?= pooling_ablation
MLFLOW_DB := $(CURDIR)/mlflow.db
MLFLOW_ARTIFACTS := $(CURDIR)/mlartifacts
UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000
# make server: the store behind it (postgresql://user:password@host/db for many writers).
SERVER_STORE ?= sqlite:///$(MLFLOW_DB)
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5001
NOTEBOOK_PORT ?= 8888
# Test processes (pytest-xdist): one per core; TEST_WORKERS=0 runs the tests in one process.
# A file's tests share one worker, so what a module sets up once (a trained run, the Slurm
# cluster) is set up once.
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

.DEFAULT_GOAL := help
.PHONY: help install train sweep eval report summary notebook test test-slow test-all lint format ui server bench bench-data bench-train bench-report gpu-wheels gpu-check clean

# Target names in colour on a terminal only: piped or logged, the help is plain text.
help: ## Show this help
	@if [ -t 1 ] && [ -z "$$NO_COLOR" ]; then on='\033[36m' off='\033[0m'; else on= off=; fi; \
	grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk -v on="$$on" -v off="$$off" 'BEGIN {FS = ":.*## "}; \
			{printf "  %s%-12s%s %s\n", on, $$1, off, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## Create .venv and install cnnlab with its dev extra

train: install ## Train the default CNN on MNIST (ARGS="model.dropout=0.3 ...")
	$(PY) -m cnnlab.train $(ARGS)

sweep: install ## Run an ablation grid as a Hydra multirun (EXP=pooling_ablation ARGS="seed=0,1")
	$(PY) -m cnnlab.train -m experiment=$(EXP) $(ARGS)

eval: install ## Test a trained run's best checkpoint again, on any dataset (ARGS="run=<run id>")
	$(PY) -m cnnlab.eval $(ARGS)

report: install ## Ablation report of the newest sweep: HTML, Markdown, plots (ARGS="--parent ID")
	$(PY) -m cnnlab.report $(ARGS)

summary: install ## Print the model's layer table, sizes, parameters, FLOPs (ARGS="model=cnn")
	$(PY) -m cnnlab.summary $(ARGS)

# As root (a container), Jupyter wants --allow-root; it is still bound to 127.0.0.1 with a token.
notebook: install ## JupyterLab on notebooks/ at 127.0.0.1:8888 (NOTEBOOK_PORT=8889)
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --port $(NOTEBOOK_PORT) --no-browser \
		--notebook-dir notebooks --ServerApp.port_retries=0 $$([ "$$(id -u)" = 0 ] && echo --allow-root)

test: install ## Run the fast test suite, on every core (TEST_WORKERS=0: in one process)
	$(PYTEST) -m "not slow" $(ARGS)

test-slow: install ## Run the slow tier: sweeps, DDP, Slurm, servers, the browser
	$(PYTEST) -m slow $(ARGS)

test-all: install ## Run every test, slow ones included
	$(PYTEST) $(ARGS)

lint: install ## Check style with ruff
	$(VENV)/bin/ruff check src tests bench notebooks
	$(VENV)/bin/ruff format --check src tests bench notebooks

format: install ## Format and fix with ruff
	$(VENV)/bin/ruff format src tests bench notebooks
	$(VENV)/bin/ruff check --fix src tests bench notebooks

# MLflow 3's server also starts job workers (huey consumers, three more processes importing
# MLflow) for GenAI jobs that cnnlab never submits: off unless the environment turns them on.
MLFLOW_JOBS := MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

ui: install ## Serve the MLflow UI for this store on 127.0.0.1:5000
	$(MLFLOW_JOBS) $(VENV)/bin/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(MLFLOW_DB)}" \
		--default-artifact-root "$(MLFLOW_ARTIFACTS)" --host $(UI_HOST) --port $(UI_PORT)

server: install ## MLflow tracking server for parallel and remote jobs (127.0.0.1:5001)
	$(MLFLOW_JOBS) $(VENV)/bin/mlflow server --backend-store-uri "$(SERVER_STORE)" \
		--artifacts-destination "$(MLFLOW_ARTIFACTS)" --host $(SERVER_HOST) --port $(SERVER_PORT)

bench-data: install ## Data path vs the classic torchvision pipeline (bench/results/data.json)
	$(PY) -m bench.bench_data $(ARGS)

bench-train: install ## cnnlab.train vs hand-written loops, MLflow, sweep and time-to-accuracy costs (bench/results/train.json)
	$(PY) -m bench.bench_train $(ARGS)

bench-report: install ## The report's error rates on simulated sweeps, and the race's saving (bench/results/report.json)
	$(PY) -m bench.bench_report $(ARGS)

bench: bench-data bench-train bench-report ## Every benchmark, printed as ratios and saved under bench/results/

# The GPU check (bench/gpu_check.py). The GPU machine has torch but no internet and no .venv:
# there `make gpu-check` runs with its own python3 and installs what is missing (Hydra,
# MLflow, mlxtend...) from bench/gpu_wheels/ into a folder of its own, so it must not depend
# on `install`, which makes .venv and fetches torch from PyPI. Here it takes .venv's Python
# (tiny mode on a CPU); GPU_PYTHON=... chooses another.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))

gpu-wheels: install ## The wheels gpu-check installs offline on a GPU machine: bench/gpu_wheels/ (< 50 MiB)
	$(PY) -m bench.gpu_wheels

gpu-check: ## Check cnnlab on a GPU in < 8 min (tiny on a CPU): bench/results/gpu.json (ARGS="--out DIR")
	$(GPU_PYTHON) -m bench.gpu_check $(ARGS)

clean: ## Remove outputs and caches (keeps .venv, data and the MLflow store)
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
