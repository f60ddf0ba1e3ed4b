"""The callbacks MRPOTrainer installs: the online strategy's and bco_pair's state in checkpoints, the
non-finite guard before each optimizer step, and compact progress for logs that are not a terminal.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mrpo.core.loss_types import RunningRewardMean
from mrpo.errors import TrainingError
from mrpo.io import jsonable
from mrpo.training.checkpoints import seal_checkpoint
from mrpo.training.diskspace import disk_full_guard, tensor_bytes

if TYPE_CHECKING:  # the trainer installs these callbacks: a runtime import would be circular
    from mrpo.training.trainer import MRPOTrainer

log = logging.getLogger("mrpo")

STRATEGY_STATE_FILE = "mrpo_strategy_state.json"
LOSS_STATE_FILE = "mrpo_loss_state.json"  # bco_pair's running reward mean


def load_strategy_state(strategy, checkpoint_dir: str | os.PathLike) -> None:
    path = Path(checkpoint_dir) / STRATEGY_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: checkpoint has no weighting-strategy state; it was not written by MRPOTrainer. "
            "Delete the checkpoint directory to start over"
        )
    strategy.load_state_dict(json.loads(path.read_text()))
    log.info("restored weighting-strategy state from %s", path)


def load_loss_state(loss_state: RunningRewardMean, checkpoint_dir: str | os.PathLike) -> None:
    path = Path(checkpoint_dir) / LOSS_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: checkpoint has no bco_pair reward-mean state; "
            "it was written without loss_type bco_pair. "
            "Delete the checkpoint directory to start over"
        )
    loss_state.load_state_dict(json.loads(path.read_text()))
    log.info("restored bco_pair's running reward mean from %s", path)


def checkpoint_save_guard(trainer: MRPOTrainer):
    """Around writing the current step's checkpoint: a full disk removes the partial checkpoint and raises
    one line (see mrpo.training.diskspace); earlier checkpoints stay, and a re-run resumes from the last."""
    checkpoint = Path(trainer.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    needed = tensor_bytes(trainer.model, trainer.optimizer)
    return disk_full_guard(checkpoint, needed, key="train.checkpoint_dir", remove=True)


class StrategyStateCallback(TrainerCallback):
    """Advances online weighting once per optimizer step and writes the strategy's state into each
    checkpoint directory (saving comes after the step's end), so a resumed run continues it."""

    def __init__(self, trainer: MRPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._step_margins.clear()  # margins from compute_loss calls outside the loop are not a step
        self.trainer._step_rewards.clear()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._advance_strategy()
        return control

    def on_save(self, args, state, control, **kwargs):
        # Every rank writes its own files (rng_state_<rank>.pth, shards): all are written before rank 0 seals.
        self.trainer.accelerator.wait_for_everyone()
        if state.is_world_process_zero:
            with checkpoint_save_guard(self.trainer):
                ckpt = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
                ckpt.mkdir(parents=True, exist_ok=True)
                state_dict = self.trainer.strategy.state_dict()
                (ckpt / STRATEGY_STATE_FILE).write_text(json.dumps(jsonable(state_dict)))
                if self.trainer.loss_state is not None:
                    (ckpt / LOSS_STATE_FILE).write_text(json.dumps(self.trainer.loss_state.state_dict()))
                seal_checkpoint(ckpt)  # last: Trainer has written everything else by now
        return control


class NonFiniteGuard(TrainerCallback):
    """Stops training before an optimizer step that a non-finite loss or gradient would turn into NaN weights.

    Trainer's own `logging_nan_inf_filter` hides such steps in the logs and steps anyway; here the
    run fails with the step and the likely causes instead, and nothing is saved as the policy.
    """

    def __init__(self, trainer: MRPOTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        losses_finite, self.trainer._losses_finite = self.trainer._losses_finite, None
        grads = [p.grad for p in (model or self.trainer.model).parameters() if p.grad is not None]
        ok = torch.ones((), dtype=torch.bool) if losses_finite is None else losses_finite.cpu()
        # Gradients are already clipped here;
        # clipping turns an infinite norm into NaN entries, caught the same way.
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for g in grads])
            ok = ok & torch.isfinite(norms.sum()).cpu()
        if not bool(ok):
            what = "loss" if losses_finite is not None and not bool(losses_finite) else "gradient"
            raise TrainingError(
                f"the {what} became non-finite (NaN or inf) at optimizer step {state.global_step + 1}; "
                f"stopped before it reached the weights, nothing was saved as the policy. Usual causes: "
                f"train.learning_rate ({args.learning_rate}) too high for this model, "
                "or non-finite reference scores; lower the learning rate or re-run `mrpo score`"
            )
        return control
