"""What the train stage and the comparison share: the training fingerprint, loading the policy, the
TrainingArguments, building the MRPOTrainer over prepared data and stored scores, and saving the policy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from mrpo.config.schema import Config, ConfigError
from mrpo.core.objective import Objective
from mrpo.data.preference import PreferenceCollator, PreferenceDataset, build_preference_dataset
from mrpo.data.prepared import SPLITS, read_split
from mrpo.data.scorefile import load_reference_scores
from mrpo.errors import ScoreDataError, TrainingError
from mrpo.runtime import resolve_device
from mrpo.training.policy import (
    load_policy,
)
from mrpo.training.steps import optimizer_steps, trainer_arguments
from mrpo.training.trainer import MRPOTrainer

log = logging.getLogger("mrpo")


def training_arguments(
    cfg: Config,
    device: torch.device,
    has_eval: bool,
    total_steps: int,
    precision: torch.dtype = torch.float32,
) -> TrainingArguments:
    """`precision` is the anchor's scoring precision: MRPOTrainer runs the policy's forward in it on any
    device; on CUDA accelerate autocasts (bf16) or scales the loss (fp16) as well."""
    t = cfg.train
    return trainer_arguments(
        t,
        cfg.seed,
        device,
        total_steps,
        eval_steps=t.eval_steps if has_eval else None,
        gradient_checkpointing=t.gradient_checkpointing,
        precision=precision,
        report_to=list(t.report_to) or "none",  # TensorBoard: event files under <checkpoint_dir>/runs
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
        raise ScoreDataError(
            f"{cfg.score.output_dir}/{cfg.anchor.name}.parquet: unknown scoring dtype {recorded!r}; "
            f"re-run `mrpo score --reference {cfg.anchor.name}`"
        )
    return getattr(torch, recorded)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


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
    """Check and join the K score files with the prepared splits, tokenize them,
    fit offline weighting on val."""
    from mrpo.core.weighting import make_strategy
    from mrpo.data.prepared import prepared_digest
    from mrpo.modeling.models import load_tokenizer

    t = cfg.train
    names = [r.name for r in cfg.training_references()]
    digest = prepared_digest(cfg.data.output_dir)
    scores = load_reference_scores(cfg.score.output_dir, names, digest)
    anchor_meta = next((s.metadata for s in scores if s.name == cfg.anchor.name), None)
    precision = scoring_precision(anchor_meta, cfg)
    _warn_if_scored_differently(cfg, anchor_meta, precision)
    tokenizer = load_tokenizer(cfg.anchor)
    datasets = _tokenized_splits(cfg, scores, tokenizer)
    log.info(
        "train: objective %s, references %s, strategy %s; "
        "pairs train %d / val %d / test %d (skipped %d / %d / %d)",
        t.objective,
        names,
        t.strategy,
        *(len(datasets[s]) for s in SPLITS),
        *(datasets[s].skipped for s in SPLITS),
    )

    strategy = make_strategy(
        t.strategy, len(names), fixed_weights=t.fixed_weights, window_size=t.window_size, seed=cfg.seed
    )
    if strategy.fitted_on_validation and len(datasets["val"]) == 0:
        raise ConfigError(
            f"train.strategy {t.strategy!r} is fitted on the validation split, which is empty; "
            "set data.val_fraction > 0 or choose another strategy"
        )
    strategy.fit(datasets["val"].reference_margins())
    log.info("train: %s", describe_strategy_weights(strategy, names))
    fingerprint = training_fingerprint(cfg, {s.name: s.sha256 for s in scores}, digest)
    return TrainingSetup(names, scores, digest, tokenizer, datasets, strategy, fingerprint, precision)


def _warn_if_scored_differently(cfg: Config, anchor_meta: dict | None, precision: torch.dtype) -> None:
    """Why step 0 would not start at zero implicit reward: the anchor was scored with another max_length or,
    by an earlier mrpo, in pure low-precision weights."""
    t = cfg.train
    if anchor_meta is not None and anchor_meta.get("max_length") not in (None, t.max_length):
        log.warning(
            "train: train.max_length=%d differs from the anchor's scoring max_length=%s; "
            "pairs cut differently will not start at zero implicit reward",
            t.max_length,
            anchor_meta.get("max_length"),
        )
    if anchor_meta is not None and precision != torch.float32 and "weights_dtype" not in anchor_meta:
        log.warning(
            "train: the anchor was scored in pure %s weights by an earlier mrpo; "
            "the policy's forward (fp32 weights, autocast) differs slightly, "
            "so step-0 rewards are not 0: re-run `mrpo score --reference %s`",
            str(precision).removeprefix("torch."),
            cfg.anchor.name,
        )


def _tokenized_splits(cfg: Config, scores, tokenizer) -> dict[str, PreferenceDataset]:
    """Every prepared split joined with its stored scores and tokenized; refused when nothing can train."""
    t = cfg.train
    datasets: dict[str, PreferenceDataset] = {}
    for split in SPLITS:
        pairs = read_split(cfg.data.output_dir, split)
        datasets[split] = build_preference_dataset(
            pairs, split, scores, tokenizer, max_length=t.max_length, chat_template=cfg.anchor.chat_template
        )
    if len(datasets["train"]) == 0:
        raise TrainingError(
            f"{cfg.data.output_dir}/train.parquet: no trainable pairs: "
            f"{datasets['train'].skipped_summary()}; raise score.max_length and train.max_length "
            f"(now {cfg.score.max_length} and {t.max_length}) or lower "
            "data.max_chars, then re-run"
        )
    return datasets


def build_trainer(
    cfg: Config, setup: TrainingSetup, *, callbacks: Sequence[TrainerCallback] = (), model=None
) -> MRPOTrainer:
    """An MRPOTrainer over the setup's train split (validation on val);
    the policy is `model` or loaded from the anchor."""
    device = resolve_device(cfg.train.device)
    has_eval = len(setup.datasets["val"]) > 0
    return MRPOTrainer(
        model=model if model is not None else load_policy(cfg, device),
        args=training_arguments(
            cfg,
            device,
            has_eval,
            optimizer_steps(cfg.train, len(setup.datasets["train"]), _world_size()),
            setup.precision,
        ),
        data_collator=PreferenceCollator(setup.tokenizer.pad_token_id),
        train_dataset=setup.datasets["train"],
        eval_dataset=setup.datasets["val"] if has_eval else None,
        processing_class=setup.tokenizer,
        callbacks=list(callbacks),
        objective=Objective.from_train_config(cfg.train),
        strategy=setup.strategy,
        reference_names=setup.names,
        precision=setup.precision,
        batching=cfg.train.batching,
        logprob_chunk=cfg.train.logprob_chunk,
    )


def evaluate_before_training(
    cfg: Config, setup: TrainingSetup, model
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """`<split>_<metric>_before` on val and test for the untrained policy, and Trainer's own metrics per split
    (for the step-0 point of the MLflow curves), leaving `model` ready for DDP training.

    Evaluation prepares the model with accelerate, which marks it `_is_accelerate_prepared`; a later
    `Trainer.train()` then skips the DDP wrap, so ranks stop averaging gradients and silently diverge
    (measured: 2 gloo ranks drifted apart from step 1). So evaluate with a throw-away Trainer (its own
    Accelerator) and clear the mark afterwards.
    """
    from transformers.integrations import TensorBoardCallback

    probe = build_trainer(cfg, setup, model=model)
    probe.remove_callback(TensorBoardCallback)  # outside training it would write to ./runs
    metrics: dict[str, float] = {}
    raw: dict[str, dict[str, float]] = {}
    for split in ("val", "test"):
        if len(setup.datasets[split]):
            raw[split] = probe.evaluate(setup.datasets[split], metric_key_prefix=split)
            metrics.update(flat_eval_metrics(raw[split], split, "before"))
    if getattr(model, "_is_accelerate_prepared", False):
        del model._is_accelerate_prepared
    return metrics, raw


# Trainer's evaluation bookkeeping: wall-clock noise, not curves worth plotting.
_TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")


def training_fingerprint(cfg: Config, score_sha256: dict[str, str], prepared_digest: str) -> str:
    """What decides the training trajectory; checkpoints are only resumed when it is unchanged.

    Output paths, logging and evaluation intervals are left out: they do not change the weights.
    """
    t = cfg.train
    ignored = {
        "output_dir",
        "checkpoint_dir",
        "metrics_file",
        "plots_file",
        "plots_dir",
        "eval_steps",
        "logging_steps",
        "save_steps",
        "report_to",
        "push_to_hub",
    }
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
    """`<prefix>_rewards/accuracy` -> `<prefix>_reward_accuracy_<suffix>` and the like,
    for metrics/train.json."""
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


def format_weights(names: Sequence[str], weights: Sequence[float]) -> str:
    return ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights, strict=True))


def static_weights(strategy, k: int) -> list[float] | None:
    """The weights of a strategy that uses one vector for every pair and step (uniform, fixed, fitted on
    validation); None for one that learns online or weighs each pair by its own margins."""
    if strategy.online:
        return None
    weights = strategy.weights(torch.zeros(1, k, dtype=torch.float64))
    return weights.tolist() if weights.dim() == 1 else None


def describe_strategy_weights(strategy, names: Sequence[str]) -> str:
    """The reference weights as the run starts, in words: fixed or fitted ones by value, others by how they
    move."""
    weights = static_weights(strategy, len(names))
    if weights is not None:
        how = "fitted on the validation split" if strategy.fitted_on_validation else "fixed"
        return f"reference weights ({strategy.name}, {how}): {format_weights(names, weights)}"
    if strategy.online:
        return (
            f"reference weights ({strategy.name}) are learned during training; "
            "the final ones are logged at the end"
        )
    return (
        f"reference weights ({strategy.name}) are set per pair from its margins; "
        "their means are logged at the end"
    )
