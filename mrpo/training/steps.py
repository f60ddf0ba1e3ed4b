"""Step counts and TrainingArguments names shared by every stage that trains; imports nothing of the
objective."""

from __future__ import annotations

import math

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
