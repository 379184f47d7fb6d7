# Two commands on a fresh machine: `make run` and `make test`. Every target creates .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
FMNIST_SRC := /usr/share/datasets/fashion-mnist
FMNIST_RAW := data/raw/FashionMNIST/raw
FMNIST_FILES := train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= cdc:$(VERSION)

.PHONY: run test test-kernels reliability data lint bench latency-budget compare ui dvc-yaml compile image push pull clean help
help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

run: $(BIN)/cdc data  ## the default pipeline: dvc repro under one MLflow run, then the summary
	cdc repro

# two workers, each test file on one (its module fixtures built once), the slowest files first in the
# order tests/conftest.py gives (not xdist's, by test count); the 25 slowest tests listed
PYTEST := $(BIN)/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25
# The libraries every test process loads, read once before the workers start. On a machine whose page
# cache is cold, the workers' parallel first imports fault ~3 GB of torch/CUDA libraries in at random:
# 2026-12-02, this 2-core VM, 200 s of mostly I/O wait at the start of the suite; one process: 17 s.
WARM := import torch, torchvision, mlflow, mlflow.store.tracking.sqlalchemy_store, sklearn.cluster, pyarrow.parquet, dvc.repo, kfp, onnxruntime, onnx
test: $(BIN)/cdc data  ## lint, then the test suite (unit, component, end-to-end) on two pytest-xdist workers
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -c "$(WARM)"
	$(PYTEST)

KERNEL_PATHS := avx2 default
test-kernels: $(BIN)/cdc data  ## the suite again under PyTorch's other CPU kernel paths (ATEN_CPU_CAPABILITY=avx2, default): other rounding, same verdicts
	@for path in $(KERNEL_PATHS); do \
	  echo "== ATEN_CPU_CAPABILITY=$$path pytest -q"; \
	  ATEN_CPU_CAPABILITY=$$path $(PYTEST) || exit 1; \
	done

reliability: $(BIN)/cdc data  ## the reliability tests; writes their record to docs/reliability.md
	CDC_RELIABILITY_RECORD=docs/reliability.md $(BIN)/pytest -q tests/test_reliability.py

$(BIN)/cdc: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (about two minutes on a fresh machine; log: $(VENV)/install.log)"
	@$(BIN)/pip install -e ".[dev]" > $(VENV)/install.log 2>&1 || (tail -30 $(VENV)/install.log; exit 1)
	@touch $@

data:  ## Fashion-MNIST from Debian's dataset-fashion-mnist, gunzipped for torchvision (idempotent)
	@for f in $(FMNIST_FILES); do \
	  [ -f $(FMNIST_RAW)/$$f ] && continue; \
	  if [ ! -f $(FMNIST_SRC)/$$f.gz ]; then \
	    if [ "$$(id -u)" = 0 ]; then \
	      echo "installing Debian's dataset-fashion-mnist"; \
	      apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	        (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null) || exit 1; \
	    else \
	      echo "Fashion-MNIST is missing from $(FMNIST_SRC): run 'sudo apt-get install dataset-fashion-mnist' and retry."; \
	      exit 1; \
	    fi; \
	  fi; \
	  mkdir -p $(FMNIST_RAW) && gunzip -c $(FMNIST_SRC)/$$f.gz > $(FMNIST_RAW)/$$f.tmp && mv $(FMNIST_RAW)/$$f.tmp $(FMNIST_RAW)/$$f || exit 1; \
	  echo "unpacked $(FMNIST_RAW)/$$f"; \
	done

lint: $(BIN)/cdc  ## ruff, and dvc.yaml in step with the stage list
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

dvc-yaml: $(BIN)/cdc  ## regenerate dvc.yaml from components/stages/__init__.py
	$(BIN)/cdc dvc-yaml > dvc.yaml

compile: $(BIN)/cdc  ## write pipeline/cdc_pipeline.yaml (Kubeflow) for the image IMAGE (default cdc:$(VERSION))
	$(BIN)/cdc kfp compile --image $(IMAGE)

image:  ## build components/Dockerfile as IMAGE=registry/name:tag, push it and print its digest (needs a container engine)
	@docker info >/dev/null 2>&1 || { echo "make image needs a running Docker engine (none here)"; exit 1; }
	docker build -f components/Dockerfile --build-arg GIT_COMMIT=$$(git rev-parse HEAD) -t $(IMAGE) .
	@case "$(IMAGE)" in \
	  */*) docker push $(IMAGE) && \
	       echo "pushed $$(docker inspect --format '{{index .RepoDigests 0}}' $(IMAGE))  (compile with --image <that>)";; \
	  *) echo "IMAGE=$(IMAGE) names no registry: not pushed";; \
	esac

ui: $(BIN)/cdc  ## the MLflow UI on http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

BENCHES := stats_overhead train_overhead student_speedup latency_table pipeline_overhead scale stream_stats
bench: $(BIN)/cdc data  ## performance benchmarks (each prints a table, writes bench/results/*.json), then the summary
	@for b in $(BENCHES); do echo "== python -m bench.$$b"; $(BIN)/python -m bench.$$b || exit 1; echo; done
	@$(BIN)/python -m bench.summary

latency-budget: $(BIN)/cdc data  ## the latency budget against the FLOPs budget, 3 teachers (about 1 h on 2 cores): docs/performance.md 3c
	$(BIN)/python -m bench.latency_budget

compare: $(BIN)/cdc data  ## docs/results.md as committed (about 3 h 20 min on 2 cores): cdc compare --profile extended, the ranking factors
	$(BIN)/cdc compare --profile extended
	$(BIN)/python -m bench.ranking_factors
	$(BIN)/cdc compare --profile extended --report-only

push: $(BIN)/cdc  ## upload the DVC-tracked artifacts to S3 (settings: CDC_S3_BUCKET, CDC_S3_ENDPOINT, ...; see README)
	cdc storage push

pull: $(BIN)/cdc  ## download the DVC-tracked artifacts from S3 and check them out
	cdc storage pull

clean:  ## remove pipeline outputs and runs (keeps .venv and the raw data)
	rm -rf data/prepared data/teacher data/stats data/score data/prune data/dca data/student data/evaluate data/export mlflow.db mlartifacts kfp_outputs
