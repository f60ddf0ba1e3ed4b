"""The `summary` stage: what the pipeline did, on one screen, printed and written as markdown
(`summary.file`).

It reads only what train and evaluate wrote (their metrics files and the MLflow run recorded with the policy),
so it runs in a second after them: before/after on the key metrics, the reference weights, where the policy
is, and the commands that open MLflow and the plots.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mrpo.config.schema import Config
from mrpo.io import write_text_atomically
from mrpo.reporting.records import EVAL_RECORD, TRAIN_RECORD, read_record
from mrpo.reporting.summary import run_lines, summary_markdown

log = logging.getLogger("mrpo")


def summarize(cfg: Config, project_dir: str | Path = ".") -> str:
    """Write `summary.file` and print it with the MLflow run's id and page; returns the markdown."""
    from mrpo.preflight import check_stage
    from mrpo.tracking.store import read_run_record

    check_stage(cfg, "summary")
    root = Path(project_dir)
    # the full records (before-training and anchor values included), else the metrics files
    train_metrics = read_record(root / cfg.train.output_dir / TRAIN_RECORD) or read_record(
        root / cfg.train.metrics_file
    )
    eval_metrics = read_record(root / cfg.evaluate.results_dir / EVAL_RECORD) or read_record(
        root / cfg.evaluate.metrics_file
    )
    try:
        run = read_run_record(root / cfg.train.output_dir)
    except ValueError as exc:
        log.warning("summary: %s", exc)
        run = None
    text = summary_markdown(cfg, train_metrics, eval_metrics, run, root)
    write_text_atomically(root / cfg.summary.file, text)
    print("\n".join([text, *run_lines(run)]), flush=True)
    log.info("summary: written to %s", cfg.summary.file)
    return text
