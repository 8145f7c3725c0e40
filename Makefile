# Two commands: `make demo` runs the main job on embedded defaults, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, with pip (it finds the local wheel; an unpinned torch
	# would pull a multi-GB CUDA build), then everything else with uv: the same packages
	# from the same index, resolved and installed in parallel (about 8x faster than pip here).
	$(BIN)/pip install -q torch==2.13.0 uv
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/moe-pretrain demo

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/model_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
