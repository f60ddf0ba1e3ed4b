.PHONY: setup pipeline test lint

# Quickstart, command 1: install, then run the default pipeline end to end with DVC.
pipeline: setup
	. .venv/bin/activate && dvc repro

# Quickstart, command 2: install, then run the test suite (this is what CI runs).
test: setup
	. .venv/bin/activate && python -m pytest -q

setup:
	bash scripts/setup.sh

lint:
	. .venv/bin/activate && ruff check mrpo flows evaluation tests benchmarks
