.PHONY: setup pipeline test lint

# Quickstart, command 1: install, then run the default pipeline end to end with DVC.
pipeline: setup
	. .venv/bin/activate && dvc repro

# Quickstart, command 2: install, then run the test suite (this is what CI runs).
test: setup
	. .venv/bin/activate && python -m pytest -q

setup:
	bash scripts/setup.sh

# The same paths as tests/project/test_lint.py, which makes the test suite (and so CI) enforce them.
LINT_PATHS = mrpo flows evaluation tests benchmarks scripts

lint:
	. .venv/bin/activate && ruff check $(LINT_PATHS) && ruff format --check $(LINT_PATHS)
