"""What a long command shows on the terminal: its own lines only. Library logs (transformers, lm-eval,
datasets, mlflow, Python warnings), progress bars and prints go to a log file; warnings are also counted, so
a warning repeated once per member is shown once with its count (`quiet_libraries`)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

LIBRARY_LOGGERS = (
    "mrpo",  # the stages a command drives log their own setup; the command says what matters itself
    "transformers",
    "lm_eval",
    "lm-eval",
    "datasets",
    "mlflow",
    "accelerate",
    "peft",
    "torch",
    "huggingface_hub",
    "evaluate",
    "urllib3",
    "filelock",
    "fsspec",
    "alembic",
    "py.warnings",
)


class _WarningTally(logging.Handler):
    def __init__(self, counts: Counter) -> None:
        super().__init__(logging.WARNING)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        first = (record.getMessage().strip().splitlines() or [""])[0]
        self.counts[f"{record.levelname} {record.name}: {first[:200]}"] += 1


@dataclass
class Console:
    """The real stdout (for the command's own lines), the log file, and the warnings seen so far."""

    out: TextIO
    log_path: Path
    warnings: Counter = field(default_factory=Counter)

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def warning_lines(self) -> list[str]:
        if not self.warnings:
            return []
        total = sum(self.warnings.values())
        lines = [f"{total} library warning(s), {len(self.warnings)} distinct (details in {self.log_path}):"]
        return lines + [f"  {n:>4} x {text}" for text, n in self.warnings.most_common()]


@contextlib.contextmanager
def quiet_libraries(log_path: Path) -> Iterator[Console]:
    """Within: library loggers write only to `log_path` (warnings counted in the Console), and so do stdout
    and stderr (progress bars, prints); `Console.say` writes to the real stdout. Restored on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    console = Console(sys.stdout, log_path)
    with open(log_path, "a", encoding="utf-8") as stream:
        file_handler = logging.StreamHandler(stream)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        tally = _WarningTally(console.warnings)
        saved = {}
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            saved[name] = (logger.handlers[:], logger.propagate)
            logger.handlers, logger.propagate = [file_handler, tally], False
        logging.captureWarnings(True)
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                yield console
        finally:
            logging.captureWarnings(False)
            for name, (handlers, propagate) in saved.items():
                logger = logging.getLogger(name)
                logger.handlers, logger.propagate = handlers, propagate
