"""WPO's pair weights (Zhou et al. 2024): how much each pair's loss counts under `use_weighting`."""

from __future__ import annotations

import torch


def wpo_weights(
    token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Each response's WPO weight (Zhou et al. 2024, 'WPO: Enhancing RLHF with Weighted Preference
    Optimization', arXiv 2406.11827, eq. 2 with its weight alignment), as TRL 1.16's `use_weighting`:

        w(x, y) = exp( 1/|y| sum_t [ log pi(y_t | x, y_<t) - log sum_v pi(v | x, y_<t)^2 ] )

    (N, T) x (N, T) x (N, T) -> (N,), without gradient. `token_logps` are the policy's per-token log-probs,
    `log_sum_sq_probs` log sum_v p_v^2 of its next-token distribution at the same positions, `mask` 1 on the
    response tokens; |y| is clamped to 1. The adjustment is the paper's weight alignment: for a token sampled
    from the policy itself, E[p(y_t) / sum_v p_v^2] = 1 whatever the distribution's shape (a raw p(y_t)
    would favour positions where the policy is peaked). Not clamped: TRL 1.16 does not clamp, and each
    token's term is at most log V (sum_v p_v^2 >= 1/V), so w <= V. A pair's weight is w(x, y_w) * w(x, y_l)
    (`Objective(..., pair_weights=...)`)."""
    with torch.no_grad():
        mask = mask.to(token_logps.dtype)
        aligned = (token_logps.detach() - log_sum_sq_probs.to(token_logps.dtype)) * mask
        return torch.exp(aligned.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1))
