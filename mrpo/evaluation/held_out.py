"""A policy's held-out reward accuracy against the anchor, pair by pair: the per-pair form of
mrpo.core.metrics.reward_accuracy (its mean is the evaluate stage's reward_accuracy_vs_anchor), with the
policy log-probs computed as training computes them. `mrpo compare` scores every member and the untrained
policy so.
"""

from __future__ import annotations

import numpy as np
import torch

from mrpo.core.metrics import LOGP_TIE_TOLERANCE
from mrpo.data.preference import PreferenceCollator, PreferenceDataset


def pair_correct(
    policy_chosen: np.ndarray,
    policy_rejected: np.ndarray,
    anchor_chosen: np.ndarray,
    anchor_rejected: np.ndarray,
    beta: float,
    precision: torch.dtype = torch.float32,
) -> np.ndarray:
    """Per pair 1.0 when the policy's reward against the anchor prefers the chosen response beyond a tie, else
    0.0: the per-pair form of mrpo.core.metrics.reward_accuracy (its mean is the evaluate stage's
    reward_accuracy_vs_anchor)."""
    gap = beta * ((policy_chosen - anchor_chosen) - (policy_rejected - anchor_rejected))
    return (gap > beta * LOGP_TIE_TOLERANCE[precision]).astype(np.float64)


def policy_logps(
    model, dataset: PreferenceDataset, pad_token_id: int, precision: torch.dtype, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) sequence log-probs of the policy on every pair, computed as training computes
    them. Pairs run in batches of similar length (the results in the dataset's order), so little of the
    forward is padding."""
    from mrpo.modeling.logprobs import forward_precision, response_logps
    from mrpo.modeling.models import cpu_threads_for, torch_threads

    collate = PreferenceCollator(pad_token_id)
    device = next(model.parameters()).device
    examples = dataset.examples
    order = sorted(
        range(len(examples)),
        key=lambda i: max(len(examples[i].chosen.input_ids), len(examples[i].rejected.input_ids)),
    )
    chosen, rejected = np.zeros(len(examples)), np.zeros(len(examples))
    model.eval()
    with torch.no_grad(), torch_threads(cpu_threads_for(model, device)):
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            batch = collate([examples[j] for j in rows])
            with forward_precision(precision, device):
                logps = (
                    response_logps(
                        model,
                        batch["input_ids"].to(device),
                        batch["attention_mask"].to(device),
                        batch["response_mask"].to(device),
                    )
                    .double()
                    .cpu()
                    .numpy()
                )
            chosen[rows], rejected[rows] = logps[: len(rows)], logps[len(rows) :]
    return chosen, rejected


def held_out_correct(
    model, dataset: PreferenceDataset, pad_token_id: int, beta: float, precision: torch.dtype
) -> np.ndarray:
    """Per pair of `dataset`, 1.0 when `model`'s reward against the anchor (the first reference's stored
    log-probs) prefers the chosen response beyond a tie."""
    pi_w, pi_l = policy_logps(model, dataset, pad_token_id, precision)
    anchor_w = np.array([e.ref_chosen_logps[0] for e in dataset.examples])
    anchor_l = np.array([e.ref_rejected_logps[0] for e in dataset.examples])
    return pair_correct(pi_w, pi_l, anchor_w, anchor_l, beta, precision)
