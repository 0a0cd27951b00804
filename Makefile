# Two commands on a fresh machine:
#   make pipeline   create .venv, install petpipe, run the whole pipeline (dvc repro)
#   make test       create .venv, install petpipe with test extras, lint, run the tests
# While editing: make test-fast (lint and the tests that train nothing, under a minute).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: pipeline test test-fast lint install benchmark benchmark-memory levers finetune-profile

$(BIN)/petpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/petpipe

pipeline: install
	PATH="$(abspath $(BIN)):$$PATH" dvc repro

test: install lint
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -n auto --dist loadgroup

test-fast: install lint
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -q -m fast

# ruff's lint and format check (pyproject.toml's [tool.ruff]); `ruff format petpipe tests benchmarks` formats.
lint: install
	$(BIN)/ruff check petpipe tests benchmarks
	$(BIN)/ruff format --check petpipe tests benchmarks

# fastai's tutorial recipe, petpipe's default and petpipe with the fastai override (224 px, 4 + 2 epochs with
# lr-find): first on 4 variants of each sample photo (1,184 training photos, the README's headline; about
# 1 hour on 2 cores), then on the sample itself (296; 3 seeds, about 1 hour), then both tables and how the
# comparison changes with the number of photos into README.md and docs/benchmark.md.
benchmark: install
	$(BIN)/pip install --quiet -e '.[benchmark]'
	$(BIN)/python benchmarks/compare_fastai.py --scale 4 --seeds 1 --out benchmarks/results_scale4.json
	$(BIN)/python benchmarks/compare_fastai.py --seeds 1 2 3 --out benchmarks/results_sample.json
	$(BIN)/python benchmarks/compare_fastai.py --summarise benchmarks/results_scale4.json \
		benchmarks/results_sample.json --markdown README.md docs/benchmark.md

# Peak memory of each phase (RSS and anonymous) at 296 and 1,184 training photos, the default and float32
# (about 6 minutes on 2 cores): docs/speed.md, "Memory as the photos grow".
benchmark-memory: install
	$(BIN)/pip install --quiet -e '.[benchmark]'
	$(BIN)/python benchmarks/compare_fastai.py --seeds 1 --frameworks petpipe petpipe-float32 --out benchmarks/memory_k1.json
	$(BIN)/python benchmarks/compare_fastai.py --scale 4 --seeds 1 --frameworks petpipe petpipe-float32 \
		--out benchmarks/memory_k4.json

# Where a finetune step's time goes (data, augmentation, forward, backward, optimiser) for each
# finetune.frozen_stride, and the evaluation pass with BatchNorm folded (about 2 minutes on 2 cores).
finetune-profile: install
	$(BIN)/python benchmarks/finetune_profile.py --out benchmarks/finetune_profile.json

# What each speed lever buys on this machine, one at a time (about 6 minutes on 2 cores, torch.compile included).
levers: install
	$(BIN)/python benchmarks/levers.py --compile --out benchmarks/levers.json
