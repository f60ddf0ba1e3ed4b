"""The reference side of the objective (docs/mrpo-spec.md sections 1-2): the trust-region clip of references
2..K around the anchor, the weights alpha, and the harmonic-mean combination. Reference log-probs and weights
are constants: detached, so gradients reach only the policy log-probs.
"""

from __future__ import annotations

import torch


def trust_region_bands(
    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, epsilon: float, adaptive: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative half-widths (eps_w, eps_l), each (B, 1), of the clip band (spec section 1).

    Adaptive: eps_w = eps * |b_w| / (|b_w| + |b_l|) with b the mean over references,
    so the response with the larger mean magnitude gets the wider band. When both
    means are 0 the split is undefined; each side then gets eps / 2.
    """
    if not adaptive:
        band = torch.full_like(ref_chosen[:, :1], epsilon)
        return band, band
    b_w = ref_chosen.mean(dim=-1, keepdim=True).abs()
    b_l = ref_rejected.mean(dim=-1, keepdim=True).abs()
    total = b_w + b_l
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    eps_w = torch.where(total > 0, epsilon * b_w / safe_total, torch.full_like(total, epsilon / 2))
    eps_l = torch.where(total > 0, epsilon * b_l / safe_total, torch.full_like(total, epsilon / 2))
    return eps_w, eps_l


def clip_to_anchor(ref: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """CTRO (spec eq. in section 1):
    clamp references 2..K into anchor +- band * |anchor|, (B, K) -> (B, K)."""
    anchor = ref[:, :1]
    half_width = band * anchor.abs()
    others = torch.clamp(ref[:, 1:], min=anchor - half_width, max=anchor + half_width)
    return torch.cat([anchor, others], dim=-1)


def normalise_weights(weights: torch.Tensor, batch_size: int, num_refs: int) -> torch.Tensor:
    """alpha as (B, K) rows summing to 1, from (K,) or (B, K) non-negative weights."""
    if weights.dim() == 1:
        weights = weights.unsqueeze(0).expand(batch_size, -1)
    if weights.shape != (batch_size, num_refs):
        raise ValueError(
            f"weights: expected shape ({num_refs},) or ({batch_size}, {num_refs}), got {tuple(weights.shape)}"
        )
    if (weights < 0).any():
        raise ValueError(f"weights: must be non-negative, got {weights.tolist()}")
    total = weights.sum(dim=-1, keepdim=True)
    if (total <= 0).any():
        raise ValueError("weights: every row needs at least one positive weight")
    return weights / total


def harmonic_reference(clipped: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log pi_ref = -log sum_k alpha_k exp(-r~_k) (spec section 2), (B, K) x (B, K) -> (B,).

    In log space: log(0) = -inf drops a zero-weight reference from the logsumexp
    exactly, and nothing overflows for log-probs of -1e4.
    """
    return -torch.logsumexp(torch.log(alpha) - clipped, dim=-1)


def clip_and_weigh(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, weights, epsilon: float, adaptive_epsilon: bool
):
    """Shared front half of both objectives: dtype, shape checks, the clip of references 2..K and alpha."""
    if ref_chosen.dim() == 1:
        ref_chosen, ref_rejected = ref_chosen.unsqueeze(-1), ref_rejected.unsqueeze(-1)
    batch, k = ref_chosen.shape
    if (
        policy_chosen.shape != (batch,)
        or policy_rejected.shape != (batch,)
        or ref_rejected.shape != (batch, k)
    ):
        raise ValueError(
            "expected policy log-probs (B,) and reference log-probs (B, K); got "
            f"{tuple(policy_chosen.shape)}, {tuple(policy_rejected.shape)}, "
            f"{tuple(ref_chosen.shape)}, {tuple(ref_rejected.shape)}"
        )
    # bf16 policy log-probs would round the reference side too; do the objective in at least fp32.
    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
    ref_chosen = ref_chosen.detach().to(dtype)
    ref_rejected = ref_rejected.detach().to(dtype)
    weights = torch.as_tensor(weights, device=ref_chosen.device).detach().to(dtype)
    eps_w, eps_l = trust_region_bands(ref_chosen, ref_rejected, epsilon, adaptive_epsilon)
    clipped_w, clipped_l = clip_to_anchor(ref_chosen, eps_w), clip_to_anchor(ref_rejected, eps_l)
    if k > 1:
        moved = torch.cat([(clipped_w != ref_chosen)[:, 1:], (clipped_l != ref_rejected)[:, 1:]])
        clipped_fraction = moved.to(dtype).mean()
    else:
        clipped_fraction = torch.zeros((), dtype=dtype, device=ref_chosen.device)
    alpha = normalise_weights(weights, batch, k)
    return policy_chosen.to(dtype), policy_rejected.to(dtype), clipped_w, clipped_l, alpha, clipped_fraction
