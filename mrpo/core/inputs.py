"""What a loss type sees of a batch: the policy's log-probs against the reference(s) they are measured
against, as sequence totals or per token (TokenCounts), and the terms the DPO family's losses take from them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mrpo.core.losses import f_divergence_score


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
class LossInputs:
    """The batch as one family of losses sees it: policy log-probs against the reference(s) they are measured
    against, both sequence totals or both per token. mrpo: pi (B,), ref (B,) the combined reference;
    multi_dpo: pi (B, 1), ref (B, K) one reference per column. `lengths` are the policy's (chosen, rejected)
    token counts, shaped like pi, for the per-token view (f-divergences act on the sequence log-ratio, as in
    TRL). `chosen_tokens` (B,) are the chosen responses' lengths where a loss needs them (sft), `reward_mean`
    the running reward mean of the losses that keep one (bco_pair's delta)."""

    pi_w: torch.Tensor
    pi_l: torch.Tensor
    ref_w: torch.Tensor
    ref_l: torch.Tensor
    lengths: tuple[torch.Tensor, torch.Tensor] | None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    chosen_tokens: torch.Tensor | None = None
    reward_mean: float = 0.0

    @property
    def chosen(self) -> torch.Tensor:
        """The chosen response's log-ratio log pi(y_w|x) - log pi_ref(y_w|x)."""
        return self.pi_w - self.ref_w

    @property
    def rejected(self) -> torch.Tensor:
        return self.pi_l - self.ref_l

    @property
    def shape(self) -> torch.Size:
        """The shape of the per-pair losses: (B,) under mrpo, (B, K) under multi_dpo."""
        return torch.broadcast_shapes(self.chosen.shape, self.rejected.shape)

    def per_pair(self, values: torch.Tensor) -> torch.Tensor:
        """(B,) values of a loss with no reference, the same against every column."""
        return values.reshape(-1, *([1] * (len(self.shape) - 1))).expand(self.shape)

    @functools.cached_property
    def margin(self) -> torch.Tensor:
        """The preference margin h = s_w - s_l of the two (f-transformed) log-ratios."""
        s_w, s_l = self._scores()
        return s_w - s_l

    def _scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """f'(ratio) of each side's log-ratio; per token: f' of the sequence log-ratio, divided by the
        length."""
        f, alpha = self.f_divergence_type, self.f_alpha_divergence_coef
        if f == "reverse_kl" or self.lengths is None:
            return f_divergence_score(self.chosen, f, alpha), f_divergence_score(self.rejected, f, alpha)
        n_w, n_l = self.lengths
        # Each side scaled back to the sequence before subtracting: (pi/n - ref/n) * n would carry n times the
        # rounding of the per-token values into the exponentials (3.6e-5 nats in fp32 at n = 19, measured).
        return (
            f_divergence_score(self.pi_w * n_w - self.ref_w * n_w, f, alpha) / n_w,
            f_divergence_score(self.pi_l * n_l - self.ref_l * n_l, f, alpha) / n_l,
        )
