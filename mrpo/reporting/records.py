"""The full records stages leave beside their outputs, for the summary and the flows to read.

Named here, not in the stages that write them, so that a reader never imports a stage (and its torch and
lm-eval imports).
"""

from __future__ import annotations

import json
from pathlib import Path

TRAIN_RECORD = "train_metrics.json"  # in train.output_dir: every metric, before and after training
EVAL_RECORD = "metrics.json"  # in evaluate.results_dir: the policy's and the anchor's scores
ZOO_MANIFEST = "mrpo_zoo.json"  # in each zoo member's directory: its settings, size and SFT losses


def read_record(path: Path) -> dict:
    """A JSON object written by a stage; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
