# make run   - create .venv, install, run the self-contained example on the distributed pipeline (local Ray:
#              2 synthesis actors -> WebDataset buffer -> 2 DeepSpeed ranks; digits teacher -> data-free student)
# make test  - create .venv, install, run the fast tier: every component for real once (<= 10 min on 2 cores)
# make test-all - the slow tier (the tests make test leaves out): every fault drill in both schedules, resizes, the
#              verdict on real runs, the shared-data teacher, the GPU benchmark's CPU smoke runs (~20 min on 2 cores)
# make bench - the CIFAR-10 ResNet-56 -> ResNet-20 benchmark (needs ../shared/data, 60 min)
# make bench-pipeline - the same through the pipeline, plus synthesis scaling and buffer throughput
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
RUN_NAME := digits-$(shell date +%Y%m%d-%H%M%S)
# Everything runs offline: the SBERT encoder ships in a package, nothing is fetched from a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# The venv's tools (ray, ninja) first, as in an activated venv: DeepSpeed's JIT-built comm op is cached by ninja,
# and two ninja versions on one machine rebuild it at every switch.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup run test test-all bench bench-pipeline

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python -m orchestrator.examples.digits name=$(RUN_NAME)

test: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

test-all: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

bench: $(STAMP)
	$(VENV)/bin/python -m bench.cifar10_resnet56

bench-pipeline: $(STAMP)
	$(VENV)/bin/python -m bench.pipeline_speed
	$(VENV)/bin/python -m bench.cifar10_resnet56 --pipeline --name bench-cifar10-resnet56-pipeline
