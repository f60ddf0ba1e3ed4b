"""Training progress from Trainer's logs, for every stage that trains (train, sft, the comparison): the
compact progress line or bar, logging at checkpoints, the run's mean loss. Imports nothing of the objective,
so a stage that only fine-tunes does not depend on it."""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

log = logging.getLogger("mrpo")


class LogAtCheckpoints(TrainerCallback):
    """Also log at every checkpoint and at the last step, so the logged losses cover every step, and a resumed
    run's mean training loss is over the whole run (see `mean_training_loss`)."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True
        return control


def progress_line(logs: dict[str, Any], prefix: str = "") -> str:
    """A few numbers of one Trainer log, formatted: `loss 0.6912  reward acc 0.562  margin 0.0123` (the keys
    present of loss, rewards/accuracy, rewards/margin and learning_rate; `prefix` selects eval_/val_ keys)."""
    shown = (
        ("loss", "loss", ".4f"),
        ("rewards/accuracy", "reward acc", ".3f"),
        ("rewards/margin", "margin", ".4f"),
    )
    parts = [f"{label} {logs[prefix + key]:{fmt}}" for key, label, fmt in shown if prefix + key in logs]
    if not prefix and "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    return "  ".join(parts)


class CompactProgress(TrainerCallback):
    """Training progress a person can read: on a terminal a bar showing the latest loss and reward accuracy;
    elsewhere (DVC, CI, Prefect logs) one line about every 5% of the run, and one per evaluation."""

    def __init__(self, lines: int = 20, tty: bool | None = None, stage: str = "train"):
        self.stage = stage
        self.lines = lines
        self.tty = tty
        self.bar = None
        self._printed_step = 0
        self._ended = False

    def on_train_begin(self, args, state, control, **kwargs):
        tty = self.tty if self.tty is not None else sys.stderr.isatty()
        if state.is_world_process_zero and tty:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.stage, unit="step")
        self._printed_step = state.global_step
        self._ended = False
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return control  # train_runtime: Trainer's end-of-run totals, said better by the stage
        step, total = state.global_step, state.max_steps
        if "loss" in logs:
            line = progress_line(logs)
            if self.bar is not None:
                self.bar.set_postfix_str(line, refresh=False)
            elif step - self._printed_step >= max(1, total // self.lines) or step >= total:
                self._printed_step = step
                log.info("%s: step %d/%d  %s", self.stage, step, total, line)
            return control
        prefix = next((k.removesuffix("loss") for k in logs if k.endswith("_loss")), None)
        if prefix is not None:  # an evaluation: eval_ during training, val_/test_ before and after it
            split = {"eval_": "val"}.get(prefix, prefix.rstrip("_"))
            when = (
                "before training"
                if step == 0
                else "after training"
                if self._ended
                else f"step {step}/{total}"
            )
            message = f"{self.stage}: {when}  {split}: {progress_line(logs, prefix)}"
            (self.bar.write if self.bar is not None else log.info)(message)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._ended = True
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return control


def mean_training_loss(log_history: list[dict[str, Any]]) -> float:
    """Mean per-step training loss of the whole run, from Trainer's logs: each logged loss is the mean over
    the steps since the previous log, so weigh it by that span."""
    total, steps, previous = 0.0, 0, 0
    for entry in sorted((e for e in log_history if "loss" in e and "step" in e), key=lambda e: e["step"]):
        span = int(entry["step"]) - previous
        total += float(entry["loss"]) * span
        steps += span
        previous = int(entry["step"])
    return total / steps if steps else float("nan")
