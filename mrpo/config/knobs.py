"""`knob`: a dataclass field that carries its help, bounds and choices; and the closed lists of values the
schema's choices name. Imports nothing from mrpo: every module may read it.

`bounds` are what a number must be, in the words the error message uses: "> 0", ">= 1 (a number of steps)",
"in [0, 1)", "-1 (...) or >= 1"; `choices` the allowed strings (for a list, of each item).
"""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any

DATA_SOURCES = ("synthetic", "file", "hub", "gsm8k")
DATA_FORMATS = ("auto", "explicit", "conversational", "implicit")
ARCHITECTURES = ("llama", "gpt2")
TOKENIZER_KINDS = ("bpe", "char")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BATCHING = ("grouped", "padded", "packed")  # mrpo.training.batching
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies
MEMORY_DEVICES = ("cpu", "disk")  # besides GPU indices
SPLITS = ("train", "val", "test")  # mrpo.data.prepared.SPLITS, written out: the schema imports no data code
# The synthetic fact task's attributes and size (mrpo.data.synthetic.ATTRIBUTES / total_pairs(); written out
# so that validating params.yaml imports nothing else; tests/data/test_synthetic.py checks they agree).
ZOO_ATTRIBUTES = ("colour", "city", "food")
SYNTHETIC_MAX_PAIRS = 3456
# transformers' SchedulerType values, less those that need `lr_scheduler_kwargs` (params.yaml has no knob for
# them). Written out because importing the enum costs seconds (it pulls in torch); test_config checks it.
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "greedy",
)
LR_SCHEDULERS_NEEDING_KWARGS = ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
REPORT_TO = ("tensorboard",)  # Trainer integrations besides MLflow, which is always on
MAX_SEED = 2**32 - 1  # numpy's seed range
# `checked_by` of the settings the objective validates itself
OBJECTIVE = "the objective (mrpo.core.objective.Objective)"


def knob(
    default: Any = MISSING,
    help: str = "",
    *,
    bounds: str | tuple[str, ...] = (),
    choices: tuple[str, ...] = (),
    indexed: bool = False,
    checked_by: str | None = None,
    factory: Any = None,
) -> Any:
    """A dataclass field with its help, bounds and choices in its metadata. `indexed`: a list's bad item is
    named key[i]; `checked_by`: who checks it beyond its type (the objective, a cross-field rule)."""
    meta = {
        "help": help,
        "bounds": (bounds,) if isinstance(bounds, str) else tuple(bounds),
        "choices": tuple(choices),
        "indexed": indexed,
        "checked_by": checked_by,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)
