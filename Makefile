# Two commands on a fresh machine:
#   make pipeline   create .venv, install petpipe, run the whole pipeline (dvc repro)
#   make test       create .venv, install petpipe with test extras, run the tests
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: pipeline test install benchmark levers

$(BIN)/petpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/petpipe

pipeline: install
	PATH="$(abspath $(BIN)):$$PATH" dvc repro

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest

# fastai's tutorial recipe, petpipe's default and petpipe with the fastai override, on the sample photos
# (224 px, 4 + 2 epochs with lr-find, 3 seeds, alternating; about 2 hours on 2 cores).
benchmark: install
	$(BIN)/pip install --quiet -e '.[benchmark]'
	$(BIN)/python benchmarks/compare_fastai.py --out benchmarks/results.json \
		--frameworks fastai petpipe petpipe-fastai --markdown README.md docs/benchmark.md

# What each speed lever buys on this machine, one at a time (about 6 minutes on 2 cores, torch.compile included).
levers: install
	$(BIN)/python benchmarks/levers.py --compile --out benchmarks/levers.json
