"""The `train` stage: MRPO on the prepared pairs and the K stored score files; never loads a reference model.

Outputs (paths from params.yaml `train`): the policy (safetensors + tokenizer,
written to a temp dir and swapped in, so a failed run leaves the previous one),
metrics JSON, a per-step CSV for `dvc plots`, checkpoints (a rerun with the same
configuration resumes from the latest) and one MLflow run (see mrpo.tracking).
Launch on several processes with `torchrun --nproc_per_node N -m mrpo.cli train`
or `accelerate launch -m mrpo.cli train`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from mrpo.config import Config
from mrpo.data import SPLITS
from mrpo.errors import ScoreDataError
from mrpo.runtime import resolve_device, seed_everything
from mrpo.trainer import (
    MRPOTrainer,
    ObjectiveSettings,
    PreferenceCollator,
    PreferenceDataset,
    build_preference_dataset,
    load_reference_scores,
)

log = logging.getLogger("mrpo")

RUN_STATE_FILE = "mrpo_run.json"  # in the checkpoint dir: config fingerprint + MLflow run id
_OFFLINE_STRATEGIES = ("vdw", "vaw")
# Trainer's evaluation bookkeeping: wall-clock noise, not curves worth plotting.
_TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")


# ---------------------------------------------------------------- small pure pieces


def training_fingerprint(cfg: Config, score_sha256: dict[str, str], prepared_digest: str) -> str:
    """What decides the training trajectory; checkpoints are only resumed when it is unchanged.

    Output paths, logging and evaluation intervals are left out: they do not change the weights.
    """
    t = cfg.train
    ignored = {"output_dir", "checkpoint_dir", "metrics_file", "plots_file", "eval_steps", "logging_steps", "save_steps"}
    train = {k: v for k, v in _asdict(t).items() if k not in ignored}
    payload = {
        "seed": cfg.seed,
        "train": train,
        "anchor": _asdict(cfg.anchor),
        "references": [r.name for r in cfg.training_references()],
        "scores": score_sha256,
        "prepared_digest": prepared_digest,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _asdict(obj) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def flat_eval_metrics(metrics: dict[str, float], prefix: str, suffix: str) -> dict[str, float]:
    """`<prefix>_rewards/accuracy` -> `<prefix>_reward_accuracy_<suffix>` and the like, for metrics/train.json."""
    names = {
        "rewards/accuracy": "reward_accuracy",
        "rewards/margin": "reward_margin",
        "rewards/chosen": "reward_chosen",
        "rewards/rejected": "reward_rejected",
        "loss": "loss",
    }
    out = {}
    for key, name in names.items():
        value = metrics.get(f"{prefix}_{key}")
        if value is not None:
            out[f"{prefix}_{name}_{suffix}"] = float(value)
    return out


def plot_rows(log_history: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per step from Trainer's log history: training curves, with validation columns where evaluated."""
    by_step: dict[int, dict[str, Any]] = {}
    skip = {"epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"}
    for entry in log_history:
        step = int(entry.get("step", 0))
        row = by_step.setdefault(step, {"step": step})
        for key, value in entry.items():
            if key in skip or key == "step" or key.endswith(_TIMING_SUFFIXES) or not isinstance(value, int | float):
                continue
            row[key] = value
    rows = [by_step[s] for s in sorted(by_step)]
    columns = ["step"] + sorted({k for r in rows for k in r} - {"step"})
    return columns, rows


def write_plots_csv(path: str | Path, log_history: list[dict[str, Any]]) -> None:
    columns, rows = plot_rows(log_history)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_json_atomically(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def swap_directory(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp` with two renames, so `final` is never half-written."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- checkpoints


def resume_point(checkpoint_dir: Path, fingerprint: str) -> tuple[str | None, str | None]:
    """(latest checkpoint to resume from, MLflow run id) when the checkpoint dir belongs to this configuration.

    Checkpoints of a different configuration are removed (with a warning): resuming them would
    silently mix two experiments.
    """
    state_file = checkpoint_dir / RUN_STATE_FILE
    if not state_file.is_file():
        return None, None
    state = json.loads(state_file.read_text())
    if state.get("fingerprint") != fingerprint:
        stale = [p for p in checkpoint_dir.glob("checkpoint-*") if p.is_dir()]
        if stale:
            log.warning("train: %d checkpoint(s) in %s are from a different configuration; starting over",
                        len(stale), checkpoint_dir)
        for p in stale:
            shutil.rmtree(p)
        return None, None
    last = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    return last, state.get("mlflow_run_id")


# ---------------------------------------------------------------- the policy


def load_policy(cfg: Config, device: torch.device):
    """The anchor as a trainable causal LM: full fine-tuning, or a LoRA adapter on it (peft)."""
    from mrpo.models import disable_dropout, load_model

    # fp32 master weights; on CUDA the Trainer runs the forward in bf16 autocast.
    model = load_model(cfg.anchor, device="cpu", dtype=torch.float32)
    if cfg.train.disable_dropout:
        # Before LoRA wraps it: an adapter's own dropout (train.lora.dropout) is the user's explicit choice.
        n = disable_dropout(model)
        if n:
            log.info("train: disabled %d dropout layer(s) of the policy (train.disable_dropout)", n)
    model.train()
    lora = cfg.train.lora
    if lora.enabled:
        from peft import LoraConfig, get_peft_model

        peft_cfg = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules) if lora.target_modules else None,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_cfg)
        if cfg.train.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        trainable, total = model.get_nb_trainable_parameters()
        log.info("train: LoRA r=%d on %s: %d of %d parameters trainable", lora.r,
                 sorted(model.peft_config["default"].target_modules), trainable, total)
    return model


def save_policy(model, tokenizer, out_dir: Path, *, merge_lora: bool) -> None:
    """safetensors + tokenizer; a LoRA policy is merged into plain weights when `merge_lora`, else saved as an adapter."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and merge_lora:
        model = model.merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------- the stage


def training_arguments(
    cfg: Config, device: torch.device, has_eval: bool, precision: torch.dtype = torch.float32
) -> TrainingArguments:
    """`precision` is the anchor's scoring precision; MRPOTrainer runs the policy's forward in it on any device,
    these flags only let accelerate add its loss scaler (fp16) and autocast on CUDA as well."""
    t = cfg.train
    return TrainingArguments(
        output_dir=t.checkpoint_dir,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=float(t.warmup_ratio),
        weight_decay=t.weight_decay,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        activation_checkpointing=t.gradient_checkpointing,
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda" and precision == torch.bfloat16,
        fp16=device.type == "cuda" and precision == torch.float16,
        report_to="none",
        remove_unused_columns=False,
    )


def scoring_precision(anchor_meta: dict | None, cfg: Config) -> torch.dtype:
    """The precision the anchor was scored in (its score file's `dtype`), so the policy's step-0 forward
    reproduces those scores; without the anchor's file (objective dpo against another reference), what
    score.dtype resolves to on the training device."""
    recorded = (anchor_meta or {}).get("dtype")
    if recorded is None:
        from mrpo.runtime import resolve_dtype

        return resolve_dtype(cfg.score.dtype, resolve_device(cfg.train.device))
    if recorded not in ("float32", "bfloat16", "float16"):
        raise ScoreDataError(f"{cfg.score.output_dir}/{cfg.anchor.name}.parquet: unknown scoring dtype {recorded!r}; "
                             f"re-run `mrpo score --reference {cfg.anchor.name}`")
    return getattr(torch, recorded)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class TrainingSetup:
    """Everything the stage reads before building a Trainer: scores, tokenized splits, the fitted strategy."""

    names: list[str]
    scores: list
    prepared_digest: str
    tokenizer: Any
    datasets: dict[str, PreferenceDataset]
    strategy: Any
    fingerprint: str
    precision: torch.dtype = torch.float32  # the anchor's scoring precision: the policy's forward runs in it


def prepare_training(cfg: Config) -> TrainingSetup:
    """Check and join the K score files with the prepared splits, tokenize them, fit offline weighting on val."""
    from mrpo.data import prepared_digest
    from mrpo.models import load_tokenizer
    from mrpo.weighting import make_strategy

    t = cfg.train
    names = [r.name for r in cfg.training_references()]
    digest = prepared_digest(cfg.data.output_dir)
    scores = load_reference_scores(cfg.score.output_dir, names, digest)
    anchor_meta = next((s.metadata for s in scores if s.name == cfg.anchor.name), None)
    if anchor_meta is not None and anchor_meta.get("max_length") not in (None, t.max_length):
        log.warning("train: train.max_length=%d differs from the anchor's scoring max_length=%s; pairs cut differently "
                    "will not start at zero implicit reward", t.max_length, anchor_meta.get("max_length"))

    precision = scoring_precision(anchor_meta, cfg)
    if anchor_meta is not None and precision != torch.float32 and "weights_dtype" not in anchor_meta:
        log.warning("train: the anchor was scored in pure %s weights by an earlier mrpo; the policy's forward (fp32 "
                    "weights, autocast) differs slightly, so step-0 rewards are not 0: re-run `mrpo score --reference "
                    "%s`", str(precision).removeprefix("torch."), cfg.anchor.name)
    tokenizer = load_tokenizer(cfg.anchor)
    datasets: dict[str, PreferenceDataset] = {}
    for split in SPLITS:
        pairs = pd.read_parquet(Path(cfg.data.output_dir) / f"{split}.parquet")
        datasets[split] = build_preference_dataset(
            pairs, split, scores, tokenizer, max_length=t.max_length, chat_template=cfg.anchor.chat_template
        )
    if len(datasets["train"]) == 0:
        raise ValueError(f"{cfg.data.output_dir}/train.parquet: no trainable pairs (after skipping non-fitting ones)")
    log.info("train: objective %s, references %s, strategy %s; pairs train %d / val %d / test %d (skipped %d / %d / %d)",
             t.objective, names, t.strategy, *(len(datasets[s]) for s in SPLITS), *(datasets[s].skipped for s in SPLITS))

    strategy = make_strategy(t.strategy, len(names), fixed_weights=t.fixed_weights, window_size=t.window_size,
                             seed=cfg.seed)
    if t.strategy in _OFFLINE_STRATEGIES and len(datasets["val"]) == 0:
        raise ValueError(f"train.strategy {t.strategy!r} is fitted on the validation split, which is empty; "
                         "set data.val_fraction > 0 or choose another strategy")
    strategy.fit(datasets["val"].reference_margins())
    fingerprint = training_fingerprint(cfg, {s.name: s.sha256 for s in scores}, digest)
    return TrainingSetup(names, scores, digest, tokenizer, datasets, strategy, fingerprint, precision)


def build_trainer(
    cfg: Config, setup: TrainingSetup, *, callbacks: Sequence[TrainerCallback] = (), model=None
) -> MRPOTrainer:
    """An MRPOTrainer over the setup's train split (validation on val); the policy is `model` or loaded from the anchor."""
    device = resolve_device(cfg.train.device)
    has_eval = len(setup.datasets["val"]) > 0
    return MRPOTrainer(
        model=model if model is not None else load_policy(cfg, device),
        args=training_arguments(cfg, device, has_eval, setup.precision),
        data_collator=PreferenceCollator(setup.tokenizer.pad_token_id),
        train_dataset=setup.datasets["train"],
        eval_dataset=setup.datasets["val"] if has_eval else None,
        processing_class=setup.tokenizer,
        callbacks=list(callbacks),
        objective=ObjectiveSettings.from_config(cfg.train),
        strategy=setup.strategy,
        reference_names=setup.names,
        precision=setup.precision,
    )


def evaluate_before_training(cfg: Config, setup: TrainingSetup, model) -> dict[str, float]:
    """`<split>_<metric>_before` on val and test for the untrained policy, leaving `model` ready for DDP training.

    Evaluation prepares the model with accelerate, which marks it `_is_accelerate_prepared`; a later
    `Trainer.train()` then skips the DDP wrap, so ranks stop averaging gradients and silently diverge
    (measured: 2 gloo ranks drifted apart from step 1). So evaluate with a throw-away Trainer (its own
    Accelerator) and clear the mark afterwards.
    """
    probe = build_trainer(cfg, setup, model=model)
    metrics: dict[str, float] = {}
    for split in ("val", "test"):
        if len(setup.datasets[split]):
            before = probe.evaluate(setup.datasets[split], metric_key_prefix=split)
            metrics.update(flat_eval_metrics(before, split, "before"))
    if getattr(model, "_is_accelerate_prepared", False):
        del model._is_accelerate_prepared
    return metrics


def train(cfg: Config, *, callbacks: Sequence[TrainerCallback] = (), track: bool = True) -> dict[str, Any]:
    """Run the train stage end to end; returns the metrics it wrote to `train.metrics_file`."""
    from mrpo import tracking
    from mrpo.models import model_fingerprint

    t = cfg.train
    started = time.perf_counter()
    seed_everything(cfg.seed)
    setup = prepare_training(cfg)
    datasets, names, scores, digest = setup.datasets, setup.names, setup.scores, setup.prepared_digest
    checkpoint_dir = Path(t.checkpoint_dir)
    resume_from, mlflow_run_id = resume_point(checkpoint_dir, setup.fingerprint)

    run = None
    main = _is_main_process()
    if track and main:
        run = tracking.start_pipeline_run(cfg, resume_run_id=mlflow_run_id, tags={"mrpo.stage": "train"})
        tracking.log_config(run, cfg)
        reference_set = [
            {"name": s.name, "model": cfg.reference(s.name).model, **model_fingerprint(cfg.reference(s.name)),
             "score_file": str(s.path), "score_sha256": s.sha256, "prepared_digest": digest}
            for s in scores
        ]
        tracking.log_reference_set(run, reference_set)
    if main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomically(checkpoint_dir / RUN_STATE_FILE,
                              {"fingerprint": setup.fingerprint, "mlflow_run_id": run.run_id if run else None})

    trainer_callbacks = list(callbacks)
    if run is not None:
        trainer_callbacks.append(tracking.MLflowStepCallback(run))
    tokenizer = setup.tokenizer

    metrics: dict[str, Any] = {}
    try:
        trainer = build_trainer(cfg, setup, callbacks=trainer_callbacks)
        metrics.update(evaluate_before_training(cfg, setup, trainer.model))
        if resume_from:
            log.info("train: resuming from %s", resume_from)
        result = trainer.train(resume_from_checkpoint=resume_from)
        for split in ("val", "test"):
            if len(datasets[split]):
                after = trainer.evaluate(datasets[split], metric_key_prefix=split)
                metrics.update(flat_eval_metrics(after, split, "after"))
        history = trainer.state.log_history
        step_losses = [e["loss"] for e in history if "loss" in e]
        metrics.update({
            "final_loss": float(step_losses[-1]) if step_losses else float("nan"),
            "train_loss": float(result.training_loss),
            "steps": int(trainer.state.global_step),
            "train_pairs": len(datasets["train"]),
            "skipped_pairs": sum(d.skipped for d in datasets.values()),
            "references": len(names),
            "runtime_s": time.perf_counter() - started,
            "resumed": bool(resume_from),
        })
        tps = [e["tokens_per_second"] for e in history if "tokens_per_second" in e]
        if tps:
            metrics["tokens_per_second"] = float(sum(tps) / len(tps))

        if trainer.is_world_process_zero():
            out = Path(t.output_dir)
            tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                save_policy(trainer.model, tokenizer, tmp, merge_lora=t.lora.merge)
                if run is not None:
                    tracking.write_run_record(tmp, run)
                out.parent.mkdir(parents=True, exist_ok=True)
                swap_directory(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            write_json_atomically(t.metrics_file, metrics)
            write_plots_csv(t.plots_file, history)
            if run is not None:
                tracking.log_metrics(run, {f"final/{k}": v for k, v in metrics.items()}, step=trainer.state.global_step)
                tracking.record_policy(run, out)
                tracking.finish_run(run)
        trainer.accelerator.wait_for_everyone()
    except BaseException:
        if run is not None:
            tracking.finish_run(run, status="FAILED")
        raise
    log.info("train: done in %.0fs, %d steps; val reward accuracy %.3f -> %.3f; policy in %s",
             metrics["runtime_s"], metrics["steps"], metrics.get("val_reward_accuracy_before", float("nan")),
             metrics.get("val_reward_accuracy_after", float("nan")), t.output_dir)
    return metrics
