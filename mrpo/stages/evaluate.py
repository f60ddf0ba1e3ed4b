"""The `evaluate` stage: lm-eval-harness benchmarks for the policy and its anchor, plus preference metrics.

Benchmarks run through mrpo.evaluation.lmeval (the Hugging Face backend) on the trained policy
(`train.output_dir`)
and on the anchor (the first reference; its results are cached). Preference metrics on the test split come
from the policy's own log-probs and the anchor's stored scores (`<score.output_dir>/<anchor>.parquet`):
margin = beta * ((pi_w - r_w) - (pi_l - r_l)).

Outputs: `evaluate.metrics_file` (flat JSON: `policy/<task>/<metric>` and the policy's `pref/...`), the full
record with `anchor/...`, `delta/...` and counts (`<evaluate.results_dir>/metrics.json`), lm-eval's full
results under `evaluate.results_dir`, and all of these metrics on the training run's MLflow run.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mrpo.config.schema import Config
from mrpo.data.provenance import check_scored_inputs
from mrpo.evaluation.lmeval import (
    EvalSettings,
    cached_lm_eval,
    check_model_exists,
    deltas,
    flatten_results,
    lm_eval_model_args,
    reproducible,
    run_lm_eval,
)
from mrpo.evaluation.lmeval_tasks import plan_tasks, write_held_out_data
from mrpo.evaluation.preference import (
    policy_preference_metrics,
    policy_reference,
)
from mrpo.io import write_json_atomically, write_text_atomically
from mrpo.reporting.records import EVAL_RECORD, evaluation_headline

log = logging.getLogger("mrpo")


# ---------------------------------------------------------------- the stage


@dataclass
class EvaluationReport:
    metrics: dict[str, float]
    anchor_cached: bool
    seconds: float
    results_files: dict[str, str]


def write_scored_card(cfg: Config, metrics: Mapping[str, float]) -> Path | None:
    """The policy's model card with this evaluation's scores, as `<results_dir>/model_card.md` (the card in
    the policy directory is the train stage's output and stays as it wrote it)."""
    from mrpo.reporting.modelcard import CARD, with_evaluation

    card = Path(cfg.train.output_dir) / CARD
    if not card.is_file():
        return None
    path = Path(cfg.evaluate.results_dir) / "model_card.md"
    write_text_atomically(path, with_evaluation(card.read_text(), metrics))
    return path


def log_to_mlflow(cfg: Config, metrics: Mapping[str, float], card: Path | None = None) -> str | None:
    """The metrics on the training run and its logged policy model, the card with scores on that model, then
    the run's lineage completed (mrpo.tracking.lineage); warns and skips when no run is recorded."""
    from mrpo.tracking.lineage import complete_lineage
    from mrpo.tracking.tracker import reopen

    run = reopen(cfg, "evaluate")  # a NullTracker, with a warning, when train recorded no run
    model_id = run.tags().get("mrpo.model_id")
    run.log_metrics(metrics, model_id=model_id)
    if model_id and card is not None:
        from mrpo.reporting.modelcard import CARD

        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(card, Path(tmp) / CARD)
            run.log_model_artifact(model_id, Path(tmp) / CARD)
    complete_lineage(cfg, run, ".")
    return run.run_id


def evaluate(cfg: Config) -> EvaluationReport:
    """Run the evaluate stage (see the module docstring); returns the flat metrics and where results went."""
    from mrpo.preflight import check_stage

    check_stage(cfg, "evaluate")
    check_scored_inputs(cfg, "evaluate")  # the anchor unchanged since its scores were made
    start = time.perf_counter()
    e = cfg.evaluate
    results_dir = Path(e.results_dir)
    settings = EvalSettings.from_config(cfg)
    planned = plan_tasks(cfg, results_dir / "data")
    policy = policy_reference(cfg)
    check_model_exists(policy, "policy", "run `mrpo train` first (train.output_dir)")
    check_model_exists(
        cfg.anchor, "anchor", f"build it (`mrpo zoo`) or fix references.{cfg.anchor.name}.model"
    )
    write_held_out_data(cfg, planned)
    chat = cfg.anchor.chat_template

    metrics: dict[str, float] = {}
    results_files: dict[str, str] = {}
    anchor_cached = False
    if planned:
        log.info(
            "evaluate: tasks %s (limit %s, %d-shot) on %s",
            [t.name for t in planned],
            settings.limit,
            settings.num_fewshot,
            settings.device,
        )
        anchor_results, anchor_cached = cached_lm_eval(cfg.anchor, planned, settings, Path(e.cache_dir), chat)
        policy_results = run_lm_eval(lm_eval_model_args(policy, settings.dtype), planned, settings, chat)
        for who, results in (("policy", policy_results), ("anchor", anchor_results)):
            path = results_dir / f"{who}.json"
            write_text_atomically(path, json.dumps(reproducible(results), indent=1) + "\n")
            results_files[who] = str(path)
        anchor_flat = flatten_results(anchor_results, "anchor")
        policy_flat = flatten_results(policy_results, "policy")
        metrics.update(policy_flat)
        metrics.update(anchor_flat)
        metrics.update(deltas(policy_flat, anchor_flat))
    metrics.update(policy_preference_metrics(cfg, policy, settings))
    metrics = dict(sorted(metrics.items()))

    metrics_file = Path(e.metrics_file)
    write_json_atomically(metrics_file, evaluation_headline(metrics))  # NaN -> null: the key stays for diffs
    write_json_atomically(results_dir / EVAL_RECORD, metrics)
    run_id = log_to_mlflow(cfg, metrics, write_scored_card(cfg, metrics))
    seconds = time.perf_counter() - start
    for key, value in metrics.items():
        log.info("evaluate: %s = %.4f", key, value)
    log.info(
        "evaluate: done in %.1fs -> %s%s", seconds, metrics_file, f" (MLflow run {run_id})" if run_id else ""
    )
    return EvaluationReport(metrics, anchor_cached, seconds, results_files)
