"""The DPO family's losses (docs/mrpo-spec.md section 3) as small pure tensor functions, one per paper.

`margin` is the preference margin h = s_w - s_l of the two (f-transformed) log-ratios, `chosen`/`rejected`
the log-ratios log pi(y|x) - log pi_ref(y|x) themselves; pi_ref is the combined reference (harmonic mean)
under objective mrpo, one reference per column under multi_dpo. Every function maps any shape to the same
shape, except the two `aot` losses, which sort over the batch (dim 0). The formulas are TRL 1.16's
DPOTrainer's. Which loss type uses which function, with which hyperparameters, is the registry's
(mrpo.core.loss_types).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


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
