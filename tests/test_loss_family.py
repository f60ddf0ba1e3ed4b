"""The DPO family against the combined reference: each loss type equals TRL 1.16's DPOTrainer for K = 1, stays
finite at the spec's extremes for K > 1, reduces to K = 1 over identical references, and trains.

TRL's losses live inside `DPOTrainer._compute_loss`, after the policy forward. The parity tests run that
method of a real DPOTrainer (built on the tiny zoo's anchor, reference log-probs precomputed) with a policy
whose per-token log-probs are given: the sequence log-prob of each response on its first response token, 0 on
the others, so TRL's token sums, token means and response lengths are exactly the ones handed to our
objective.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REFERENCES, config, trl_dpo_trainer

from mrpo.losses import (
    F_DIVERGENCE_LOSSES,
    LOSS_TYPES,
    Objective,
    RunningRewardMean,
    TokenCounts,
    bco_pair_loss,
    discopop_loss,
    ipo_loss,
)

D = torch.float64
TRL_NAME = {
    "ipo_norm": "ipo"
}  # TRL's ipo averages per token: ours is ipo_norm; our token-summed ipo is not TRL's
MAX_DIFFERENCE: dict[str, float] = {}  # loss -> max |ours - TRL| over its cases, printed at the end


# ---------------------------------------------------------------- TRL on given log-probs


class GivenLogProbs(torch.nn.Module):
    """A policy whose per-token log-probs are given (what TRL's fused LM head returns), for TRL's loss
    code."""

    def __init__(self, per_token: torch.Tensor):
        super().__init__()
        self.per_token = per_token

    def forward(self, input_ids, **_):
        zeros = torch.zeros_like(self.per_token)
        return SimpleNamespace(
            log_probs=self.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
        )


@pytest.fixture(scope="module")
def trl(tiny_zoo, tmp_path_factory):
    from mrpo.config import ReferenceConfig
    from mrpo.models import load_model, load_tokenizer

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


def our_loss_and_grads(batch, settings: dict, bco_delta: float = 0.0):
    pi_w, pi_l, ref_w, ref_l, n_w, n_l = batch
    pi_w, pi_l = pi_w.clone().requires_grad_(True), pi_l.clone().requires_grad_(True)
    types = tuple(settings["loss_type"])
    objective = Objective(
        "dpo",
        types[0] if len(types) == 1 else types,
        settings.get("beta", 0.1),
        label_smoothing=settings.get("label_smoothing", 0.0),
        loss_weights=settings.get("loss_weights"),
        f_divergence_type=settings.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=settings.get("f_alpha_divergence_coef", 0.5),
        discopop_tau=settings.get("discopop_tau", 0.05),
    )
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
    from mrpo.train import build_trainer, prepare_training

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


def test_bco_reward_mean_is_checkpointed_and_resumed(scored, tmp_path):
    """The running mean is saved with each checkpoint and restored on resume: a run resumed from step 2 ends
    with the state and loss of the straight run."""
    from mrpo.train import build_trainer, prepare_training
    from mrpo.trainer import LOSS_STATE_FILE

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
