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
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrpo.config.schema import Config
from mrpo.data.provenance import check_scored_inputs
from mrpo.errors import MRPOError
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
from mrpo.staging import StagedOutputs, recover

log = logging.getLogger("mrpo")


# ---------------------------------------------------------------- the stage


@dataclass
class EvaluationReport:
    metrics: dict[str, float]
    anchor_cached: bool
    seconds: float
    results_files: dict[str, str]


def write_scored_card(cfg: Config, metrics: Mapping[str, float], results_dir: str | Path) -> Path | None:
    """The policy's model card with this evaluation's scores, as `<results_dir>/model_card.md` (the card in
    the policy directory is the train stage's output and stays as it wrote it)."""
    from mrpo.reporting.modelcard import CARD, with_evaluation

    card = Path(cfg.train.output_dir) / CARD
    if not card.is_file():
        return None
    path = Path(results_dir) / "model_card.md"
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


def check_policy(cfg: Config) -> None:
    """The trained policy is there and every weight in it is finite, before anything is evaluated."""
    import torch
    from safetensors import safe_open

    policy = Path(cfg.train.output_dir)
    if not policy.is_dir():
        raise FileNotFoundError(
            f"no trained policy in {policy} (train.output_dir); run `mrpo train` (or `dvc repro train`) first"
        )
    for weights in sorted(policy.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                if not torch.isfinite(f.get_tensor(name)).all():
                    raise MRPOError(
                        f"{weights}: tensor {name!r} holds NaN or inf; the policy is damaged: "
                        "re-run `mrpo train` (or `dvc repro -f train`)"
                    )


def _at_final(results: Any, final: Path) -> Any:
    """lm-eval's results with the paths inside the staged results directory (of this run or, for cached
    anchor results, an earlier one) pointing into the final one, so the files do not differ run to run."""
    final = final.resolve()
    pattern = re.compile(re.escape(f"{final.parent}/.{final.name}.tmp-") + r"\d+")
    if isinstance(results, Mapping):
        return {k: _at_final(v, final) for k, v in results.items()}
    if isinstance(results, list):
        return [_at_final(v, final) for v in results]
    return pattern.sub(str(final), results) if isinstance(results, str) else results


def evaluate(cfg: Config) -> EvaluationReport:
    """Run the evaluate stage (see the module docstring); returns the flat metrics and where results went.
    Every output is staged and swapped in together once all of them and the MLflow record exist."""
    from mrpo.preflight import check_stage

    check_stage(cfg, "evaluate")
    check_scored_inputs(cfg, "evaluate")  # the anchor unchanged since its scores were made
    start = time.perf_counter()
    e = cfg.evaluate
    results_dir = Path(e.results_dir)
    check_policy(cfg)
    recover([results_dir, Path(e.metrics_file)])
    with StagedOutputs() as staged:
        staged_dir = staged.directory(results_dir)
        planned = plan_tasks(cfg, staged_dir / "data")
        check_model_exists(policy_reference(cfg), "policy", "run `mrpo train` first (train.output_dir)")
        check_model_exists(
            cfg.anchor, "anchor", f"build it (`mrpo zoo`) or fix references.{cfg.anchor.name}.model"
        )
        metrics, anchor_cached = _benchmarks(cfg, planned, staged_dir)
        write_json_atomically(staged.file(e.metrics_file), evaluation_headline(metrics))  # NaN -> null
        write_json_atomically(staged_dir / EVAL_RECORD, metrics)
        card = write_scored_card(cfg, metrics, staged_dir)
        staged.commit()
        run_id = log_to_mlflow(cfg, metrics, results_dir / card.name if card else None)
    seconds = time.perf_counter() - start
    for key, value in metrics.items():
        log.info("evaluate: %s = %.4f", key, value)
    shown_run = f" (MLflow run {run_id})" if run_id else ""
    log.info("evaluate: done in %.1fs -> %s%s", seconds, e.metrics_file, shown_run)
    files = {who: str(results_dir / f"{who}.json") for who in ("policy", "anchor") if planned}
    return EvaluationReport(metrics, anchor_cached, seconds, files)


def _benchmarks(cfg: Config, planned, staged_dir: Path) -> tuple[dict[str, float], bool]:
    """lm-eval on the policy and the anchor (its results cached), their results written into the staged
    results directory, and the preference metrics; (the metrics sorted by name, whether the anchor's came
    from the cache)."""
    e = cfg.evaluate
    settings = EvalSettings.from_config(cfg)
    policy = policy_reference(cfg)
    write_held_out_data(cfg, planned)
    chat = cfg.anchor.chat_template
    metrics: dict[str, float] = {}
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
        final = Path(e.results_dir)
        for who, results in (("policy", policy_results), ("anchor", anchor_results)):
            text = json.dumps(reproducible(_at_final(results, final)), indent=1) + "\n"
            (staged_dir / f"{who}.json").write_text(text)
        anchor_flat = flatten_results(anchor_results, "anchor")
        policy_flat = flatten_results(policy_results, "policy")
        metrics.update(policy_flat)
        metrics.update(anchor_flat)
        metrics.update(deltas(policy_flat, anchor_flat))
    metrics.update(policy_preference_metrics(cfg, policy, settings))
    return dict(sorted(metrics.items())), anchor_cached
