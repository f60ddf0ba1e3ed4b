"""The `check` stage: the whole params.yaml validated whenever `dvc repro` runs anything.

DVC re-runs a stage only when a param it declares changes, so a mistyped key (`train.learnig_rate`) or an
invalid value of a key no stage declares (`train.logging_steps: 0`) would pass `dvc repro` as up to date,
although `mrpo` refuses it. This stage depends on params.yaml as a file, so any edit re-runs it, first: the
CLI validates every key and value before calling it (mrpo.config.load), and a bad one stops `dvc repro` with
mrpo's one-line message (exit 2). Every other stage depends on its output, a marker whose bytes never change,
so a valid edit re-runs nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mrpo.config.rules import validate
from mrpo.config.schema import Config
from mrpo.io import write_text_atomically

log = logging.getLogger("mrpo")

# Not from params.yaml: the marker must not move when params.yaml changes, or every stage would re-run.
CHECKED = Path("data/params.checked")
MARKER = "params.yaml passed `mrpo check`: every key known, every value in range\n"


def check(cfg: Config) -> Path:
    """Record that `cfg` (params.yaml, read and validated key by key by the CLI) is valid: its cross-key rules
    again, then the marker."""
    validate(cfg)
    if not CHECKED.is_file() or CHECKED.read_text() != MARKER:
        write_text_atomically(CHECKED, MARKER)
    log.info("check: params.yaml is valid (seed %d, %d references)", cfg.seed, len(cfg.references))
    return CHECKED
