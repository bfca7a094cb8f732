# minisora: `make train` and `make test` work on a fresh clone; both install into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/shapes.yaml
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install extras train train-vae sample data-stats test test-fast bench bench-data notebooks clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/minisora: requirements.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(BIN)/minisora  ## create .venv and install requirements + the package (editable)

$(VENV)/.extras: $(BIN)/minisora requirements-extras.txt
	$(BIN)/pip install -q -r requirements-extras.txt
	touch $@

extras: $(VENV)/.extras  ## install the optional extras (diffusers autoencoders)

train: install  ## run the full default pipeline (CONFIG=configs/shapes.yaml ARGS="key=value ...")
	$(BIN)/minisora train --config $(CONFIG) $(ARGS)

train-vae: install  ## train only the autoencoder (CONFIG=configs/vae/shapes.yaml)
	$(BIN)/minisora train-vae --config $(if $(filter configs/shapes.yaml,$(CONFIG)),configs/vae/shapes.yaml,$(CONFIG)) $(ARGS)

sample: install  ## sample videos from the last `make train` run (ARGS="--prompt '...'")
	$(BIN)/minisora sample $(ARGS)

data-stats: install  ## clips per bucket, skipped files, token histogram (CONFIG=... ARGS="key=value ...")
	$(BIN)/minisora data-stats --config $(CONFIG) $(ARGS)

test: install extras  ## run the test suite (slow tests included; installs the extras so their tests run)
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: install extras  ## run the suite without the slow tests
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

bench: install  ## every benchmark -> bench/results-<device>.json (ARGS="--quick" for a smoke run)
	$(BIN)/minisora bench all $(ARGS)

bench-data: install  ## data-loading benchmark on ../shared/videos
	$(BIN)/minisora bench data $(ARGS)

clean:  ## remove runs/, data/ and caches (keeps .venv)
	rm -rf runs data .pytest_cache lightning_logs
