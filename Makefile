# ctseg: every target sets itself up (venv + locked deps) through the install stamp.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# The lock's pip, installed first.
PIP_SPEC ?= $(shell grep -m1 '^pip==' $(LOCK) || echo pip)
LOCK_TORCH ?= torch==2.13.0
# Another torch build than the lock's (e.g. "torch==2.13.0 --extra-index-url URL"): installed
# first, and the lock's torch line is then left out.
TORCH_SPEC ?=

CASE_DIR ?=
CONFIG ?= pipelines/train.yaml
OUTPUT ?=
ARGS ?=
NPROC ?= 1
TORCHRUN_ARGS ?= --standalone
MODEL ?=
INPUT ?=
PRED ?=
TRUTH ?=
NAME ?=
FOLDS ?=

.PHONY: install lock train test test-fast infer evaluate bench mlflow-ui experiment clean

install: $(STAMP)

# Redone whenever pyproject.toml or the lock changes. pip prints each package as it goes.
$(STAMP): pyproject.toml $(LOCK)
	@echo "==> [1/4] $(VENV): virtual environment and $(PIP_SPEC)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar off "$(PIP_SPEC)"
	@echo "==> [2/4] the pinned dependencies of $(LOCK) (several minutes on a fresh machine)"
ifeq ($(strip $(TORCH_SPEC)),)
	$(BIN)/python -m pip install --progress-bar off -r $(LOCK)
else
	$(BIN)/python -m pip install --progress-bar off $(TORCH_SPEC)
	grep -v '^torch==' $(LOCK) > $(VENV)/lock-without-torch.txt
	$(BIN)/python -m pip install --progress-bar off -r $(VENV)/lock-without-torch.txt
endif
	@echo "==> [3/4] ctseg itself (editable; no dependency resolution, built with the locked setuptools)"
	$(BIN)/python -m pip install --progress-bar off --no-deps --no-build-isolation -e .
	@echo "==> [4/4] pip check"
	$(BIN)/python -m pip check
	touch $(STAMP)

# Re-resolve the lock from pyproject.toml (keeps pins that still fit; LOCK_ARGS=--upgrade bumps all).
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/pip-compile || $(BIN)/python -m pip install "pip-tools==7.6.2"
	echo "$(LOCK_TORCH)" | $(BIN)/pip-compile --quiet --extra dev --strip-extras --allow-unsafe --no-emit-index-url \
		--no-emit-find-links $(LOCK_ARGS) --output-file $(LOCK) pyproject.toml -

TRAIN_CMD = ctseg train --config $(CONFIG) $(if $(CASE_DIR),--case-dir $(CASE_DIR)) $(if $(OUTPUT),--output $(OUTPUT)) $(ARGS)

train: $(STAMP)
ifeq ($(NPROC),1)
	$(BIN)/$(TRAIN_CMD)
else
	$(BIN)/torchrun $(TORCHRUN_ARGS) --nproc_per_node $(NPROC) -m ctseg.cli $(subst ctseg ,,$(TRAIN_CMD))
endif

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The suite without the tests marked slow (long end-to-end training runs): a few minutes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" --durations=15 $(PYTEST_ARGS)

PREDICT_ARGS = predict $(if $(MODEL),--model $(MODEL)) --input $(INPUT) --output $(OUTPUT) $(ARGS)

infer: $(STAMP)
ifeq ($(NPROC),1)
	$(BIN)/ctseg $(PREDICT_ARGS)
else
	$(BIN)/torchrun $(TORCHRUN_ARGS) --nproc_per_node $(NPROC) -m ctseg.cli $(PREDICT_ARGS)
endif

evaluate: $(STAMP)
	$(BIN)/ctseg evaluate --pred $(PRED) --truth $(TRUTH) --output $(OUTPUT) $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(ARGS)

experiment: $(STAMP)
	$(BIN)/ctseg experiment $(NAME) $(ARGS)

# patient-level cross-validation: make cv CASE_DIR=... CONFIG=... [FOLDS=K] [OUTPUT=...] [ARGS=...]
.PHONY: cv
cv: $(STAMP)
	$(BIN)/ctseg cv --config $(CONFIG) $(if $(CASE_DIR),--case-dir $(CASE_DIR)) --output $(or $(OUTPUT),runs/cv-$(notdir $(basename $(CONFIG)))) $(if $(FOLDS),--folds $(FOLDS)) $(ARGS)

# One server process, no MLflow job runner (ctseg runs no MLflow jobs). `exec` makes the mlflow
# command make's own child: make passes SIGTERM on to it, and mlflow forwards SIGTERM/Ctrl-C to
# its server and waits for it, so nothing is left running.
MLFLOW_PORT ?= 5000
mlflow-ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec $(BIN)/mlflow server --workers 1 --host 127.0.0.1 --port $(MLFLOW_PORT) \
		--backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --artifacts-destination $(CURDIR)/runs/mlartifacts

clean:
	rm -rf $(VENV) .pytest_cache

# The packaged default lung model (ctseg/pretrained/lungs.pt + MODEL_CARD.md): the recipe of
# PRETRAINED_CONFIG, fixed in advance, trained on ALL cases of CASE_DIR (no validation or test
# case, fixed length, the last epoch kept), then packaged in half precision.
#   make pretrained CASE_DIR=../shared/data/lctsc [CV=runs/cv-lctsc] [ARGS=...]
# CV=DIR: first `ctseg cv` of the same recipe into DIR (about 3x the training budget for 3 cases;
# a finished DIR is reused, an unfinished one resumed); its figures go into the model card.
PRETRAINED_CONFIG ?= pipelines/lctsc.yaml
ifeq ($(origin PRETRAINED_RUN),undefined)
PRETRAINED_RUN := runs/pretrained-$(shell date +%Y%m%d-%H%M%S)
endif
CV ?=
PRETRAINED_RECIPE = split.val_fraction=0 split.test_fraction=0 train.selection=last $(ARGS)
PRETRAINED_TRAIN = ctseg train --config $(PRETRAINED_CONFIG) --case-dir $(CASE_DIR) --output $(PRETRAINED_RUN) $(PRETRAINED_RECIPE)

.PHONY: pretrained
pretrained: $(STAMP)
	@test -n "$(CASE_DIR)" || { echo "make pretrained: give CASE_DIR=<labelled case folder>"; exit 2; }
ifneq ($(strip $(CV)),)
	$(BIN)/ctseg cv --config $(PRETRAINED_CONFIG) --case-dir $(CASE_DIR) --output $(CV) $(PRETRAINED_RECIPE)
endif
	$(BIN)/$(PRETRAINED_TRAIN)
	$(BIN)/ctseg package-model --run $(PRETRAINED_RUN) $(if $(strip $(CV)),--cv $(CV)) --train-command "$(PRETRAINED_TRAIN)"
