"""Step counts and the TrainingArguments shared by every stage that trains; imports nothing of the
objective."""

from __future__ import annotations

import math

import torch
from transformers import TrainingArguments


def optimizer_steps(t, train_pairs: int, world_size: int = 1) -> int:
    """Optimizer steps the run will take, as Trainer counts them:
    `max_steps`, else epochs x steps per epoch."""
    if t.max_steps > 0:
        return t.max_steps
    batches = math.ceil(train_pairs / (t.batch_size * world_size))
    per_epoch = batches // t.gradient_accumulation_steps + int(batches % t.gradient_accumulation_steps > 0)
    return math.ceil(t.num_epochs * per_epoch)


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """`train.warmup_ratio` of the run in whole steps
    (Trainer reads a float >= 1 as a step count, so 1.0 would be one step)."""
    return math.ceil(warmup_ratio * total_steps)


# transformers renamed TrainingArguments.gradient_checkpointing to activation_checkpointing after 5.17
# (which has only the old name and refuses the new; where both exist the old is deprecated): use whichever
# this one has.
CHECKPOINTING_ARG = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


def trainer_arguments(
    knobs,
    seed: int,
    device: torch.device,
    total_steps: int,
    *,
    eval_steps: int | None = None,
    gradient_checkpointing: bool = False,
    precision: torch.dtype = torch.float32,
    report_to: list[str] | str = "none",
) -> TrainingArguments:
    """Trainer's arguments from a stage's knobs (`train` or `sft`: the names they share); no evaluation
    without `eval_steps`. `precision` lets accelerate autocast (bf16) or add its loss scaler (fp16), on CUDA
    only; `total_steps` turns the knobs' `warmup_ratio` into steps."""
    return TrainingArguments(
        output_dir=knobs.checkpoint_dir,
        per_device_train_batch_size=knobs.batch_size,
        per_device_eval_batch_size=knobs.batch_size,
        gradient_accumulation_steps=knobs.gradient_accumulation_steps,
        learning_rate=knobs.learning_rate,
        lr_scheduler_type=knobs.lr_scheduler,
        warmup_steps=warmup_steps(knobs.warmup_ratio, total_steps),
        weight_decay=knobs.weight_decay,
        num_train_epochs=knobs.num_epochs,
        max_steps=knobs.max_steps,
        logging_steps=knobs.logging_steps,
        eval_strategy="no" if eval_steps is None else "steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=knobs.save_steps,
        seed=seed,
        data_seed=seed,
        **{CHECKPOINTING_ARG: gradient_checkpointing},
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda" and precision == torch.bfloat16,
        fp16=device.type == "cuda" and precision == torch.float16,
        report_to=report_to,
        remove_unused_columns=False,
    )
