"""The DPO family against the combined reference: each loss type equals TRL 1.16's DPOTrainer for K = 1, stays
finite at the spec's extremes for K > 1, reduces to K = 1 over identical references, and trains.

TRL's losses live inside `DPOTrainer._compute_loss`, after the policy forward. The parity tests run that
method of a real DPOTrainer (built on the tiny zoo's anchor, reference log-probs precomputed) with a policy
whose per-token log-probs are given: the sequence log-prob of each response on its first response token, 0 on
the others, so TRL's token sums, token means and response lengths are exactly the ones handed to our
objective.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REFERENCES, config, trl_dpo_trainer

from mrpo.core.inputs import TokenCounts
from mrpo.core.loss_types import LOSS_TYPES, LOSSES, RunningRewardMean
from mrpo.core.losses import bco_pair_loss, discopop_loss, ipo_loss
from mrpo.core.objective import Objective
from mrpo.core.wpo import wpo_weights

D = torch.float64
F_DIVERGENCE_LOSSES = tuple(t for t, entry in LOSSES.items() if entry.f_divergence)
TRL_NAME = {
    "ipo_norm": "ipo"
}  # TRL's ipo averages per token: ours is ipo_norm; our token-summed ipo is not TRL's
MAX_DIFFERENCE: dict[str, float] = {}  # loss -> max |ours - TRL| over its cases, printed at the end


# ---------------------------------------------------------------- TRL on given log-probs


class GivenLogProbs(torch.nn.Module):
    """A policy whose per-token log-probs are given (what TRL's fused LM head returns), for TRL's loss
    code."""

    def __init__(self, per_token: torch.Tensor, log_sum_sq_probs: torch.Tensor | None = None):
        super().__init__()
        self.per_token = per_token
        self.log_sum_sq_probs = log_sum_sq_probs  # what TRL's fused head returns for use_weighting

    def forward(self, input_ids, **_):
        zeros = torch.zeros_like(self.per_token)
        return SimpleNamespace(
            log_probs=self.per_token,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
            log_sum_sq_probs=self.log_sum_sq_probs,
            aux_loss=None,
        )


@pytest.fixture(scope="module")
def trl(tiny_zoo, tmp_path_factory):
    from mrpo.config.schema import ReferenceConfig
    from mrpo.modeling.models import load_model, load_tokenizer

    ref = ReferenceConfig("anchor", str(tiny_zoo["members"]["anchor"]))
    model, tokenizer = load_model(ref, "cpu", torch.float32), load_tokenizer(ref)
    rows = [
        {
            "prompt_ids": [1],
            "chosen_ids": [2],
            "rejected_ids": [3],
            "ref_chosen_logps": -1.0,
            "ref_rejected_logps": -1.0,
        }
    ]
    return trl_dpo_trainer(
        model, tokenizer, rows, tmp_path_factory.mktemp("trl"), beta=0.1, loss_type=["sigmoid"]
    )


def trl_loss_and_grads(trainer, batch, settings: dict):
    """TRL's loss of `batch` and its gradient with respect to the policy's chosen and rejected log-probs."""
    pi_w, pi_l, ref_w, ref_l, n_w, n_l = batch
    types = [TRL_NAME.get(t, t) for t in settings["loss_type"]]
    trainer.loss_types = types
    trainer.loss_weights = list(settings.get("loss_weights") or [1.0] * len(types))
    trainer.beta = settings.get("beta", 0.1)
    trainer.label_smoothing = settings.get("label_smoothing", 0.0)
    trainer.f_divergence_type = settings.get("f_divergence_type", "reverse_kl")
    trainer.f_alpha_divergence_coef = settings.get("f_alpha_divergence_coef", 0.5)
    trainer.args.discopop_tau = settings.get("discopop_tau", 0.05)

    b, width = pi_w.shape[0], int(max(n_w.max(), n_l.max())) + 2
    pi = torch.cat([pi_w, pi_l]).detach().clone().requires_grad_(True)
    lengths = torch.cat([n_w, n_l]).long()
    completion = torch.zeros(2 * b, width, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion[i, 1 : 1 + n] = 1  # one prompt token, then the response
    first = torch.zeros(2 * b, width - 1, dtype=pi.dtype)
    first[:, 0] = 1.0  # shifted: position 0 predicts the first response token
    inputs = {
        "input_ids": torch.ones(2 * b, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, width, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": ref_w,
        "ref_rejected_logps": ref_l,
    }
    loss = trainer._compute_loss(GivenLogProbs(pi.unsqueeze(-1) * first), inputs, return_outputs=False)
    loss.backward()
    return loss.detach(), pi.grad[:b], pi.grad[b:]


def k1_objective(settings: dict, use_weighting: bool = False) -> Objective:
    """The `dpo` objective of a TRL-style settings dict (loss_type a list, TRL's defaults for the rest)."""
    types = tuple(settings["loss_type"])
    return Objective(
        "dpo",
        types[0] if len(types) == 1 else types,
        settings.get("beta", 0.1),
        label_smoothing=settings.get("label_smoothing", 0.0),
        loss_weights=settings.get("loss_weights"),
        f_divergence_type=settings.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=settings.get("f_alpha_divergence_coef", 0.5),
        discopop_tau=settings.get("discopop_tau", 0.05),
        use_weighting=use_weighting,
    )


def our_loss_and_grads(batch, settings: dict, bco_delta: float = 0.0):
    pi_w, pi_l, ref_w, ref_l, n_w, n_l = batch
    pi_w, pi_l = pi_w.clone().requires_grad_(True), pi_l.clone().requires_grad_(True)
    objective = k1_objective(settings)
    tokens = TokenCounts(n_w, n_l, n_w.unsqueeze(-1), n_l.unsqueeze(-1))
    out = objective(
        pi_w, pi_l, ref_w.unsqueeze(-1), ref_l.unsqueeze(-1), torch.ones(1, dtype=D), tokens, bco_delta
    )
    loss = out.losses.mean()
    loss.backward()
    zero = torch.zeros_like(pi_w)  # sft does not use the rejected responses
    return loss.detach(), pi_w.grad, zero if pi_l.grad is None else pi_l.grad


def log_probs(seed: int, b: int = 8, dtype=D, spread: float = 4.0):
    """A batch of sequence log-probs: references in [-60, -5], the policy within `spread` nats of them."""
    g = torch.Generator().manual_seed(seed)
    ref_w = -5 - 55 * torch.rand(b, generator=g, dtype=D)
    ref_l = -5 - 55 * torch.rand(b, generator=g, dtype=D)
    pi_w = ref_w + spread * (2 * torch.rand(b, generator=g, dtype=D) - 1)
    pi_l = ref_l + spread * (2 * torch.rand(b, generator=g, dtype=D) - 1)
    n_w = torch.randint(3, 20, (b,), generator=g).to(D)
    n_l = torch.randint(3, 20, (b,), generator=g).to(D)
    return tuple(x.to(dtype) for x in (pi_w, pi_l, ref_w, ref_l, n_w, n_l))


K1_CASES = (
    [{"loss_type": [t]} for t in LOSS_TYPES if t not in ("ipo", "robust", "exo_pair")]
    + [
        {"loss_type": ["robust"], "label_smoothing": 0.1},
        {"loss_type": ["robust"], "label_smoothing": 0.0},
        {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
        {"loss_type": ["exo_pair"], "label_smoothing": 0.2},
        {"loss_type": ["aot"], "label_smoothing": 0.1},
        {"loss_type": ["aot_unpaired"], "label_smoothing": 0.1},
        {"loss_type": ["discopop"], "discopop_tau": 0.5, "beta": 0.5},
        {"loss_type": ["sppo_hard"], "beta": 0.5},
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},  # MPO
        {
            "loss_type": ["ipo_norm", "apo_zero", "sigmoid_norm", "nca_pair"],
            "loss_weights": [0.5, 1.0, 2.0, 0.0],
        },
    ]
    + [
        {
            "loss_type": [t],
            "f_divergence_type": f,
            "label_smoothing": 0.1 if t in ("robust", "exo_pair") else 0.0,
        }
        for t in F_DIVERGENCE_LOSSES
        if t != "ipo"
        for f in ("forward_kl", "js_divergence")
    ]
)
ALPHA_CASES = [
    {
        "loss_type": [t],
        "f_divergence_type": "alpha_divergence",
        "f_alpha_divergence_coef": a,
        "label_smoothing": 0.1 if t in ("robust", "exo_pair") else 0.0,
    }
    for t in ("sigmoid", "sigmoid_norm", "ipo_norm", "hinge", "robust", "exo_pair", "discopop")
    for a in (0.5, 0.3)
]


def case_id(settings: dict) -> str:
    extra = [f"{k}={v}" for k, v in settings.items() if k not in ("loss_type",)]
    return "+".join(settings["loss_type"]) + ("-" + "-".join(extra) if extra else "")


def record(settings: dict, *differences: float) -> None:
    name = case_id(
        {
            "loss_type": settings["loss_type"],
            **({"f": settings["f_divergence_type"]} if "f_divergence_type" in settings else {}),
        }
    )
    MAX_DIFFERENCE[name] = max(MAX_DIFFERENCE.get(name, 0.0), *differences)


@pytest.mark.parametrize("settings", K1_CASES + ALPHA_CASES, ids=case_id)
def test_k1_equals_trl(trl, settings):
    """Loss and its gradient for K = 1 equal TRL's on the same log-probs: fp64, or fp32 for alpha_divergence
    (TRL's alpha-divergence has no fp64 clamp)."""
    dtype = torch.float32 if settings.get("f_divergence_type") == "alpha_divergence" else D
    for seed in range(3):
        batch = log_probs(seed, dtype=dtype)
        ours, ours_gw, ours_gl = our_loss_and_grads(batch, settings)
        theirs, trl_gw, trl_gl = trl_loss_and_grads(trl, batch, settings)
        loss_diff = (ours - theirs).abs().item()
        # fp64: 1e-6 (the bar); fp32: 1e-6 or a few float32 ulps of the loss, whichever is larger
        tol = 1e-6 if dtype == D else max(1e-6, 4 * torch.finfo(dtype).eps * abs(theirs.item()))
        grad_diff = max((ours_gw - trl_gw).abs().max().item(), (ours_gl - trl_gl).abs().max().item())
        record(settings, loss_diff)
        assert loss_diff <= tol, (settings, ours.item(), theirs.item())
        assert grad_diff <= tol, settings
        assert ours_gw.abs().max() > 0  # the loss does depend on the policy
    # B = 1 as well (the aot losses then have nothing to sort)
    batch = tuple(x[:1] for x in log_probs(7, dtype=dtype))
    ours, theirs = our_loss_and_grads(batch, settings)[0], trl_loss_and_grads(trl, batch, settings)[0]
    assert ours.item() == pytest.approx(theirs.item(), abs=tol)


def test_print_max_difference_from_trl():
    """Runs after the parity cases (file order): the per-loss maxima for the record (pytest -s shows them)."""
    for name, diff in sorted(MAX_DIFFERENCE.items()):
        print(f"K=1 max |ours - TRL| {name}: {diff:.1e}")
    assert MAX_DIFFERENCE and all(d <= 1e-5 for d in MAX_DIFFERENCE.values())


def test_token_summed_ipo_and_bco_shift_against_their_formulas():
    """Where TRL differs by design: our `ipo` sums log-probs over tokens (TRL's ipo is our ipo_norm), and
    bco_pair shifts the rewards by the running mean delta (TRL 1.16's bco_pair is delta = 0)."""
    pi_w, pi_l, ref_w, ref_l, n_w, n_l = log_probs(3)
    tokens = TokenCounts(n_w, n_l, n_w.unsqueeze(-1), n_l.unsqueeze(-1))
    for loss_type, expected in (
        ("ipo", ipo_loss((pi_w - ref_w) - (pi_l - ref_l), 0.1)),
        (
            "bco_pair",
            -torch.nn.functional.logsigmoid(0.1 * (pi_w - ref_w) - 0.7)
            - torch.nn.functional.logsigmoid(-(0.1 * (pi_l - ref_l) - 0.7)),
        ),
    ):
        out = Objective("dpo", loss_type)(
            pi_w, pi_l, ref_w[:, None], ref_l[:, None], torch.ones(1), tokens, 0.7
        )
        torch.testing.assert_close(out.losses, expected, atol=1e-12, rtol=0)
    assert (
        bco_pair_loss(pi_w - ref_w, pi_l - ref_l, 0.1, 0.7) - bco_pair_loss(pi_w - ref_w, pi_l - ref_l, 0.1)
    ).abs().max() > 1e-3


def test_discopop_is_finite_where_trls_product_is_nan():
    x = torch.tensor([-1e4, -100.0, 0.0, 50.0], dtype=torch.float32, requires_grad=True)
    loss = discopop_loss(x, 0.1, 0.05)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    logits = 0.1 * x.detach()
    m = torch.sigmoid(logits / 0.05)
    trl_form = -torch.nn.functional.logsigmoid(logits) * (1 - m) + torch.exp(-logits) * m
    assert torch.isnan(trl_form[0])  # inf * 0
    torch.testing.assert_close(loss.detach()[1:], trl_form[1:], rtol=1e-6, atol=0)


# ---------------------------------------------------------------- WPO weighting (use_weighting)

WPO_CASES = [
    {"loss_type": ["sigmoid"]},
    {"loss_type": ["ipo_norm"]},
    {"loss_type": ["robust"], "label_smoothing": 0.1},
    {"loss_type": ["nca_pair"]},
    {"loss_type": ["apo_down"]},
    {"loss_type": ["discopop"]},
    {"loss_type": ["sigmoid_norm"], "f_divergence_type": "js_divergence"},
    {"loss_type": ["sigmoid", "bco_pair", "apo_zero"], "loss_weights": [0.8, 0.2, 1.0]},
]


def token_batch(seed: int, b: int = 6, dtype=D):
    """Per-token inputs for TRL's fused-head outputs, [chosen; rejected] rows: the policy's log-probs
    (0 off the response, as TRL's head returns them), log sum_v p_v^2 (junk off the response: it must be
    masked), the completion mask (one prompt token, 2-15 response tokens), and the reference's sequence
    log-probs near the policy's."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 16, (2 * b,), generator=g)
    width = int(lengths.max()) + 2
    completion = torch.zeros(2 * b, width, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion[i, 1 : 1 + n] = 1
    mask = completion[:, 1:].to(dtype)
    token_logps = -6 * torch.rand(2 * b, width - 1, generator=g, dtype=dtype) * mask
    log_sum_sq = -4 * torch.rand(2 * b, width - 1, generator=g, dtype=dtype) * mask + 7.0 * (1 - mask)
    seq = token_logps.sum(-1)
    ref = seq + 3 * (2 * torch.rand(2 * b, generator=g, dtype=dtype) - 1)
    return token_logps, log_sum_sq, completion, ref[:b], ref[b:]


def trl_wpo_loss_and_grad(trainer, token_logps, log_sum_sq, completion, ref_w, ref_l, settings):
    """TRL 1.16's `_compute_loss` with use_weighting=True on given per-token outputs: the loss and its
    gradient with respect to the per-token log-probs."""
    trainer.loss_types = [TRL_NAME.get(t, t) for t in settings["loss_type"]]
    trainer.loss_weights = list(settings.get("loss_weights") or [1.0] * len(trainer.loss_types))
    trainer.beta = settings.get("beta", 0.1)
    trainer.label_smoothing = settings.get("label_smoothing", 0.0)
    trainer.f_divergence_type = settings.get("f_divergence_type", "reverse_kl")
    trainer.f_alpha_divergence_coef = 0.5
    trainer.args.discopop_tau = 0.05
    per_token = token_logps.detach().clone().requires_grad_(True)
    inputs = {
        "input_ids": torch.ones_like(completion),
        "attention_mask": torch.ones_like(completion),
        "completion_mask": completion,
        "ref_chosen_logps": ref_w,
        "ref_rejected_logps": ref_l,
    }
    trainer.use_weighting = True
    try:
        loss = trainer._compute_loss(GivenLogProbs(per_token, log_sum_sq), inputs, return_outputs=False)
    finally:
        trainer.use_weighting = False  # the module's TRL trainer is shared with the unweighted cases
    loss.backward()
    return loss.detach(), per_token.grad


def our_wpo_loss_and_grad(token_logps, log_sum_sq, completion, ref_w, ref_l, settings):
    """Ours: the sequence log-probs, the pair weights from `wpo_weights`, the objective with use_weighting."""
    per_token = token_logps.detach().clone().requires_grad_(True)
    mask = completion[:, 1:]
    b = ref_w.shape[0]
    w = wpo_weights(per_token, log_sum_sq, mask)
    pi = per_token.sum(-1)
    n = mask.sum(-1).to(pi.dtype)
    objective = k1_objective(settings, use_weighting=True)
    tokens = TokenCounts(n[:b], n[b:], n[:b, None], n[b:, None])
    out = objective(
        pi[:b],
        pi[b:],
        ref_w[:, None],
        ref_l[:, None],
        torch.ones(1, dtype=pi.dtype),
        tokens,
        0.0,
        w[:b] * w[b:],
    )
    loss = out.losses.mean()
    loss.backward()
    return loss.detach(), per_token.grad, w


@pytest.mark.parametrize("settings", WPO_CASES, ids=case_id)
def test_wpo_weighting_equals_trl_use_weighting_on_random_tensors(trl, settings):
    """`wpo_weights` and the weighted objective (K = 1) == TRL 1.16's use_weighting code, loss and gradient
    with respect to every per-token log-prob, on random per-token log-probs, log sum p^2 and lengths."""
    worst = 0.0
    for seed in range(3):
        batch = token_batch(seed)
        ours, ours_grad, w = our_wpo_loss_and_grad(*batch, settings)
        theirs, trl_grad = trl_wpo_loss_and_grad(trl, *batch, settings)
        unweighted = trl_loss_and_grads_plain(trl, batch, settings)
        diff = max((ours - theirs).abs().item(), (ours_grad - trl_grad).abs().max().item())
        worst = max(worst, diff)
        assert diff <= 1e-12, (settings, ours.item(), theirs.item())
        assert ours.item() != pytest.approx(unweighted, rel=1e-3)  # the weights do change the loss
        assert (w > 0).all() and (w != 1).all()
    print(f"WPO K=1 max |ours - TRL| {case_id(settings)}: {worst:.1e}")


def test_wpo_weighting_of_the_sft_loss_type_is_trls_formula(trl):
    """TRL 1.16 cannot weight `sft` (its in-place `*=` on the expanded batch mean raises); ours weights it as
    that code reads: the batch's token-mean NLL times each pair's weight, so the MPO list is TRL's weighted
    [sigmoid, bco_pair] plus the SFT term times the mean pair weight."""
    mpo = {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}
    batch = token_batch(5)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        trl_wpo_loss_and_grad(trl, *batch, mpo)
    ours, _, w = our_wpo_loss_and_grad(*batch, mpo)
    theirs, _ = trl_wpo_loss_and_grad(
        trl, *batch, {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.8, 0.2]}
    )
    token_logps, _, completion, _, _ = batch
    b = completion.shape[0] // 2
    sft = -token_logps[:b].sum() / completion[:b, 1:].sum()
    expected = theirs + sft * (w[:b] * w[b:]).mean()
    assert ours.item() == pytest.approx(expected.item(), abs=1e-12)


def trl_loss_and_grads_plain(trainer, batch, settings) -> float:
    """TRL's loss on the same per-token batch without weighting (the weights must matter)."""
    token_logps, log_sum_sq, completion, ref_w, ref_l = batch
    trainer.use_weighting = False
    inputs = {
        "input_ids": torch.ones_like(completion),
        "attention_mask": torch.ones_like(completion),
        "completion_mask": completion,
        "ref_chosen_logps": ref_w,
        "ref_rejected_logps": ref_l,
    }
    with torch.no_grad():
        return trainer._compute_loss(GivenLogProbs(token_logps), inputs, return_outputs=False).item()


def test_log_sum_sq_probs_equal_trls_fused_head_kernel():
    """The per-token adjustment log sum_v p_v^2 (and the log-probs beside it) == TRL's chunked fused-head
    kernel, which computes it by an online logsumexp over vocabulary tiles, on random logits up to +-300."""
    from trl.kernels import ChunkedLogProbFunction

    from mrpo.modeling.logprobs import log_sum_sq_probs, token_logps_from_logits

    g = torch.Generator().manual_seed(0)
    n, h, v = 64, 16, 300
    worst = 0.0
    for scale in (0.1, 1.0, 30.0):
        hidden = scale * torch.randn(n, h, generator=g)
        weight = torch.randn(v, h, generator=g)
        targets = torch.randint(0, v, (n,), generator=g)
        log_probs, _, log_sum_sq, _, _ = ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, 1.0, 37, None, 1.0, ("log_sum_sq_probs",)
        )
        logits = hidden @ weight.T
        mask = torch.ones(1, n, dtype=torch.long)
        ours_logps, ours = (
            token_logps_from_logits(logits[None], targets[None], mask),
            log_sum_sq_probs(logits[None], mask),
        )
        tol = 2e-6 * max(1.0, logits.abs().max().item())  # fp32 sums in another order
        diff = (ours[0] - log_sum_sq).abs().max().item()
        worst = max(worst, diff / max(1.0, logits.abs().max().item()))
        assert diff <= tol, (scale, diff)
        assert (ours_logps[0] - log_probs).abs().max().item() <= tol
        assert (ours <= 1e-6).all() and (ours >= -math.log(v) - 1e-5).all()  # log sum p^2 in [-log V, 0]
    print(f"log sum p^2 vs TRL's kernel: max |difference| / max(1, |logit|) {worst:.1e}")


def test_wpo_weights_by_hand_and_without_gradient():
    """exp of the masked mean of (log p - log sum p^2); length 0 gives exp(0) = 1; no gradient flows."""
    token_logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    log_sum_sq = torch.tensor([[-0.5, -1.0, 9.0], [-0.25, 9.0, 9.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    w = wpo_weights(token_logps, log_sum_sq, mask)
    expected = torch.tensor([math.exp((-0.5 - 1.0) / 2), math.exp(-0.25), 1.0])
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=0)
    assert not w.requires_grad


# ---------------------------------------------------------------- K > 1

# Every loss type, and f-divergences on losses that admit them. forward_kl's 1 - exp(-lr) overflows at
# log-ratios of -1e4 as TRL's does, and so does the square of ipo's with alpha_divergence (TRL clamps its
# exponent at 80, and e^160 > fp32's max): those two are left out of the extremes.
K_CASES = [{"loss_type": t} for t in LOSS_TYPES] + [
    {"loss_type": "sigmoid", "f_divergence_type": "js_divergence"},
    {"loss_type": "sigmoid_norm", "f_divergence_type": "alpha_divergence"},
    {"loss_type": "ipo_norm", "f_divergence_type": "js_divergence"},
    {"loss_type": ("sigmoid", "bco_pair", "sft"), "loss_weights": (0.8, 0.2, 1.0)},
]


def objective_for(kind: str, settings: dict) -> Objective:
    s = dict(settings)
    types = s["loss_type"] if isinstance(s["loss_type"], tuple) else (s["loss_type"],)
    if "exo_pair" in types or "robust" in types:
        s.setdefault("label_smoothing", 0.1)
    return Objective(kind, **s)


@pytest.mark.parametrize("kind", ["mrpo", "multi_dpo"])
@pytest.mark.parametrize(
    "settings",
    K_CASES,
    ids=lambda s: case_id(
        {**s, "loss_type": list(s["loss_type"] if isinstance(s["loss_type"], tuple) else [s["loss_type"]])}
    ),
)
def test_extremes_zero_weight_and_single_pair_stay_finite(kind, settings):
    """Log-probs of -1e4, a weight of 0, B = 1 (spec): finite losses and gradients, references constant."""
    pi_w = torch.tensor([-1e4], requires_grad=True)
    pi_l = torch.tensor([-2.0], requires_grad=True)
    ref_w = torch.tensor([[-1e4, -3.0, -9e3]])
    ref_l = torch.tensor([[-1.0, -1e4, -2.0]])
    tokens = TokenCounts(
        torch.tensor([40.0]), torch.tensor([3.0]), torch.tensor([[40.0, 38, 41]]), torch.tensor([[3.0, 4, 3]])
    )
    o = objective_for(kind, settings)
    for delta in (0.0, 5.0):
        out = o(pi_w, pi_l, ref_w, ref_l, torch.tensor([0.0, 0.5, 0.5]), tokens, delta)
        assert torch.isfinite(out.losses).all() and torch.isfinite(out.chosen_rewards).all()
        out.losses.sum().backward()
        assert torch.isfinite(pi_w.grad).all()
        assert pi_l.grad is None if o.loss_types == ("sft",) else torch.isfinite(pi_l.grad).all()
        pi_w.grad = pi_l.grad = None


@pytest.mark.parametrize("kind", ["mrpo", "multi_dpo"])
@pytest.mark.parametrize(
    "settings",
    [s for s in K_CASES if s["loss_type"] not in ("aot", "aot_unpaired")],
    ids=lambda s: case_id(
        {**s, "loss_type": list(s["loss_type"] if isinstance(s["loss_type"], tuple) else [s["loss_type"]])}
    ),
)
def test_wpo_weighting_at_extremes_stays_finite_for_k_above_1(kind, settings):
    """use_weighting with K = 3 at the spec's extremes (log-probs of -1e4, a zero reference weight, B = 1 and
    B = 3) and at the weights' own extremes: a response whose adjusted log-probs underflow the weight to 0,
    one at the upper bound log V per token, an empty response. Losses and gradients finite; each pair's loss
    is the unweighted one times its weight."""
    token_logps = torch.tensor(
        [[-1e4 / 3] * 3 + [0.0], [-30.0, -40.0, 0.0, 0.0], [0.0] * 4, [-0.1] * 4, [-2.0] * 4, [0.0] * 4]
    )
    log_sum_sq = torch.tensor(
        [[-1e-3] * 4, [-1e-3] * 4, [0.0] * 4, [-math.log(5e4)] * 4, [-1.0] * 4, [-1.0] * 4]
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    w = wpo_weights(token_logps, log_sum_sq, mask)
    assert torch.isfinite(w).all() and w[0] == 0.0 and w[2] == 1.0 and w[3] > 1e4
    pair = w[:3] * w[3:]
    pi_w = torch.tensor([-1e4, -2.0, -5.0], requires_grad=True)
    pi_l = torch.tensor([-2.0, -1e4, -5.0], requires_grad=True)
    ref_w = torch.tensor([[-1e4, -3.0, -9e3], [-1.0, -1e4, -2.0], [-5.0, -5.0, -5.0]])
    ref_l = torch.tensor([[-1.0, -1e4, -2.0], [-1e4, -3.0, -9e3], [-5.0, -5.0, -5.0]])
    tokens = TokenCounts(
        torch.tensor([40.0, 3, 1]),
        torch.tensor([3.0, 40, 1]),
        torch.tensor([[40.0, 38, 41], [3, 4, 3], [1, 1, 1]]),
        torch.tensor([[3.0, 4, 3], [40, 38, 41], [1, 1, 1]]),
    )
    o = objective_for(kind, {**settings, "use_weighting": True})
    plain = objective_for(kind, settings)
    weights = torch.tensor([0.0, 0.5, 0.5])
    for rows in (slice(0, 1), slice(0, 3)):
        args = (pi_w[rows], pi_l[rows], ref_w[rows], ref_l[rows], weights)
        t = TokenCounts(
            *(x[rows] for x in (tokens.chosen, tokens.rejected, tokens.ref_chosen, tokens.ref_rejected))
        )
        out = o(*args, t, 0.0, pair[rows])
        assert torch.isfinite(out.losses).all() and torch.isfinite(out.chosen_rewards).all()
        torch.testing.assert_close(out.losses, plain(*args, t, 0.0).losses * pair[rows], rtol=1e-6, atol=0)
        out.losses.sum().backward()
        assert torch.isfinite(pi_w.grad).all()
        assert pi_l.grad is None if o.loss_types == ("sft",) else torch.isfinite(pi_l.grad).all()
        pi_w.grad = pi_l.grad = None


def test_use_weighting_refuses_the_sorting_losses_and_needs_its_weights():
    for types in ("aot", "aot_unpaired", ("sigmoid", "aot")):
        with pytest.raises(ValueError, match="use_weighting: got True; not with loss_type aot"):
            Objective(loss_type=types, use_weighting=True)
    with pytest.raises(ValueError, match="use_weighting: got 1; must be true or false"):
        Objective(use_weighting=1)
    pi, ref = torch.zeros(2), torch.zeros(2, 1)
    with pytest.raises(ValueError, match="use_weighting needs pair_weights"):
        Objective("dpo", use_weighting=True)(pi, pi, ref, ref, torch.ones(1))
    with pytest.raises(ValueError, match="pair_weights given but use_weighting is off"):
        Objective("dpo")(pi, pi, ref, ref, torch.ones(1), pair_weights=torch.ones(2))
    with pytest.raises(ValueError, match=r"pair_weights: expected shape \(2,\), got \(3,\)"):
        Objective("dpo", use_weighting=True)(pi, pi, ref, ref, torch.ones(1), pair_weights=torch.ones(3))


@pytest.mark.parametrize("kind", ["mrpo", "multi_dpo"])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize(
    "settings",
    K_CASES,
    ids=lambda s: case_id(
        {**s, "loss_type": list(s["loss_type"] if isinstance(s["loss_type"], tuple) else [s["loss_type"]])}
    ),
)
def test_identical_references_give_the_k1_value(kind, k, settings):
    pi_w, pi_l, ref_w, ref_l, n_w, n_l = log_probs(11)
    one = TokenCounts(n_w, n_l, n_w[:, None], n_l[:, None])
    many = TokenCounts(n_w, n_l, n_w[:, None].expand(-1, k), n_l[:, None].expand(-1, k))
    weights = torch.tensor({2: [0.3, 0.6], 4: [0.1, 0.6, 0.0, 0.3]}[k], dtype=D)  # with a zero weight
    o = objective_for(kind, settings)
    expected = objective_for("dpo", settings)(
        pi_w, pi_l, ref_w[:, None], ref_l[:, None], torch.ones(1), one, 0.3
    )
    out = o(pi_w, pi_l, ref_w[:, None].expand(-1, k), ref_l[:, None].expand(-1, k), weights, many, 0.3)
    torch.testing.assert_close(out.losses, expected.losses, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out.chosen_rewards, expected.chosen_rewards, atol=1e-9, rtol=1e-9)


def test_settings_are_validated_with_the_key_and_what_is_allowed():
    cases = [
        ({"loss_type": "kto"}, "loss_type: got 'kto'; allowed: sigmoid"),
        ({"loss_type": ("sigmoid", "sigmoid")}, "each loss type at most once"),
        ({"loss_type": "exo_pair"}, "label_smoothing: got 0.0; loss_type exo_pair needs it in"),
        ({"loss_type": ("sigmoid", "sft"), "loss_weights": (1.0,)}, "loss_weights: got \\[1.0\\]; needs one"),
        ({"loss_weights": (-1.0,)}, "loss_weights: got \\[-1.0\\]; must be finite numbers >= 0"),
        ({"loss_weights": (math.inf,)}, "loss_weights: got \\[inf\\]"),
        ({"loss_type": "nca_pair", "f_divergence_type": "forward_kl"}, "nca_pair have no f-divergence form"),
        ({"f_divergence_type": "chi2"}, "f_divergence_type: got 'chi2'; allowed: reverse_kl"),
        ({"f_alpha_divergence_coef": 0.0}, "f_alpha_divergence_coef: got 0.0; must be > 0"),
        ({"discopop_tau": math.nan}, "discopop_tau: got nan; must be > 0"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, r"label_smoothing: got 0.5; must be in \[0, 0.5\)"),
    ]
    for settings, message in cases:
        with pytest.raises(ValueError, match=message):
            Objective(**settings)


@pytest.mark.parametrize("name", LOSS_TYPES)
def test_registry_properties_agree_with_what_each_loss_does(name):
    """Each entry's declared properties against its losses: token counts matter exactly for the losses that
    need them, a margin loss sees only the margin, the running mean matters exactly for the stateful losses,
    a hyperparameter matters exactly for the losses that read it, and f-divergences and pair weights are
    refused exactly where the entry says."""
    entry = LOSSES[name]
    pi_w, pi_l, ref_w, ref_l, n_w, n_l = log_probs(5)
    tokens = TokenCounts(n_w, n_l, n_w[:, None], n_l[:, None])

    def loss(pw=pi_w, pl=pi_l, tokens=tokens, delta=0.3, **settings):
        o = Objective("dpo", name, **{"label_smoothing": 0.1, **settings})
        return o(pw, pl, ref_w[:, None], ref_l[:, None], torch.ones(1, dtype=D), tokens, delta).losses

    base = loss()

    def changed(losses):
        return not torch.allclose(losses, base, rtol=1e-12, atol=0)

    longer = TokenCounts(n_w + 3, n_l + 1, n_w[:, None] + 3, n_l[:, None] + 1)
    assert changed(loss(tokens=longer)) == entry.needs_tokens
    if entry.needs_tokens:
        with pytest.raises(ValueError, match="needs the response token counts"):
            loss(tokens=None)
    if entry.margin:  # the same shift of both log-ratios (per token where the loss is) leaves h unchanged
        shift_w, shift_l = (2.0 * n_w, 2.0 * n_l) if entry.per_token else (2.0, 2.0)
        torch.testing.assert_close(loss(pw=pi_w + shift_w, pl=pi_l + shift_l), base, rtol=1e-9, atol=1e-9)
    assert changed(loss(delta=-0.5)) == entry.keeps_state
    for setting, other in (("label_smoothing", 0.2), ("discopop_tau", 0.5)):
        assert changed(loss(**{setting: other})) == (setting in entry.reads), setting
    for setting, value, admitted in (
        ("f_divergence_type", "js_divergence", entry.f_divergence),
        ("use_weighting", True, entry.pair_weights),
    ):
        if admitted:
            Objective(loss_type=name, label_smoothing=0.1, **{setting: value})
        else:
            with pytest.raises(ValueError, match=f"^{setting}: got"):
                Objective(loss_type=name, label_smoothing=0.1, **{setting: value})


def test_objective_reads_every_field_of_the_train_config_by_name():
    from mrpo.config.schema import TrainConfig

    train = TrainConfig(
        objective="multi_dpo",
        loss_type=("sigmoid", "sft"),
        loss_weights=(1.0, 0.5),
        beta=0.3,
        label_smoothing=0.1,
        discopop_tau=0.2,
        use_weighting=True,
    )
    o = Objective.from_train_config(train)
    assert all(getattr(o, f.name) == getattr(train, f.name) for f in dataclasses.fields(Objective))


def test_running_reward_mean():
    state = RunningRewardMean()
    for x in (1.0, -2.0, 4.0):
        state.update(x)
    assert state.mean == pytest.approx(1.0) and state.count == 3
    copy = RunningRewardMean()
    copy.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert copy == state
    with pytest.raises(ValueError, match="loss state is 'x'"):
        copy.load_state_dict({"name": "x"})


# ---------------------------------------------------------------- training


def train_steps(cfg, steps: int):
    from mrpo.training.setup import build_trainer, prepare_training

    trainer = build_trainer(cfg, prepare_training(cfg))
    trainer.args.max_steps, trainer.args.save_strategy, trainer.args.eval_strategy = steps, "no", "no"
    trainer.train()
    return [e for e in trainer.state.log_history if "loss" in e], trainer


TRAIN_CASES = [
    {"train.loss_type": t} for t in LOSS_TYPES if t not in ("sigmoid", "ipo", "ipo_norm", "hinge")
] + [
    {"train.loss_type": ["sigmoid", "bco_pair", "sft"], "train.loss_weights": [0.8, 0.2, 1.0]},
    {
        "train.loss_type": "sigmoid",
        "train.f_divergence_type": "js_divergence",
        "train.objective": "multi_dpo",
    },
    {"train.loss_type": "sigmoid_norm", "train.f_divergence_type": "alpha_divergence"},
]


@pytest.mark.parametrize(
    "overrides",
    TRAIN_CASES,
    ids=lambda o: "-".join(str(v) if not isinstance(v, list) else "+".join(map(str, v)) for v in o.values()),
)
@pytest.mark.slow
def test_each_loss_trains(scored, tmp_path, overrides):
    types = overrides["train.loss_type"]
    if types in ("exo_pair", "robust"):
        overrides = {**overrides, "train.label_smoothing": 0.1}
    cfg = config(scored, tmp_path, **{"train.max_steps": 2, "train.learning_rate": 1e-3, **overrides})
    logs, trainer = train_steps(cfg, 2)
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) for e in logs)
    assert all(sum(e[f"weight/{n}"] for n in REFERENCES) == pytest.approx(1.0, abs=1e-5) for e in logs)
    if "bco_pair" in (types if isinstance(types, list) else [types]):
        assert trainer.loss_state.count == 2 and trainer.loss_state.mean != 0.0


@pytest.mark.slow
def test_bco_reward_mean_is_checkpointed_and_resumed(scored, tmp_path):
    """The running mean is saved with each checkpoint and restored on resume: a run resumed from step 2 ends
    with the state and loss of the straight run."""
    from mrpo.training.callbacks import LOSS_STATE_FILE
    from mrpo.training.setup import build_trainer, prepare_training

    common = {
        "train.loss_type": "bco_pair",
        "train.max_steps": 4,
        "train.save_steps": 2,
        "train.learning_rate": 1e-3,
    }
    cfg = config(scored, tmp_path / "straight", **common)
    straight = build_trainer(cfg, prepare_training(cfg))
    straight.args.eval_strategy = "no"
    straight.train()
    saved = json.loads((Path(cfg.train.checkpoint_dir) / "checkpoint-2" / LOSS_STATE_FILE).read_text())
    assert saved["count"] == 2 and saved["name"] == "bco_reward_mean"

    resumed = build_trainer(cfg, prepare_training(cfg))
    resumed.args.eval_strategy = "no"
    resumed.train(resume_from_checkpoint=str(Path(cfg.train.checkpoint_dir) / "checkpoint-2"))
    assert resumed.loss_state == straight.loss_state and resumed.loss_state.count == 4
    final = [e["loss"] for e in straight.state.log_history if "loss" in e][-1]
    assert [e["loss"] for e in resumed.state.log_history if "loss" in e][-1] == pytest.approx(final, abs=1e-6)

    fresh = build_trainer(cfg, prepare_training(cfg))
    (Path(cfg.train.checkpoint_dir) / "checkpoint-2" / LOSS_STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no bco_pair reward-mean state"):
        fresh.train(resume_from_checkpoint=str(Path(cfg.train.checkpoint_dir) / "checkpoint-2"))
