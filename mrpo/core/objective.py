"""The MRPO objective (docs/mrpo-spec.md sections 1-4): which combination of the references, which loss
types (mrpo.core.loss_types) with which weights and hyperparameters; validated once, and called on a batch.

Shapes: B pairs, K references. Policy log-probs are (B,); reference log-probs are (B, K) with column 0 the
anchor; weights are (K,) or (B, K) and need not be normalised. Reference log-probs and weights are constants
of the objective: they are detached, so gradients reach only the policy log-probs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from mrpo.core.inputs import LossInputs, TokenCounts, per_token_logps
from mrpo.core.loss_types import LOSS_TYPES, LOSSES, LossType
from mrpo.core.losses import F_DIVERGENCES
from mrpo.core.reference import clip_and_weigh, harmonic_reference

OBJECTIVES = ("mrpo", "dpo", "multi_dpo")


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


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _bounded(default: float, ok, allowed: str):
    """A numeric setting with its bound where it is declared; __post_init__ checks every one."""
    return field(default=default, metadata={"ok": ok, "allowed": allowed})


@dataclass(frozen=True)
class Objective:
    """What the trainer optimises (spec sections 1-4): which combination of the references, which pair loss
    (or a weighted sum of several, `loss_type` a tuple with `loss_weights`), and its hyperparameters.
    Validated once, here; calling it computes the loss of a batch. Every field is a train.* setting of the
    same name (from_train_config)."""

    objective: str = "mrpo"  # mrpo | dpo (K = 1) | multi_dpo (the naive baseline)
    loss_type: str | tuple[str, ...] = "sigmoid"
    beta: float = _bounded(0.1, lambda v: _finite(v) and v > 0, "must be > 0")
    epsilon: float = _bounded(0.1, lambda v: 0 <= v < 1, "must be in [0, 1)")
    adaptive_epsilon: bool = True
    # cDPO's smoothing; robust's flip rate; exo_pair's epsilon; aot's smoothing
    label_smoothing: float = _bounded(0.0, lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")
    sft_weight: float = _bounded(0.0, lambda v: _finite(v) and v >= 0, "must be >= 0")
    loss_weights: tuple[float, ...] | None = None  # one per loss type; None = 1 each (as TRL)
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = _bounded(0.5, lambda v: _finite(v) and v > 0, "must be > 0")
    discopop_tau: float = _bounded(0.05, lambda v: _finite(v) and v > 0, "must be > 0")
    use_weighting: bool = False  # WPO: each pair's loss times its pair weight (`pair_weights`, wpo_weights)

    @classmethod
    def from_train_config(cls, train) -> Objective:
        """The objective of a train config, each field read by its name."""
        return cls(**{f.name: getattr(train, f.name) for f in dataclasses.fields(cls)})

    @property
    def loss_types(self) -> tuple[str, ...]:
        return (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)

    @property
    def loss_entries(self) -> tuple[LossType, ...]:
        """The registry's entries of the loss types, in order."""
        return tuple(LOSSES[t] for t in self.loss_types)

    @property
    def weights_of_losses(self) -> tuple[float, ...]:
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_types)

    @property
    def needs_tokens(self) -> bool:
        """Whether a call needs `tokens` (the per-token losses, and sft's token mean)."""
        return any(entry.needs_tokens for entry in self.loss_entries)

    @property
    def keeps_reward_mean(self) -> bool:
        """Whether the caller keeps a RunningRewardMean and passes its mean as `bco_delta` (bco_pair)."""
        return any(entry.keeps_state for entry in self.loss_entries)

    def _check(self, ok: bool, name: str, allowed: str) -> None:
        if not ok:
            value = getattr(self, name)
            raise ValueError(f"{name}: got {list(value) if isinstance(value, tuple) else value!r}; {allowed}")

    def __post_init__(self) -> None:
        types = self.loss_types
        self._check(self.objective in OBJECTIVES, "objective", f"allowed: {', '.join(OBJECTIVES)}")
        self._check(
            len(types) > 0 and all(t in LOSSES for t in types),
            "loss_type",
            f"allowed: {', '.join(LOSS_TYPES)}, or a list of them",
        )
        self._check(len(set(types)) == len(types), "loss_type", "each loss type at most once")
        for f in dataclasses.fields(self):
            if "ok" in f.metadata:
                self._check(f.metadata["ok"](getattr(self, f.name)), f.name, f.metadata["allowed"])
        for entry in self.loss_entries:
            for r in entry.requires:
                self._check(r.ok(getattr(self, r.setting)), r.setting, r.needs)
        self._check_loss_weights()
        self._check_properties()

    def _check_loss_weights(self) -> None:
        w, types = self.loss_weights, self.loss_types
        if w is None:
            return
        self._check(
            len(w) == len(types),
            "loss_weights",
            f"needs one weight per loss type ({len(types)}: {', '.join(types)}), or null for 1 each",
        )
        self._check(
            all(_finite(x) and x >= 0 for x in w) and sum(w) > 0,
            "loss_weights",
            "must be finite numbers >= 0, not all 0",
        )

    def _check_properties(self) -> None:
        """The settings that only some loss types admit."""
        self._check(
            self.f_divergence_type in F_DIVERGENCES,
            "f_divergence_type",
            f"allowed: {', '.join(F_DIVERGENCES)}",
        )
        no_f = [e.name for e in self.loss_entries if not e.f_divergence]
        self._check(
            self.f_divergence_type == "reverse_kl" or not no_f,
            "f_divergence_type",
            f"loss type(s) {', '.join(no_f)} have no f-divergence form; only "
            f"{', '.join(t for t, e in LOSSES.items() if e.f_divergence)} (or use reverse_kl)",
        )
        self._check(isinstance(self.use_weighting, bool), "use_weighting", "must be true or false")
        sorted_types = [e.name for e in self.loss_entries if not e.pair_weights]
        self._check(
            not (self.use_weighting and sorted_types),
            "use_weighting",
            f"not with loss_type {', '.join(sorted_types)}: it sorts the batch, so a pair's WPO weight would "
            "land on another pair's loss (TRL refuses it too); set use_weighting false or change loss_type",
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
            needing = [e.name for e in self.loss_entries if e.needs_tokens]
            raise ValueError(
                f"loss_type {', '.join(map(repr, needing))} needs the response token counts "
                "(tokens=TokenCounts(...))"
            )
        _check_pair_weights(self.use_weighting, pair_weights, policy_chosen_logps.shape[:1])
        logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
        out = _objective(self, logps, weights, tokens, bco_delta)
        if pair_weights is None:
            return out
        weighted = out.losses * pair_weights.detach().to(out.losses.dtype)
        return dataclasses.replace(out, losses=weighted)


def _check_pair_weights(use_weighting: bool, pair_weights: torch.Tensor | None, batch: torch.Size) -> None:
    if use_weighting != (pair_weights is not None):
        raise ValueError(
            "use_weighting needs pair_weights (wpo_weights(...) of the chosen times the rejected)"
            if use_weighting
            else "pair_weights given but use_weighting is off"
        )
    if pair_weights is not None and pair_weights.shape != batch:
        raise ValueError(f"pair_weights: expected shape {tuple(batch)}, got {tuple(pair_weights.shape)}")


@dataclass(frozen=True)
class _View:
    """One view of the batch (sequence or per token): what its loss types see, the weights alpha, and the
    policy log-probs and combined reference the rewards are measured against."""

    inputs: LossInputs
    alpha: torch.Tensor
    pi_w: torch.Tensor
    pi_l: torch.Tensor
    ref_w: torch.Tensor
    ref_l: torch.Tensor
    clipped_fraction: torch.Tensor


def _view(o: Objective, logps, weights, tokens: TokenCounts | None, bco_delta: float, per_token: bool):
    """The batch clipped and combined as the loss types of one view see it."""
    if per_token:
        if o.f_divergence_type != "reverse_kl":
            # f' rescales each per-token log-ratio to the sequence and exponentiates it: fp32's rounding
            # of log-prob / length would come back n times larger, amplified by the exponential (2e-4 on
            # an ipo_norm loss of 149 at n = 3, measured), so this view runs in fp64 (B values: free).
            logps = tuple(x.double() for x in logps)
        logps = per_token_logps(*logps, tokens)
    pi_w, pi_l, r_w, r_l, alpha, clipped_fraction = clip_and_weigh(
        *logps, weights, o.epsilon, o.adaptive_epsilon
    )
    lengths = None
    if per_token:
        lengths = tuple(
            torch.as_tensor(n, device=pi_w.device).to(pi_w.dtype).clamp(min=1)
            for n in (tokens.chosen, tokens.rejected)
        )
    settings = {
        "f_divergence_type": o.f_divergence_type,
        "f_alpha_divergence_coef": o.f_alpha_divergence_coef,
        "chosen_tokens": None if tokens is None else tokens.chosen,
        "reward_mean": bco_delta,
    }
    if o.objective == "multi_dpo":
        columns = None if lengths is None else tuple(n.unsqueeze(-1) for n in lengths)
        inputs = LossInputs(pi_w.unsqueeze(-1), pi_l.unsqueeze(-1), r_w, r_l, columns, **settings)
        ref_w, ref_l = (alpha * r_w).sum(dim=-1), (alpha * r_l).sum(dim=-1)
    else:
        ref_w, ref_l = harmonic_reference(r_w, alpha), harmonic_reference(r_l, alpha)
        inputs = LossInputs(pi_w, pi_l, ref_w, ref_l, lengths, **settings)
    return _View(inputs, alpha, pi_w, pi_l, ref_w, ref_l, clipped_fraction)


def _objective(o: Objective, logps, weights, tokens, bco_delta) -> PreferenceLossOutput:
    """Both objectives: each loss type's view (sequence or per token), clipped and combined, then the weighted
    sum of the loss types' per-pair losses. Rewards are measured in the per-token view only when every loss
    type is per-token."""
    per_token_only = all(e.per_token for e in o.loss_entries)
    views = {
        per_token: _view(o, logps, weights, tokens, bco_delta, per_token)
        for per_token in {e.per_token for e in o.loss_entries} | {per_token_only}
    }
    losses = 0.0
    for entry, w in zip(o.loss_entries, o.weights_of_losses, strict=True):
        view = views[entry.per_token]
        per_pair = entry(view.inputs, o.beta, o)
        if o.objective == "multi_dpo":
            per_pair = (view.alpha * per_pair).sum(dim=-1)
        losses = losses + w * per_pair
    v = views[per_token_only]
    dtype = torch.promote_types(logps[0].dtype, torch.float32)
    pi_w, pi_l, ref_w, ref_l = (x.to(dtype) for x in (v.pi_w, v.pi_l, v.ref_w, v.ref_l))
    return PreferenceLossOutput(
        losses=losses.to(dtype),
        chosen_rewards=(o.beta * (pi_w - ref_w)).detach(),
        rejected_rewards=(o.beta * (pi_l - ref_l)).detach(),
        ref_chosen_logps=ref_w,
        ref_rejected_logps=ref_l,
        clipped_fraction=v.clipped_fraction.to(dtype),
    )


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
