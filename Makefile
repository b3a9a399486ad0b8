# ctseg: every target sets itself up (venv + pinned deps) through the install stamp.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

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

.PHONY: install train test infer evaluate bench mlflow-ui experiment clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

TRAIN_CMD = ctseg train --config $(CONFIG) $(if $(CASE_DIR),--case-dir $(CASE_DIR)) $(if $(OUTPUT),--output $(OUTPUT)) $(ARGS)

train: $(STAMP)
ifeq ($(NPROC),1)
	$(BIN)/$(TRAIN_CMD)
else
	$(BIN)/torchrun $(TORCHRUN_ARGS) --nproc_per_node $(NPROC) -m ctseg.cli $(subst ctseg ,,$(TRAIN_CMD))
endif

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

PREDICT_ARGS = predict --model $(MODEL) --input $(INPUT) --output $(OUTPUT) $(ARGS)

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

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --port 5000

clean:
	rm -rf $(VENV) .pytest_cache
