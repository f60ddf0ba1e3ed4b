"""The MRPO objective (docs/mrpo-spec.md sections 1-4) as small pure tensor functions.

Shapes: B pairs, K references. Policy log-probs are (B,); reference log-probs are
(B, K) with column 0 the anchor; weights are (K,) or (B, K) and need not be
normalised. Reference log-probs and weights are constants of the objective: they
are detached, so gradients reach only the policy log-probs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("mrpo", "dpo", "multi_dpo")
# TRL 1.16's DPOTrainer loss types, plus the token-summed ipo (TRL's ipo is ipo_norm here).
LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "ipo_norm",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
)
PER_TOKEN_LOSSES = ("ipo_norm", "sigmoid_norm")  # on per-token log-probs (per_token_logps), as TRL's ipo
MARGIN_LOSSES = ("sigmoid", "ipo", "ipo_norm", "hinge", "robust", "exo_pair", "discopop", "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL's: the f-DPO reparameterisation leaves a beta log Z(x) that cancels only in the chosen-rejected
# difference.
F_DIVERGENCE_LOSSES = (
    "sigmoid",
    "sigmoid_norm",
    "hinge",
    "ipo",
    "ipo_norm",
    "exo_pair",
    "robust",
    "discopop",
    "sft",
)

# Two sequence log-probs closer than this (nats) are a tie in reward accuracy: their difference is rounding
# noise of the precision the forward ran in, not a preference. Between batch shapes (scoring's length packing,
# training's batches), fp32 sums differ by ~4e-6; under fp16/bf16 autocast most pairs differ by ~1e-5, but now
# and then one token's logit lands on the other side of a rounding step: up to 4.8e-3 (fp16) and 2.8e-2 (bf16)
# on a pair's log-prob gap, measured on 256 fact-task pairs (tests/test_trainer.py, step 0), with no trend in
# the sequence's length or log-prob. Each tolerance is about twice its measured maximum. Real data is worse:
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


# ---------------------------------------------------------------- the DPO family, one small function each
#
# `margin` is the preference margin h = s_w - s_l of the two (f-transformed) log-ratios, `chosen`/`rejected`
# the log-ratios log pi(y|x) - log pi_ref(y|x) themselves; pi_ref is the combined reference (harmonic mean)
# under objective mrpo, one reference per column under multi_dpo. Every function maps any shape to the same
# shape, except the two `aot` losses, which sort over the batch (dim 0). The formulas are TRL 1.16's
# DPOTrainer's.


def sigmoid_loss(margin: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7); with label smoothing s the conservative cDPO form
    -(1 - s) log sigma(beta h) - s log sigma(-beta h) (Mitchell 2023)."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(
        -beta * margin
    )


def ipo_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17, tau = beta): (h - 1 / (2 beta))^2."""
    return (margin - 1 / (2 * beta)) ** 2


def hinge_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """The hinge loss of SLiC-HF (Zhao et al. 2023) on DPO's margin, as RSO (Liu et al. 2024) uses it:
    relu(1 - beta h)."""
    return torch.relu(1 - beta * margin)


def robust_loss(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, 'Provably Robust DPO', its de-biased loss) for labels flipped w.p.
    s = label_smoothing: ((1 - s) l(h) - s l(-h)) / (1 - 2s) with l(h) = -log sigma(beta h)."""
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * margin)
    flipped = -label_smoothing * F.logsigmoid(-beta * margin)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def exo_pair_loss(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO-pref (Ji et al. 2024, eq. 16): KL(p_f || p_rh) over {chosen, rejected}, p_f = softmax of the
    beta-scaled log-ratios, p_rh = (1 - eps, eps) with eps = label_smoothing (> 0)."""
    log_pw, log_pl = math.log1p(-label_smoothing), math.log(label_smoothing)
    qw, log_qw = torch.sigmoid(beta * margin), F.logsigmoid(beta * margin)
    ql, log_ql = torch.sigmoid(-beta * margin), F.logsigmoid(-beta * margin)
    return qw * (log_qw - log_pw) + ql * (log_ql - log_pl)


def discopop_loss(margin: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, eq. 5): with x = beta h and m = sigma(x / tau),
    (1 - m) (-log sigma(x)) + m exp(-x).

    m exp(-x) is evaluated as exp(-x + log sigma(x / tau)): the same number, but finite where TRL's product is
    inf * 0 = NaN (x below about -88 in fp32, i.e. margins of -880 nats at beta 0.1)."""
    x = beta * margin
    return -F.logsigmoid(x) * torch.sigmoid(-x / tau) + torch.exp(-x + F.logsigmoid(x / tau))


def nca_pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """NCA, pairwise (Chen et al. 2024, 'Noise Contrastive Alignment', the NCA loss for K = 2 responses):
    -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l), r = beta * log-ratio."""
    r_w, r_l = beta * chosen, beta * rejected
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def bco_pair_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float, delta: float = 0.0
) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024, 'Binary Classifier Optimization', the BCE loss with the reward shift
    delta): -log sigma(r_w - delta) - log sigma(-(r_l - delta)), r = beta * log-ratio, delta the running mean
    of the rewards (RunningRewardMean). TRL 1.16 dropped the shift: its bco_pair is this loss at delta = 0."""
    return -F.logsigmoid(beta * chosen - delta) - F.logsigmoid(-(beta * rejected - delta))


def sppo_hard_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """SPPO with hard probabilities (Wu et al. 2024, eq. 4.7 with P = 1 for the winner, 0 for the loser):
    (lr_w - 1 / (2 beta))^2 + (lr_l + 1 / (2 beta))^2."""
    return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2


def apo_zero_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): raise the chosen, lower the rejected likelihood,
    (1 - sigma(beta lr_w)) + sigma(beta lr_l)."""
    return (1 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)


def apo_down_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): lower both, the rejected more,
    sigma(beta lr_w) + (1 - sigma(beta (lr_w - lr_l)))."""
    return torch.sigmoid(beta * chosen) + (1 - torch.sigmoid(beta * (chosen - rejected)))


def _smoothed_logistic(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def aot_loss(
    policy_margin: torch.Tensor, ref_margin: torch.Tensor, beta: float, label_smoothing: float
) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, 'Distributional Preference Alignment via Optimal Transport'):
    the policy's log-prob margins and the reference's, each sorted over the batch, matched quantile to
    quantile in the (smoothed) logistic loss. A batch-level loss: row i is the i-th quantile, not pair i."""
    delta = torch.sort(policy_margin, dim=0).values - torch.sort(ref_margin, dim=0).values
    return _smoothed_logistic(delta, beta, label_smoothing)


def aot_unpaired_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float, label_smoothing: float
) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al. 2024): the chosen and the rejected log-ratios, each sorted over the
    batch, the chosen distribution made to dominate the rejected one quantile by quantile."""
    delta = torch.sort(chosen, dim=0).values - torch.sort(rejected, dim=0).values
    return _smoothed_logistic(delta, beta, label_smoothing)


def sft_loss(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """SFT as a loss type (the generation loss L_g of MPO, Wang et al. 2024): the mean token NLL of the
    batch's chosen responses, -sum log pi(y_w|x) / sum |y_w|, one value repeated for every pair (B,)."""
    total = torch.as_tensor(chosen_tokens, device=policy_chosen.device).to(policy_chosen.dtype).sum()
    return (-policy_chosen.sum() / total.clamp(min=1)).expand(policy_chosen.shape[0])


def f_divergence_score(log_ratio: torch.Tensor, f_divergence_type: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(pi / pi_ref) of f-DPO (Wang et al. 2024, 'Beyond Reverse KL'), from the
    log-ratio: the score each response gets in place of its log-ratio. reverse_kl is DPO's log-ratio itself.

    forward_kl, 1 - exp(-lr), overflows for log-ratios below about -88 (fp32) as TRL's does; alpha_divergence
    clamps its exponent as TRL does."""
    if f_divergence_type == "reverse_kl":
        return log_ratio
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:  # the limit alpha -> 1 is the reverse KL
            return log_ratio
        # TRL's clamp (so exp stays representable once cast back); the exponential in at least fp32
        clamp_max = {torch.float16: 11.0}.get(log_ratio.dtype, 80.0)
        t = torch.clamp(
            ((alpha - 1.0) * log_ratio).to(torch.promote_types(log_ratio.dtype, torch.float32)), max=clamp_max
        )
        return (torch.exp(t) - 1.0).to(log_ratio.dtype) / (alpha - 1.0)
    raise ValueError(f"f_divergence_type: got {f_divergence_type!r}; allowed: {', '.join(F_DIVERGENCES)}")


def pair_loss(
    h: torch.Tensor, *, beta: float, loss_type: str, label_smoothing: float, discopop_tau: float = 0.05
) -> torch.Tensor:
    """Per-pair loss of the preference margin h (spec section 3) for the losses that see only h."""
    if loss_type in ("sigmoid", "sigmoid_norm"):  # *_norm: h is already per-token (per_token_logps)
        return sigmoid_loss(h, beta, label_smoothing)
    if loss_type in ("ipo", "ipo_norm"):
        return ipo_loss(h, beta)
    if loss_type == "hinge":
        return hinge_loss(h, beta)
    if loss_type == "robust":
        return robust_loss(h, beta, label_smoothing)
    if loss_type == "exo_pair":
        return exo_pair_loss(h, beta, label_smoothing)
    if loss_type == "discopop":
        return discopop_loss(h, beta, discopop_tau)
    raise ValueError(f"loss_type: got {loss_type!r}; allowed: {', '.join(MARGIN_LOSSES)}")


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


# Losses whose rows are quantiles of the batch, not pairs: a pair's weight would land on another pair's loss.
NO_PAIR_WEIGHTS = ("aot", "aot_unpaired")


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


@dataclass(frozen=True)
class Objective:
    """What the trainer optimises (spec sections 1-4): which combination of the references, which pair loss
    (or a weighted sum of several, `loss_type` a tuple with `loss_weights`), and its hyperparameters.
    Validated once, here; calling it computes the loss of a batch."""

    objective: str = "mrpo"  # mrpo | dpo (K = 1) | multi_dpo (the naive baseline)
    loss_type: str | tuple[str, ...] = "sigmoid"
    beta: float = 0.1
    epsilon: float = 0.1
    adaptive_epsilon: bool = True
    label_smoothing: float = 0.0  # cDPO's smoothing; robust's flip rate; exo_pair's epsilon; aot's smoothing
    sft_weight: float = 0.0
    loss_weights: tuple[float, ...] | None = None  # one per loss type; None = 1 each (as TRL)
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    use_weighting: bool = False  # WPO: each pair's loss times its pair weight (`pair_weights`, wpo_weights)

    @property
    def loss_types(self) -> tuple[str, ...]:
        return (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)

    @property
    def weights_of_losses(self) -> tuple[float, ...]:
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_types)

    @property
    def needs_tokens(self) -> bool:
        """Whether a call needs `tokens` (the per-token losses, and sft's token mean)."""
        return any(t in PER_TOKEN_LOSSES or t == "sft" for t in self.loss_types)

    @property
    def keeps_reward_mean(self) -> bool:
        """Whether the caller keeps a RunningRewardMean and passes its mean as `bco_delta` (bco_pair)."""
        return "bco_pair" in self.loss_types

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                value = getattr(self, name)
                raise ValueError(
                    f"{name}: got {list(value) if isinstance(value, tuple) else value!r}; {allowed}"
                )

        def finite(name: str) -> bool:
            value = getattr(self, name)
            return isinstance(value, int | float) and math.isfinite(value)

        types = self.loss_types
        check(self.objective in OBJECTIVES, "objective", f"allowed: {', '.join(OBJECTIVES)}")
        check(
            len(types) > 0 and all(t in LOSS_TYPES for t in types),
            "loss_type",
            f"allowed: {', '.join(LOSS_TYPES)}, or a list of them",
        )
        check(len(set(types)) == len(types), "loss_type", "each loss type at most once")
        check(finite("beta") and self.beta > 0, "beta", "must be > 0")
        check(0 <= self.epsilon < 1, "epsilon", "must be in [0, 1)")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        check(
            "exo_pair" not in types or self.label_smoothing > 0,
            "label_smoothing",
            "loss_type exo_pair needs it in (0, 0.5): it is EXO's epsilon (the paper uses 1e-3)",
        )
        check(finite("sft_weight") and self.sft_weight >= 0, "sft_weight", "must be >= 0")
        if self.loss_weights is not None:
            w = self.loss_weights
            check(
                len(w) == len(types),
                "loss_weights",
                f"needs one weight per loss type ({len(types)}: {', '.join(types)}), or null for 1 each",
            )
            check(
                all(isinstance(x, int | float) and math.isfinite(x) and x >= 0 for x in w) and sum(w) > 0,
                "loss_weights",
                "must be finite numbers >= 0, not all 0",
            )
        check(
            self.f_divergence_type in F_DIVERGENCES,
            "f_divergence_type",
            f"allowed: {', '.join(F_DIVERGENCES)}",
        )
        no_f = [t for t in types if t not in F_DIVERGENCE_LOSSES]
        check(
            self.f_divergence_type == "reverse_kl" or not no_f,
            "f_divergence_type",
            f"loss type(s) {', '.join(no_f)} have no f-divergence form; only "
            f"{', '.join(F_DIVERGENCE_LOSSES)} (or use reverse_kl)",
        )
        check(
            finite("f_alpha_divergence_coef") and self.f_alpha_divergence_coef > 0,
            "f_alpha_divergence_coef",
            "must be > 0",
        )
        check(finite("discopop_tau") and self.discopop_tau > 0, "discopop_tau", "must be > 0")
        check(isinstance(self.use_weighting, bool), "use_weighting", "must be true or false")
        sorted_types = [t for t in types if t in NO_PAIR_WEIGHTS]
        check(
            not (self.use_weighting and sorted_types),
            "use_weighting",
            f"not with loss_type {', '.join(sorted_types)}: it sorts the batch, so a pair's WPO weight would "
            "land on another pair's loss (TRL refuses it too); set use_weighting false or change loss_type",
        )

    @classmethod
    def from_train_config(cls, t) -> Objective:
        return cls(
            t.objective,
            t.loss_type,
            t.beta,
            t.epsilon,
            t.adaptive_epsilon,
            t.label_smoothing,
            t.sft_weight,
            loss_weights=t.loss_weights,
            f_divergence_type=t.f_divergence_type,
            f_alpha_divergence_coef=t.f_alpha_divergence_coef,
            discopop_tau=t.discopop_tau,
            use_weighting=t.use_weighting,
        )

    def __call__(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
        weights: torch.Tensor,
        tokens: TokenCounts | None = None,
        bco_delta: float = 0.0,
        pair_weights: torch.Tensor | None = None,
    ) -> PreferenceLossOutput:
        """The objective's per-pair losses and rewards. `tokens` is needed by ipo_norm, sigmoid_norm and sft;
        `bco_delta` is bco_pair's reward shift (the RunningRewardMean's mean; 0 is TRL 1.16's bco_pair);
        `pair_weights` (B,), needed exactly when use_weighting, multiply each pair's loss (of every loss type,
        as TRL) and are constants (detached); rewards do not change."""
        if self.objective == "dpo" and ref_chosen_logps.shape[-1] != 1:
            raise ValueError(f"objective 'dpo' takes exactly one reference, got {ref_chosen_logps.shape[-1]}")
        if self.needs_tokens and tokens is None:
            needing = [t for t in self.loss_types if t in PER_TOKEN_LOSSES or t == "sft"]
            raise ValueError(
                f"loss_type {', '.join(map(repr, needing))} needs the response token counts "
                "(tokens=TokenCounts(...))"
            )
        if self.use_weighting != (pair_weights is not None):
            raise ValueError(
                "use_weighting needs pair_weights (wpo_weights(...) of the chosen times the rejected)"
                if self.use_weighting
                else "pair_weights given but use_weighting is off"
            )
        if pair_weights is not None and pair_weights.shape != policy_chosen_logps.shape[:1]:
            raise ValueError(
                f"pair_weights: expected shape {tuple(policy_chosen_logps.shape[:1])}, "
                f"got {tuple(pair_weights.shape)}"
            )
        out = _objective(
            self,
            (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps),
            weights,
            tokens,
            bco_delta,
        )
        if pair_weights is None:
            return out
        weighted = out.losses * pair_weights.detach().to(out.losses.dtype)
        return dataclasses.replace(out, losses=weighted)


@dataclass(frozen=True)
class _View:
    """The batch as one family of losses sees it: policy log-probs against the reference(s) they are measured
    against, both sequence totals or both per token. mrpo: pi (B,), ref (B,) the combined reference;
    multi_dpo: pi (B, 1), ref (B, K) one reference per column. `lengths` are the policy's (chosen, rejected)
    token counts, shaped like pi, for the per-token view (f-divergences act on the sequence log-ratio, as in
    TRL)."""

    pi_w: torch.Tensor
    pi_l: torch.Tensor
    ref_w: torch.Tensor
    ref_l: torch.Tensor
    lengths: tuple[torch.Tensor, torch.Tensor] | None

    def scores(self, f_divergence_type: str, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """f'(ratio) of each side's log-ratio; per token: f' of the sequence log-ratio, divided by the
        length."""
        lr_w, lr_l = self.pi_w - self.ref_w, self.pi_l - self.ref_l
        if f_divergence_type == "reverse_kl" or self.lengths is None:
            return f_divergence_score(lr_w, f_divergence_type, alpha), f_divergence_score(
                lr_l, f_divergence_type, alpha
            )
        n_w, n_l = self.lengths
        # Each side scaled back to the sequence before subtracting: (pi/n - ref/n) * n would carry n times the
        # rounding of the per-token values into the exponentials (3.6e-5 nats in fp32 at n = 19, measured).
        return (
            f_divergence_score(self.pi_w * n_w - self.ref_w * n_w, f_divergence_type, alpha) / n_w,
            f_divergence_score(self.pi_l * n_l - self.ref_l * n_l, f_divergence_type, alpha) / n_l,
        )


def family_loss(
    loss_type: str, v: _View, o: Objective, *, bco_delta: float = 0.0, sft: torch.Tensor | None = None
) -> torch.Tensor:
    """One loss type's per-pair losses on a view, shaped like v.ref_w."""
    lr_w, lr_l = v.pi_w - v.ref_w, v.pi_l - v.ref_l
    shape = torch.broadcast_shapes(lr_w.shape, lr_l.shape)
    if loss_type in MARGIN_LOSSES:
        s_w, s_l = v.scores(o.f_divergence_type, o.f_alpha_divergence_coef)
        return pair_loss(
            s_w - s_l,
            beta=o.beta,
            loss_type=loss_type,
            label_smoothing=o.label_smoothing,
            discopop_tau=o.discopop_tau,
        )
    if loss_type == "nca_pair":
        return nca_pair_loss(lr_w, lr_l, o.beta)
    if loss_type == "bco_pair":
        return bco_pair_loss(lr_w, lr_l, o.beta, bco_delta)
    if loss_type == "sppo_hard":
        return sppo_hard_loss(lr_w, lr_l, o.beta)
    if loss_type == "apo_zero":
        return apo_zero_loss(lr_w, lr_l, o.beta)
    if loss_type == "apo_down":
        return apo_down_loss(lr_w, lr_l, o.beta)
    if loss_type == "aot":
        return aot_loss(v.pi_w - v.pi_l, v.ref_w - v.ref_l, o.beta, o.label_smoothing).expand(shape)
    if loss_type == "aot_unpaired":
        return aot_unpaired_loss(lr_w, lr_l, o.beta, o.label_smoothing)
    if loss_type == "sft":  # no reference: the same value against every column
        return sft.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)
    raise ValueError(f"loss_type: got {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")


def _objective(o: Objective, logps, weights, tokens, bco_delta) -> PreferenceLossOutput:
    """Both objectives: each loss type's view (sequence or per token), clipped and combined, then the weighted
    sum of the loss types' per-pair losses."""
    types = o.loss_types
    per_token_only = all(t in PER_TOKEN_LOSSES for t in types)
    views: dict[bool, tuple] = {}
    dtype = torch.promote_types(logps[0].dtype, torch.float32)
    for per_token in {t in PER_TOKEN_LOSSES for t in types} | {per_token_only}:
        tensors = logps
        if per_token:
            if o.f_divergence_type != "reverse_kl":
                # f' rescales each per-token log-ratio to the sequence and exponentiates it: fp32's rounding
                # of log-prob / length would come back n times larger, amplified by the exponential (2e-4 on
                # an ipo_norm loss of 149 at n = 3, measured), so this view runs in fp64 (B values: free).
                tensors = tuple(x.double() for x in tensors)
            tensors = per_token_logps(*tensors, tokens)
        pi_w, pi_l, r_w, r_l, alpha, clipped_fraction = _prepare(
            *tensors, weights, o.epsilon, o.adaptive_epsilon
        )
        lengths = None
        if per_token:
            n_w, n_l = (
                torch.as_tensor(n, device=pi_w.device).to(pi_w.dtype).clamp(min=1)
                for n in (tokens.chosen, tokens.rejected)
            )
            lengths = (n_w, n_l)
        if o.objective == "multi_dpo":
            view = _View(
                pi_w.unsqueeze(-1),
                pi_l.unsqueeze(-1),
                r_w,
                r_l,
                None if lengths is None else (lengths[0].unsqueeze(-1), lengths[1].unsqueeze(-1)),
            )
            rewards_ref = (alpha * r_w).sum(dim=-1), (alpha * r_l).sum(dim=-1)
        else:
            view = _View(pi_w, pi_l, harmonic_reference(r_w, alpha), harmonic_reference(r_l, alpha), lengths)
            rewards_ref = view.ref_w, view.ref_l
        views[per_token] = (view, alpha, pi_w, pi_l, rewards_ref, clipped_fraction)

    sft = None
    if "sft" in types:
        policy_chosen = logps[0]
        sft = sft_loss(
            policy_chosen.to(torch.promote_types(policy_chosen.dtype, torch.float32)), tokens.chosen
        )
    losses = 0.0
    for loss_type, w in zip(types, o.weights_of_losses, strict=True):
        view, alpha = views[loss_type in PER_TOKEN_LOSSES][:2]
        per_pair = family_loss(loss_type, view, o, bco_delta=bco_delta, sft=sft)
        if o.objective == "multi_dpo":
            per_pair = (alpha * per_pair).sum(dim=-1)
        losses = losses + w * per_pair
    _, _, pi_w, pi_l, (ref_w, ref_l), clipped_fraction = views[per_token_only]
    pi_w, pi_l, ref_w, ref_l, clipped_fraction = (
        x.to(dtype) for x in (pi_w, pi_l, ref_w, ref_l, clipped_fraction)
    )
    return _output(losses.to(dtype), pi_w, pi_l, ref_w, ref_l, o.beta, clipped_fraction)


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
    bco_delta: float = 0.0,
    pair_weights: torch.Tensor | None = None,
    **settings,
) -> PreferenceLossOutput:
    """MRPO: the DPO-form loss against the clipped, weighted harmonic-mean reference (spec sections 1-3).

    h = (pi_w - pi_l) - (log pi_ref(y_w|x) - log pi_ref(y_l|x)). With K = 1 this is DPO exactly. `settings`
    are the other Objective fields (loss_weights, f_divergence_type, discopop_tau, ...).
    """
    o = Objective("mrpo", loss_type, beta, epsilon, adaptive_epsilon, label_smoothing, **settings)
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return o(*logps, weights, tokens, bco_delta, pair_weights)


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
    bco_delta: float = 0.0,
    pair_weights: torch.Tensor | None = None,
    **settings,
) -> PreferenceLossOutput:
    """The naive multi-reference baseline (spec section 4): sum_k alpha_k * DPO(pi, r~_k).

    The same clipping applies, so MRPO and this baseline differ only in how the
    references are combined. Rewards are logged against the alpha-weighted
    arithmetic mean of the clipped references, the reference this loss implies
    for the sigmoid form's first-order behaviour. Every loss type is summed the same way over the references.
    """
    o = Objective("multi_dpo", loss_type, beta, epsilon, adaptive_epsilon, label_smoothing, **settings)
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return o(*logps, weights, tokens, bco_delta, pair_weights)
