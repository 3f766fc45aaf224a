# Brook: everything a fresh machine needs goes through these targets (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.brook-installed

.PHONY: setup models serve test lint pytest clean-models

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Brook needs Python 3.11 or newer; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,build,bench]"
	touch $(STAMP)

setup: $(STAMP)

models: setup
	$(BIN)/brook models fetch

# Fetches and converts the default models on first run (idempotent), then serves on http://127.0.0.1:8000/.
serve: setup
	$(BIN)/brook serve

lint: setup
	$(BIN)/ruff check app scripts tests
	$(BIN)/mypy

pytest: models
	$(BIN)/python -m pytest

test: lint pytest

clean-models:
	rm -rf models/*/[0-9]* models/*/.[0-9]*
