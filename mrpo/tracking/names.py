"""One name per quantity, whatever kind of run records it: a pipeline run (train, then evaluate), a comparison
member, a comparison or sweep parent, a diagnostics run. `mrpo runs` and the MLflow runs table compare them
by these names.

* what the run is: tag `mrpo.kind` (KINDS);
* the reference set: tag `mrpo.reference_set` (the training references' names, anchor first, comma-joined);
* what was trained: params `train.objective`, `train.strategy` (`n/a` for DPO, which has one reference and
  so no weighting), `train.beta`, `seed`, and the same values as the short tags `mrpo.objective`,
  `mrpo.strategy`, `mrpo.beta`, `mrpo.seed`;
* held-out reward accuracy against the anchor (the standard DPO definition, on the test split): metric
  `pref/reward_accuracy_vs_anchor`;
* pairs actually trained on: metric `train_pairs`; mean training loss `train_loss`; optimizer steps
  `steps`; wall time `runtime_s`;
* where the run came from: MLflow's `mlflow.source.name` / `mlflow.source.type` and `mrpo.params_digest`
  (sha256 of the params.yaml values as the run's `section.key` params store them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from mrpo.config.schema import Config, config_to_flat_dict

KIND = "mrpo.kind"
KINDS = ("pipeline", "compare", "compare-member", "diagnostics", "sweep", "sft")
REFERENCE_SET = "mrpo.reference_set"
ACCURACY_VS_ANCHOR = "pref/reward_accuracy_vs_anchor"
TRAIN_PAIRS = "train_pairs"
TRAIN_LOSS = "train_loss"
STEPS = "steps"
RUNTIME = "runtime_s"
GROUP = "mrpo.sweep"  # the sweep or comparison a run belongs to (its id)
PARAMS_DIGEST = "mrpo.params_digest"
NOT_APPLICABLE = "n/a"
SOURCE_NAME, SOURCE_TYPE = "mlflow.source.name", "mlflow.source.type"
DESCRIPTION = "mlflow.note.content"
PARENT = "mlflow.parentRunId"


def strategy_of(cfg: Config) -> str:
    """The weighting strategy, or `n/a` for DPO (one reference: nothing to weight)."""
    return NOT_APPLICABLE if cfg.train.objective == "dpo" else cfg.train.strategy


def run_params(cfg: Config) -> dict[str, Any]:
    """Every params.yaml value as a `section.key` param; `train.strategy` as `strategy_of` says."""
    return {**config_to_flat_dict(cfg), "train.strategy": strategy_of(cfg)}


_MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value


def param_value(value: Any) -> str:
    """A value as MLflow stores it as a param: lists and mappings as JSON, the rest as text."""
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:_MAX_PARAM_CHARS]


def params_digest(params: Mapping[str, Any]) -> str:
    """sha256 of the params as MLflow stores them, so it can be checked against a run's params."""
    stored = {k: param_value(v) for k, v in params.items()}
    return hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()


def reference_set(cfg: Config) -> str:
    return ",".join(r.name for r in cfg.training_references())


def key_tags(cfg: Config) -> dict[str, str]:
    """The settings that tell runs apart, as tags: short columns for the MLflow runs table."""
    t = cfg.train
    tags = {
        "mrpo.objective": t.objective,
        "mrpo.strategy": strategy_of(cfg),
        "mrpo.loss_type": t.loss_type,
        "mrpo.beta": f"{t.beta:g}",
        "mrpo.seed": str(cfg.seed),
        REFERENCE_SET: reference_set(cfg),
        "mrpo.references": ",".join(r.name for r in cfg.references),
        "mrpo.anchor": cfg.anchor.name,
        "mrpo.data_source": cfg.data.source,
    }
    for ref in cfg.references:
        tags[f"mrpo.reference.{ref.name}.model"] = ref.model
        if ref.revision:
            tags[f"mrpo.reference.{ref.name}.revision"] = ref.revision
    return tags


def default_run_name(cfg: Config) -> str:
    """What the run is, e.g. `mrpo-vdw-anchor+gpt2_char+llama_expert-b0.1-s0-3f9a1c`.

    MLflow's random names repeat here (the stage seeds Python's RNG before the run exists), and say nothing;
    the suffix, a hash of the whole configuration, tells apart runs that differ elsewhere.
    """
    t = cfg.train
    refs = "+".join(r.name for r in cfg.training_references())
    what = t.objective if t.objective == "dpo" else f"{t.objective}-{t.strategy}"
    return f"{what}-{refs}-b{t.beta:g}-s{cfg.seed}-{params_digest(config_to_flat_dict(cfg))[:6]}"


def run_description(cfg: Config) -> str:
    t = cfg.train
    refs = ", ".join(f"{r.name} ({r.model})" for r in cfg.training_references())
    loss = t.loss_type if isinstance(t.loss_type, str) else " + ".join(t.loss_type)
    weighting = "" if t.objective == "dpo" else f", weighting {t.strategy}"
    return (
        f"{t.objective} ({loss} loss, beta {t.beta:g}{weighting}) against {refs}; "
        f"anchor {cfg.anchor.name}; data {cfg.data.source}; seed {cfg.seed}."
    )


def source_tags(command: str) -> dict[str, str]:
    """MLflow's Source column: the command that made the run, a JOB when DVC or Prefect launched it."""
    launched = any(os.environ.get(v) for v in ("DVC_STAGE", "DVC_EXP_NAME", "PREFECT__FLOW_RUN_ID"))
    return {SOURCE_NAME: command, SOURCE_TYPE: "JOB" if launched else "LOCAL"}


_METRIC_NAME_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")


def metric_name(key: str) -> str:
    """A name MLflow accepts (letters, digits, _ - . / and space): anything else becomes '_'."""
    return _METRIC_NAME_BAD.sub("_", key)


# Trainer's bookkeeping, not curves: wall-clock of each evaluation, and its end-of-training summary (whose
# `train_loss` is over the resumed part only; the train stage logs the whole run's as `train_loss` itself).
_SKIPPED_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")
_SKIPPED = {"total_flos", "train_loss"}


def curve_metrics(logs: Mapping[str, Any]) -> dict[str, Any]:
    """One Trainer log as MLflow metrics, one name per quantity.

    Validation is `eval_*` whether Trainer evaluated on schedule or the stage evaluated after training
    (`val_*`), test is `test_*`; `epoch` only with the training curves (Trainer adds it to every log).
    """
    training = "loss" in logs
    out = {}
    for key, value in logs.items():
        if key in _SKIPPED or key.endswith(_SKIPPED_SUFFIXES) or (key == "epoch" and not training):
            continue
        out["eval_" + key[len("val_") :] if key.startswith("val_") else key] = value
    return out


def score_tags(metrics: Mapping[str, Any], names) -> dict[str, str]:
    """The headline scores as `mrpo.score.<name>` tags (4 decimals): the runs table shows them at a glance."""
    out = {}
    for name in names:
        value = metrics.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
            out[f"mrpo.score.{name}"] = f"{value:.4f}"
    return out
