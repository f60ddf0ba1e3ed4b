"""The MRPO objective (docs/mrpo-spec.md sections 1-4) as small pure tensor functions.

Shapes: B pairs, K references. Policy log-probs are (B,); reference log-probs are
(B, K) with column 0 the anchor; weights are (K,) or (B, K) and need not be
normalised. Reference log-probs and weights are constants of the objective: they
are detached, so gradients reach only the policy log-probs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("mrpo", "dpo", "multi_dpo")
LOSS_TYPES = ("sigmoid", "ipo", "ipo_norm", "hinge")  # ipo_norm: IPO on per-token log-probs (TRL's ipo)

# Two sequence log-probs closer than this (nats) are a tie in reward accuracy: their difference is rounding
# noise of the precision the forward ran in, not a preference. fp32 sums over hundreds of tokens differ by
# ~1e-6 between batch shapes; fp16/bf16 autocast by up to 1.3e-4/3.2e-3 (tests/test_trainer.py, step 0).
LOGP_TIE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


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


@dataclass(frozen=True)
class TokenCounts:
    """Response lengths in tokens for `ipo_norm`: the policy's (B,) in its own tokenizer, each reference's
    (B, K) in that reference's tokenizer (the score files' chosen_tokens / rejected_tokens)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor


def per_token_logps(policy_chosen, policy_rejected, ref_chosen, ref_rejected, tokens: TokenCounts | None):
    """Every sequence log-prob divided by its own token count, as TRL's `ipo` averages per token.

    Each reference is divided by the length in its own tokenizer, so with K = 1 (the anchor's tokenizer is
    the policy's) this is exactly TRL's normalisation.
    """
    if tokens is None:
        raise ValueError("loss_type 'ipo_norm' needs the response token counts (tokens=TokenCounts(...))")

    def norm(x, n):
        return x / torch.as_tensor(n, device=x.device).to(x.dtype).clamp(min=1)

    return (
        norm(policy_chosen, tokens.chosen),
        norm(policy_rejected, tokens.rejected),
        norm(ref_chosen, tokens.ref_chosen),
        norm(ref_rejected, tokens.ref_rejected),
    )


@dataclass(frozen=True)
class PreferenceLossOutput:
    """Per-pair losses plus what is worth logging.

    `ref_chosen_logps`/`ref_rejected_logps` are the combined reference the
    rewards are measured against; `clipped_fraction` is the share of non-anchor
    reference values (k >= 2, both responses) moved by the trust-region clip.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    clipped_fraction: torch.Tensor


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


def pair_loss(h: torch.Tensor, *, beta: float, loss_type: str, label_smoothing: float) -> torch.Tensor:
    """Per-pair loss of the preference margin h (spec section 3), any shape -> same shape."""
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type in ("ipo", "ipo_norm"):  # ipo_norm: h is already per-token (per_token_logps)
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    raise ValueError(f"loss_type: got {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")


def _prepare(policy_chosen, policy_rejected, ref_chosen, ref_rejected, weights, epsilon, adaptive_epsilon):
    """Shared front half of both objectives: dtype, shape checks, clipping and alpha."""
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


def _output(losses, pi_w, pi_l, ref_w, ref_l, beta, clipped_fraction) -> PreferenceLossOutput:
    """Losses plus the implicit rewards beta * (pi - log pi_ref) measured against the combined reference."""
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * (pi_w - ref_w)).detach(),
        rejected_rewards=(beta * (pi_l - ref_l)).detach(),
        ref_chosen_logps=ref_w,
        ref_rejected_logps=ref_l,
        clipped_fraction=clipped_fraction,
    )


@dataclass(frozen=True)
class Objective:
    """What the trainer optimises (spec sections 1-4): which combination of the references, which pair loss,
    and its hyperparameters. Validated once, here; calling it computes the loss of a batch."""

    objective: str = "mrpo"  # mrpo | dpo (K = 1) | multi_dpo (the naive baseline)
    loss_type: str = "sigmoid"
    beta: float = 0.1
    epsilon: float = 0.1
    adaptive_epsilon: bool = True
    label_smoothing: float = 0.0
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{name}: got {getattr(self, name)!r}; {allowed}")

        check(self.objective in OBJECTIVES, "objective", f"allowed: {', '.join(OBJECTIVES)}")
        check(self.loss_type in LOSS_TYPES, "loss_type", f"allowed: {', '.join(LOSS_TYPES)}")
        check(math.isfinite(self.beta) and self.beta > 0, "beta", "must be > 0")
        check(0 <= self.epsilon < 1, "epsilon", "must be in [0, 1)")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        check(math.isfinite(self.sft_weight) and self.sft_weight >= 0, "sft_weight", "must be >= 0")

    @classmethod
    def from_train_config(cls, t) -> Objective:
        return cls(
            t.objective, t.loss_type, t.beta, t.epsilon, t.adaptive_epsilon, t.label_smoothing, t.sft_weight
        )

    def __call__(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
        weights: torch.Tensor,
        tokens: TokenCounts | None = None,
    ) -> PreferenceLossOutput:
        """The objective's per-pair losses and rewards; `tokens` is needed by loss_type ipo_norm only."""
        if self.objective == "dpo" and ref_chosen_logps.shape[-1] != 1:
            raise ValueError(f"objective 'dpo' takes exactly one reference, got {ref_chosen_logps.shape[-1]}")
        combine = _multi_dpo if self.objective == "multi_dpo" else _mrpo
        return combine(
            self,
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            weights,
            tokens,
        )


def _clipped(o: Objective, policy_chosen, policy_rejected, ref_chosen, ref_rejected, weights, tokens):
    """Both objectives' front half: per-token log-probs for ipo_norm, then `_prepare` (clip and alpha)."""
    if o.loss_type == "ipo_norm":
        policy_chosen, policy_rejected, ref_chosen, ref_rejected = per_token_logps(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, tokens
        )
    return _prepare(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, weights, o.epsilon, o.adaptive_epsilon
    )


def _mrpo(o: Objective, *tensors) -> PreferenceLossOutput:
    pi_w, pi_l, r_w, r_l, alpha, clipped_fraction = _clipped(o, *tensors)
    ref_w, ref_l = harmonic_reference(r_w, alpha), harmonic_reference(r_l, alpha)
    h = (pi_w - pi_l) - (ref_w - ref_l)
    losses = pair_loss(h, beta=o.beta, loss_type=o.loss_type, label_smoothing=o.label_smoothing)
    return _output(losses, pi_w, pi_l, ref_w, ref_l, o.beta, clipped_fraction)


def _multi_dpo(o: Objective, *tensors) -> PreferenceLossOutput:
    pi_w, pi_l, r_w, r_l, alpha, clipped_fraction = _clipped(o, *tensors)
    h = (pi_w - pi_l).unsqueeze(-1) - (r_w - r_l)
    per_reference = pair_loss(h, beta=o.beta, loss_type=o.loss_type, label_smoothing=o.label_smoothing)
    losses = (alpha * per_reference).sum(dim=-1)
    ref_w, ref_l = (alpha * r_w).sum(dim=-1), (alpha * r_l).sum(dim=-1)
    return _output(losses, pi_w, pi_l, ref_w, ref_l, o.beta, clipped_fraction)


def mrpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    weights: torch.Tensor,
    *,
    beta: float,
    epsilon: float,
    adaptive_epsilon: bool = True,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    tokens: TokenCounts | None = None,
) -> PreferenceLossOutput:
    """MRPO: the DPO-form loss against the clipped, weighted harmonic-mean reference (spec sections 1-3).

    h = (pi_w - pi_l) - (log pi_ref(y_w|x) - log pi_ref(y_l|x)). With K = 1 this is DPO exactly.
    """
    o = Objective("mrpo", loss_type, beta, epsilon, adaptive_epsilon, label_smoothing)
    return _mrpo(
        o, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, weights, tokens
    )


def multi_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    weights: torch.Tensor,
    *,
    beta: float,
    epsilon: float,
    adaptive_epsilon: bool = True,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    tokens: TokenCounts | None = None,
) -> PreferenceLossOutput:
    """The naive multi-reference baseline (spec section 4): sum_k alpha_k * DPO(pi, r~_k).

    The same clipping applies, so MRPO and this baseline differ only in how the
    references are combined. Rewards are logged against the alpha-weighted
    arithmetic mean of the clipped references, the reference this loss implies
    for the sigmoid form's first-order behaviour.
    """
    o = Objective("multi_dpo", loss_type, beta, epsilon, adaptive_epsilon, label_smoothing)
    return _multi_dpo(
        o, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, weights, tokens
    )
