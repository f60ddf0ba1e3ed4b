"""Reward accuracy and its tie tolerance: the one definition training logs, validation, the evaluate stage
and the comparison share. Its own small module so that editing the objective does not re-run evaluate."""

from __future__ import annotations

import torch

# Two sequence log-probs closer than this (nats) are a tie in reward accuracy: their difference is rounding
# noise of the precision the forward ran in, not a preference. Between batch shapes (scoring's length packing,
# training's batches), fp32 sums differ by ~4e-6; under fp16/bf16 autocast most pairs differ by ~1e-5, but now
# and then one token's logit lands on the other side of a rounding step: up to 4.8e-3 (fp16) and 2.8e-2 (bf16)
# on a pair's log-prob gap, measured on 256 fact-task pairs (tests/training/test_trainer.py, step 0), with
# no trend in the sequence's length or log-prob. Each tolerance is about twice its measured maximum. Real
# data is worse:
# SmolLM2 on GSM8K (62-169-token responses) moved up to 0.90 nats in bf16 (fp32: 1.5e-5; the CPU rehearsal of
# benchmarks/gpu_check.py), so under bf16 there a pair's accuracy can still flip on noise (docs/metrics.md).
LOGP_TIE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def reward_accuracy(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    beta: float,
    precision: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Share of pairs whose chosen reward beats the rejected one by more than a tie,
    (N,) x (N,) -> () float64.

    Rewards are beta * log-prob differences, so a tie is a reward gap within beta * LOGP_TIE_TOLERANCE.
    The one definition of reward accuracy: training logs, validation and the evaluate stage all use it.
    """
    if chosen_rewards.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    gap = chosen_rewards.double() - rejected_rewards.double()
    return (gap > beta * LOGP_TIE_TOLERANCE[precision]).double().mean()
