"""ruff holds on the whole project: lint rules (the 110-character line limit included) and formatting.

The paths are `make lint`'s; a new top-level folder with Python in it must be added to both.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

LINT_PATHS = ["mrpo", "flows", "evaluation", "tests", "benchmarks", "scripts"]


def _ruff() -> list[str]:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    binary = shutil.which("ruff")
    if binary is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return [binary]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_ruff(), *args, *LINT_PATHS], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_ruff_check_passes():
    result = _run("check", "--output-format", "concise", "--no-cache")
    assert result.returncode == 0, f"ruff check found (path:line:col: rule):\n{result.stdout}{result.stderr}"


def test_ruff_format_leaves_every_file_unchanged():
    result = _run("format", "--diff", "--no-cache")
    assert result.returncode == 0, f"ruff format would change these lines:\n{result.stdout}{result.stderr}"


def test_every_python_file_is_under_a_linted_path():
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    outside = [path for path in listed.stdout.split() if path.split("/")[0] not in LINT_PATHS]
    assert outside == [], "Python files ruff does not check: add their folder to LINT_PATHS and `make lint`"
