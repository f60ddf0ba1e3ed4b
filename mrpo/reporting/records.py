"""The full records stages leave beside their outputs, for the summary and the flows to read.

Named here, not in the stages that write them, so that a reader never imports a stage (and its torch and
lm-eval imports).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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


# The DVC metrics files (`train.metrics_file`, `evaluate.metrics_file`) hold the headline numbers under short
# names, so `dvc metrics show` / `dvc metrics diff` fit a terminal; every other number, under the names MLflow
# uses, is in the full records above and on the MLflow run. Short name -> full name:
TRAIN_HEADLINE = {
    "steps": "steps",
    "train_loss": "train_loss",
    "val_accuracy": "val_reward_accuracy_after",
    "test_accuracy": "test_reward_accuracy_after",
}
EVAL_HEADLINE = {"accuracy_vs_anchor": "pref/reward_accuracy_vs_anchor"}


def train_headline(metrics: Mapping[str, float]) -> dict[str, float]:
    """`train.metrics_file`: steps, mean training loss, validation and test reward accuracy after training."""
    return {short: metrics[full] for short, full in TRAIN_HEADLINE.items() if full in metrics}


def evaluation_headline(metrics: Mapping[str, float]) -> dict[str, float]:
    """`evaluate.metrics_file`: reward accuracy against the anchor and, per lm-eval task, the policy's first
    metric (`policy/<task>/<metric>`, sorted: `acc` before `acc_norm`) under the task's name."""
    view = {short: metrics[full] for short, full in EVAL_HEADLINE.items() if full in metrics}
    for key in sorted(metrics):
        parts = key.split("/")
        if parts[0] == "policy" and len(parts) >= 3:
            view.setdefault(parts[1], metrics[key])
    return view
