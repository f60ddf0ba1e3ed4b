"""The `train` stage: MRPO on the prepared pairs and the K stored score files; never loads a reference model.

Outputs (paths from params.yaml `train`): the policy (safetensors + tokenizer,
written to a temp dir and swapped in, so a failed run leaves the previous one),
metrics JSON, a per-step CSV for `dvc plots`, checkpoints and one MLflow run (see
mrpo.tracking). An interrupted run resumes from its newest complete checkpoint; a
finished one is trained again from scratch as a new run (see mrpo.training.checkpoints).
Training stops with an error at the first non-finite loss or gradient.
Launch on several processes with `torchrun --nproc_per_node N -m mrpo.cli train`
or `accelerate launch -m mrpo.cli train`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from mrpo.config.schema import Config
from mrpo.data.prepared import SPLITS
from mrpo.data.provenance import check_scored_inputs
from mrpo.io import write_json_atomically
from mrpo.preflight import check_stage
from mrpo.reporting.plots import (
    PNG_FILES,
    VALIDATION_COLUMNS,
    VALIDATION_FILE,
    render_pngs,
    validation_rows,
    with_smoothed,
    write_csv,
)
from mrpo.reporting.records import TRAIN_RECORD, train_headline
from mrpo.runtime import seed_everything
from mrpo.staging import StagedOutputs, recover, refuse_directories
from mrpo.training.checkpoints import RunState, resume_point, write_run_state
from mrpo.training.policy import check_finite_weights, is_main_process, save_policy, trained_policy
from mrpo.training.progress import mean_training_loss
from mrpo.training.setup import (
    _TIMING_SUFFIXES,
    TrainingSetup,
    build_trainer,
    evaluate_before_training,
    flat_eval_metrics,
    format_weights,
    prepare_training,
    static_weights,
)
from mrpo.training.trainer import MRPOTrainer

log = logging.getLogger("mrpo")


# ---------------------------------------------------------------- small pure pieces


# What differs from run to run on the same inputs (wall time, throughput): on the MLflow run and in the log,
# never in a DVC output, so reproducing the same inputs leaves dvc.lock and git unchanged.
TIMINGS = ("runtime_s", "tokens_per_second")


def reproducible_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """The training record without its timings."""
    return {k: v for k, v in metrics.items() if k not in TIMINGS}


def plot_rows(log_history: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per step from Trainer's log history:
    training curves, with validation columns where evaluated."""
    by_step: dict[int, dict[str, Any]] = {}
    skip = {
        "epoch",
        "total_flos",
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
        "train_loss",
        *TIMINGS,
    }
    for entry in log_history:
        step = int(entry.get("step", 0))
        row = by_step.setdefault(step, {"step": step})
        for key, value in entry.items():
            if (
                key in skip
                or key == "step"
                or key.endswith(_TIMING_SUFFIXES)
                or not isinstance(value, int | float)
            ):
                continue
            row[key] = value
    rows = [by_step[s] for s in sorted(by_step)]
    columns = ["step"] + sorted({k for r in rows for k in r} - {"step"})
    return columns, rows


def train_outputs(cfg: Config) -> dict[Path, str]:
    """Every file and directory the train stage replaces, all together (see mrpo.staging), and its key."""
    from mrpo.tracking.store import run_record_path

    t = cfg.train
    plots = Path(t.plots_dir)
    return {
        Path(t.output_dir): "train.output_dir",
        run_record_path(t.output_dir): "train.output_dir",
        Path(t.metrics_file): "train.metrics_file",
        Path(t.plots_file): "train.plots_file",
        plots / VALIDATION_FILE: "train.plots_dir",
        **{plots / name: "train.plots_dir" for name in PNG_FILES},
    }


def write_plots(
    cfg: Config, log_history: list[dict[str, Any]], metrics: dict[str, Any], names, staged: StagedOutputs
) -> list[Path]:
    """The curves, staged: `train.plots_file` (per logging step, with trailing means),
    `<train.plots_dir>/validation.csv` (the periodic validation evaluations, step 0 the untrained policy) and
    their PNG renders; returns their final paths."""
    t = cfg.train
    plots = Path(t.plots_dir)
    columns, rows = with_smoothed(*plot_rows(log_history))
    write_csv(staged.file(t.plots_file), columns, rows)
    validation = validation_rows(rows, metrics)
    write_csv(staged.file(plots / VALIDATION_FILE), VALIDATION_COLUMNS, validation)
    title = t.objective + (f" ({t.strategy})" if t.objective != "dpo" else "")
    pngs = render_pngs(staged.scratch(plots / PNG_FILES[0]), rows, validation, names, title)
    for png in pngs:
        staged.adopt(png, plots / png.name)
    return [Path(t.plots_file), plots / VALIDATION_FILE, *(plots / png.name for png in pngs)]


def final_weights(log_history: list[dict[str, Any]], names: Sequence[str]) -> dict[str, float]:
    """`weight/<reference>`: the mean weights of the last logging interval, as the curves show them last."""
    for entry in reversed(log_history):
        if all(f"weight/{n}" in entry for n in names):
            return {f"weight/{n}": float(entry[f"weight/{n}"]) for n in names}
    return {}


# ---------------------------------------------------------------- the stage


def train(cfg: Config, *, callbacks: Sequence[TrainerCallback] = (), track: bool = True) -> dict[str, Any]:
    """Run the train stage end to end; returns the metrics it wrote to `train.metrics_file`."""
    from mrpo.tracking.tracker import pipeline_run_start, tracked_run

    t = cfg.train
    check_stage(cfg, "train")
    check_scored_inputs(cfg, "train")  # references unchanged since scoring, the anchor's tokens alike
    main = is_main_process()
    if main:
        outputs = train_outputs(cfg)
        recover(outputs)  # a run killed while swapping its outputs in: the previous set back
        refuse_directories({p: key for p, key in outputs.items() if p != Path(t.output_dir)})
    started = time.perf_counter()
    seed_everything(cfg.seed)
    setup = prepare_training(cfg)
    checkpoint_dir = Path(t.checkpoint_dir)
    start = resume_point(
        checkpoint_dir, setup.fingerprint, clean=main
    )  # ranks of one job share the directory

    with tracked_run(cfg, enabled=track and main, **pipeline_run_start(cfg, start.mlflow_run_id)) as run:
        if main:
            write_run_state(checkpoint_dir, RunState(setup.fingerprint, run.run_id))
        references = reference_records(cfg, setup) if main else []  # hashes local models: once, on rank 0
        _log_inputs(cfg, setup, run, references)
        trainer, metrics = _train_and_evaluate(cfg, setup, start, callbacks, run)
        metrics["runtime_s"] = time.perf_counter() - started
        policy = trained_policy(cfg, trainer)  # every rank: under FSDP it gathers the shards
        if main:
            _write_outputs(cfg, setup, trainer, policy, metrics, run, references)
            write_run_state(checkpoint_dir, RunState(setup.fingerprint, run.run_id, completed=True))
    _log_done(cfg, setup, metrics)
    return metrics


def _log_done(cfg: Config, setup: TrainingSetup, metrics: dict[str, Any]) -> None:
    t = cfg.train
    weights = {k.removeprefix("weight/"): v for k, v in metrics.items() if k.startswith("weight/")}
    if weights and static_weights(setup.strategy, len(setup.names)) is None:
        shown = format_weights(list(weights), list(weights.values()))
        log.info(
            "train: reference weights at the end (%s, mean of the last logged steps): %s", t.strategy, shown
        )
    log.info(
        "train: done in %.0fs, %d steps; val reward accuracy %.3f -> %.3f; policy in %s",
        metrics["runtime_s"],
        metrics["steps"],
        metrics.get("val_reward_accuracy_before", float("nan")),
        metrics.get("val_reward_accuracy_after", float("nan")),
        t.output_dir,
    )


def reference_records(cfg: Config, setup: TrainingSetup) -> list[dict[str, Any]]:
    """Per training reference: name, model, revision or content hash, score file and its sha256."""
    from mrpo.modeling.models import model_fingerprint

    return [
        {
            "name": s.name,
            "model": cfg.reference(s.name).model,
            **model_fingerprint(cfg.reference(s.name)),
            "score_file": str(s.path),
            "score_sha256": s.sha256,
            "prepared_digest": setup.prepared_digest,
        }
        for s in setup.scores
    ]


def _log_inputs(cfg: Config, setup: TrainingSetup, run, references: list[dict[str, Any]]) -> None:
    """Every param, the reference set (`reference_set.<name>.<key>` params and reference_set.json), the
    lineage known before training, the prepared splits as datasets."""
    from mrpo.tracking import lineage
    from mrpo.tracking.names import run_params

    run.log_params(run_params(cfg))
    run.log_params(
        {
            f"reference_set.{ref['name']}.{key}": value
            for ref in references
            for key, value in ref.items()
            if key != "name" and value is not None
        }
    )
    run.log_dict({"references": references}, "reference_set.json")
    run.set_tags(
        {
            **lineage.start_tags(cfg),  # a resumed run: the state it resumed in
            "mrpo.prepared_digest": setup.prepared_digest,
            "mrpo.train_fingerprint": setup.fingerprint,
            **{f"mrpo.reference.{r['name']}.score_sha256": r["score_sha256"] for r in references},
        }
    )
    run.log_datasets(cfg.data.output_dir, setup.prepared_digest)


def _train_and_evaluate(cfg: Config, setup: TrainingSetup, start, callbacks, run) -> tuple[MRPOTrainer, dict]:
    """Validation and test metrics before, the training itself, the same metrics after."""
    from mrpo.tracking.callback import MLflowStepCallback, log_evaluation

    datasets = setup.datasets
    trainer = build_trainer(cfg, setup, callbacks=[*callbacks, MLflowStepCallback(run)])
    metrics, before = evaluate_before_training(cfg, setup, trainer.model)
    if not start.checkpoint:  # a resumed run logged its step-0 point already
        for split_metrics in before.values():
            log_evaluation(run, split_metrics, step=0)
    if start.checkpoint:
        log.info("train: resuming from %s", start.checkpoint)
    trainer.train(resume_from_checkpoint=str(start.checkpoint) if start.checkpoint else None)
    for split in ("val", "test"):
        if len(datasets[split]):
            after = trainer.evaluate(datasets[split], metric_key_prefix=split)
            metrics.update(flat_eval_metrics(after, split, "after"))
    history = trainer.state.log_history
    step_losses = [e["loss"] for e in history if "loss" in e]
    tps = [e["tokens_per_second"] for e in history if "tokens_per_second" in e]
    metrics.update(
        {
            "final_loss": float(step_losses[-1]) if step_losses else None,
            "train_loss": mean_training_loss(history),
            "steps": int(trainer.state.global_step),
            "train_pairs": len(datasets["train"]),
            "skipped_pairs": sum(d.skipped for d in datasets.values()),
            "references": len(setup.names),
            "resumed": start.checkpoint is not None,
            **({"tokens_per_second": float(sum(tps) / len(tps))} if tps else {}),
            **final_weights(history, setup.names),
        }
    )
    trainer.accelerator.wait_for_everyone()
    return trainer, metrics


def _write_outputs(
    cfg: Config, setup: TrainingSetup, trainer: MRPOTrainer, policy, metrics: dict[str, Any], run, references
) -> None:
    """Every output staged first (the policy with its model card, checked finite, the run record, metrics and
    curves), swapped in together once the MLflow record is written too: a failure anywhere before puts back
    every previous output. Then the upload, when `train.push_to_hub` is enabled."""
    from mrpo.reporting import modelcard
    from mrpo.tracking.store import run_record_path

    t = cfg.train
    out = Path(t.output_dir)
    check_finite_weights(policy, out)
    card = modelcard.model_card(
        cfg,
        references=references,
        prepared_digest=setup.prepared_digest,
        pairs={split: len(setup.datasets[split]) for split in SPLITS},
        metrics=metrics,
        tracked=bool(run),
        run_name=run.run_name,
    )
    with StagedOutputs() as staged:
        tmp = staged.directory(out)
        save_policy(policy, setup.tokenizer, tmp, merge_lora=t.lora.merge)
        (tmp / modelcard.CARD).write_text(card, encoding="utf-8")
        write_json_atomically(tmp / TRAIN_RECORD, reproducible_record(metrics))
        records = staged.scratch(out)
        run.write_record(records / out.name, policy=tmp)
        if run_record_path(records / out.name).is_file():
            staged.adopt(run_record_path(records / out.name), run_record_path(out))
        write_json_atomically(staged.file(t.metrics_file), train_headline(metrics))
        write_plots(cfg, trainer.state.log_history, metrics, trainer.reference_names, staged)
        staged.commit()
        _record_outputs(cfg, run, metrics, trainer.state.global_step)
    if t.push_to_hub.enabled:  # after the outputs stand: a failed upload keeps the policy saved locally
        url = modelcard.push_to_hub(t.push_to_hub, out, f"mrpo train: {run.run_name or t.objective}")
        run.set_tags({"mrpo.hub_commit": url})


def _record_outputs(cfg: Config, run, metrics: dict[str, Any], step: int) -> None:
    """The run's totals (the before/after split metrics are the eval_*/test_* curves' first and last points),
    headline scores as tags, the logged policy model, the curves and metrics file as artifacts."""
    from mrpo.reporting import modelcard
    from mrpo.tracking import lineage, names

    totals = (names.TRAIN_LOSS, names.TRAIN_PAIRS, names.STEPS, "skipped_pairs", names.RUNTIME)
    run.log_metrics({k: metrics[k] for k in totals}, step=step)
    run.set_tags({"mrpo.resumed": str(metrics["resumed"])})
    run.set_tags(names.score_tags(metrics, lineage.TRAIN_SCORES))
    params = names.run_params(cfg)
    run.log_model(
        cfg.train.output_dir,
        params={f"train.{k}": params[f"train.{k}"] for k in modelcard.HYPERPARAMETERS},
        tags=names.key_tags(cfg),
        step=step,
        registered_model=cfg.tracking.registered_model,
    )
    lineage.record_training_outputs(cfg, run)
