"""The loss types (TRL 1.16's DPOTrainer's, plus the token-summed ipo: TRL's ipo is ipo_norm here), one
registry entry each: how its per-pair losses are computed from the batch (mrpo.core.inputs.LossInputs) and
the properties the objective, its validation and the trainer read. Adding a loss type is one entry here (its
pure function in mrpo.core.losses); a new hyperparameter is also one field of the Objective and of train.*.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mrpo.core.inputs import LossInputs
from mrpo.core.losses import (
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    discopop_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    robust_loss,
    sft_loss,
    sigmoid_loss,
    sppo_hard_loss,
)


@dataclass(frozen=True)
class Requirement:
    """A setting a loss type needs beyond its general bounds: `ok(value)` or the error says `needs`."""

    setting: str
    ok: Callable[[Any], bool]
    needs: str


@dataclass(frozen=True)
class LossType:
    """One loss type. `compute(inputs, beta, **{h: objective.h for h in reads})` gives its per-pair losses,
    shaped like `inputs.shape`."""

    name: str
    compute: Callable[..., torch.Tensor]
    reads: tuple[str, ...] = ()  # the Objective's hyperparameters `compute` takes besides beta
    margin: bool = False  # a function of the chosen-rejected margin h alone
    per_token: bool = False  # on per-token log-probs (per_token_logps), as TRL's ipo
    token_mean: bool = False  # a mean over the chosen responses' tokens (needs their counts, not per-token)
    # The f-DPO reparameterisation (TRL's rule) leaves a beta log Z(x) that cancels only in the
    # chosen-rejected difference: only the margin losses (and sft, with no reference) admit another f.
    f_divergence: bool = False
    pair_weights: bool = True  # admits WPO's pair weights: False where rows are quantiles of the batch
    keeps_state: bool = False  # reads the running reward mean (RunningRewardMean) the trainer keeps
    requires: tuple[Requirement, ...] = ()

    @property
    def needs_tokens(self) -> bool:
        """Whether a call needs the response token counts (TokenCounts)."""
        return self.per_token or self.token_mean

    def __call__(self, inputs: LossInputs, beta: float, settings: object) -> torch.Tensor:
        """Per-pair losses with the hyperparameters this loss type reads from `settings` (an Objective)."""
        return self.compute(inputs, beta, **{h: getattr(settings, h) for h in self.reads})


def on_margin(name: str, fn: Callable[..., torch.Tensor], **properties) -> LossType:
    """A loss of the margin h alone, fn(h, beta, **hyperparameters)."""
    return LossType(
        name, lambda x, beta, **h: fn(x.margin, beta, **h), margin=True, f_divergence=True, **properties
    )


def on_log_ratios(name: str, fn: Callable[..., torch.Tensor], **properties) -> LossType:
    """A loss of the two log-ratios, fn(chosen, rejected, beta, **hyperparameters)."""
    return LossType(name, lambda x, beta, **h: fn(x.chosen, x.rejected, beta, **h), **properties)


_SMOOTHED = ("label_smoothing",)
LOSSES: dict[str, LossType] = {
    entry.name: entry
    for entry in (
        on_margin("sigmoid", sigmoid_loss, reads=_SMOOTHED),
        on_margin("ipo", ipo_loss),
        on_margin("ipo_norm", ipo_loss, per_token=True),
        on_margin("hinge", hinge_loss),
        on_margin("robust", robust_loss, reads=_SMOOTHED),
        on_margin(
            "exo_pair",
            exo_pair_loss,
            reads=_SMOOTHED,
            requires=(
                Requirement(
                    "label_smoothing",
                    lambda v: v > 0,
                    "loss_type exo_pair needs it in (0, 0.5): it is EXO's epsilon (the paper uses 1e-3)",
                ),
            ),
        ),
        on_log_ratios("nca_pair", nca_pair_loss),
        LossType(
            "bco_pair",
            lambda x, beta: bco_pair_loss(x.chosen, x.rejected, beta, x.reward_mean),
            keeps_state=True,
        ),
        on_log_ratios("sppo_hard", sppo_hard_loss),
        LossType(
            "aot",
            lambda x, beta, label_smoothing: aot_loss(
                x.pi_w - x.pi_l, x.ref_w - x.ref_l, beta, label_smoothing
            ).expand(x.shape),
            reads=_SMOOTHED,
            pair_weights=False,
        ),
        on_log_ratios("aot_unpaired", aot_unpaired_loss, reads=_SMOOTHED, pair_weights=False),
        on_log_ratios("apo_zero", apo_zero_loss),
        on_log_ratios("apo_down", apo_down_loss),
        on_margin(
            "discopop",
            lambda h, beta, discopop_tau: discopop_loss(h, beta, discopop_tau),
            reads=("discopop_tau",),
        ),
        on_margin("sigmoid_norm", sigmoid_loss, reads=_SMOOTHED, per_token=True),
        LossType(
            "sft",
            lambda x, beta: x.per_pair(sft_loss(x.pi_w, x.chosen_tokens)),
            token_mean=True,
            f_divergence=True,
        ),
    )
}
LOSS_TYPES = tuple(LOSSES)


@dataclass
class RunningRewardMean:
    """bco_pair's reward shift delta: the running mean of each optimizer step's mean implicit reward (BCO's
    moving average; the mean TRL's RunningMoments kept before 1.x, one step one observation).

    The trainer updates it once after each optimizer step from all of that step's rewards (every micro-batch,
    every rank), so a step's loss uses the mean of the steps before it; it is saved with each checkpoint."""

    mean: float = 0.0
    count: int = 0

    name = "bco_reward_mean"

    def update(self, step_mean: float) -> None:
        self.count += 1
        self.mean += (float(step_mean) - self.mean) / self.count

    def state_dict(self) -> dict:
        return {"name": self.name, "mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"loss state is {state.get('name')!r}, not {self.name!r}")
        self.mean, self.count = float(state["mean"]), int(state["count"])
