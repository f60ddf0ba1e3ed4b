"""The MRPO objective against hand computation, DPO, the authors' demo formula, and its invariants."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mrpo.core.objective import mrpo_loss, multi_dpo_loss
from mrpo.core.reference import clip_to_anchor, harmonic_reference, trust_region_bands

D = torch.float64


def t(*values):
    return torch.tensor(values, dtype=D)


def scalar_mrpo(
    pi_w, pi_l, refs_w, refs_l, alpha, *, beta, eps, adaptive, loss_type, s=0.0, combine="harmonic"
):
    """Spec sections 1-4 for ONE pair with the math module only:
    an implementation independent of mrpo.core."""
    k = len(refs_w)
    if adaptive:
        b_w, b_l = abs(sum(refs_w) / k), abs(sum(refs_l) / k)
        eps_w, eps_l = eps * b_w / (b_w + b_l), eps * b_l / (b_w + b_l)
    else:
        eps_w = eps_l = eps

    def clip(refs, e):
        a = refs[0]
        return [a] + [min(max(r, a - e * abs(a)), a + e * abs(a)) for r in refs[1:]]

    cw, cl = clip(refs_w, eps_w), clip(refs_l, eps_l)
    total = sum(alpha)
    alpha = [x / total for x in alpha]

    def per_pair(h):
        if loss_type == "sigmoid":
            ls = lambda z: -math.log1p(math.exp(-z))  # noqa: E731
            return -(1 - s) * ls(beta * h) - s * ls(-beta * h)
        if loss_type == "ipo":
            return (h - 1 / (2 * beta)) ** 2
        return max(0.0, 1 - beta * h)

    if combine == "harmonic":
        ref_w = -math.log(sum(a * math.exp(-r) for a, r in zip(alpha, cw, strict=True)))
        ref_l = -math.log(sum(a * math.exp(-r) for a, r in zip(alpha, cl, strict=True)))
        return per_pair((pi_w - pi_l) - (ref_w - ref_l))
    return sum(a * per_pair((pi_w - pi_l) - (rw - rl)) for a, rw, rl in zip(alpha, cw, cl, strict=True))


def test_k2_worked_example_by_hand():
    # anchor (-11, -11.5), other (-14, -10); b_w = -12.5, b_l = -10.75
    # eps_w = 0.1 * 12.5 / 23.25 = 0.0537634, eps_l = 0.1 * 10.75 / 23.25 = 0.0462366
    # other_w clipped up to -11 - 0.0537634 * 11 = -11.5913978;
    # other_l down to -11.5 + 0.0462366 * 11.5 = -10.9682796
    # ref_w = -log(.5 e^11 + .5 e^11.5913978) = -11.3387952; ref_l = -11.2690720;
    # h = 2 - (-0.0697232) = 2.0697232
    pi_w, pi_l = t(-10.0), t(-12.0)
    ref_w, ref_l = t(-11.0, -14.0).unsqueeze(0), t(-11.5, -10.0).unsqueeze(0)
    w = t(0.5, 0.5)
    expected = {"sigmoid": 0.5950061810861841, "ipo": 8.586521894848135, "hinge": 0.7930276760793789}
    for loss_type, value in expected.items():
        out = mrpo_loss(pi_w, pi_l, ref_w, ref_l, w, beta=0.1, epsilon=0.1, loss_type=loss_type)
        assert out.losses.item() == pytest.approx(value, abs=1e-9)
    assert out.ref_chosen_logps.item() == pytest.approx(-11.338795208908317, abs=1e-9)
    assert out.ref_rejected_logps.item() == pytest.approx(-11.269071969702106, abs=1e-9)
    assert out.chosen_rewards.item() == pytest.approx(0.1 * (-10 + 11.338795208908317), abs=1e-9)
    assert out.clipped_fraction.item() == 1.0  # both of the other reference's values were clipped


PAIRS = [  # pi_w, pi_l, refs_w (anchor first), refs_l
    (-20.0, -25.0, [-22.0, -21.0, -30.0], [-24.0, -26.5, -23.0]),
    (-5.5, -4.0, [-6.0, -5.9, -6.2], [-3.5, -3.6, -2.0]),
    (-41.0, -40.0, [-40.0, -55.0, -39.0], [-42.0, -41.5, -60.0]),
]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("k", [2, 3])
def test_against_scalar_reference(loss_type, adaptive, k):
    alpha = [0.2, 0.5, 0.3][:k]
    pi_w, pi_l = t(*[p[0] for p in PAIRS]), t(*[p[1] for p in PAIRS])
    ref_w = torch.tensor([p[2][:k] for p in PAIRS], dtype=D)
    ref_l = torch.tensor([p[3][:k] for p in PAIRS], dtype=D)
    for fn, combine in ((mrpo_loss, "harmonic"), (multi_dpo_loss, "sum")):
        out = fn(
            pi_w,
            pi_l,
            ref_w,
            ref_l,
            t(*alpha),
            beta=0.5,
            epsilon=0.1,
            adaptive_epsilon=adaptive,
            loss_type=loss_type,
        )
        expected = [
            scalar_mrpo(
                p[0],
                p[1],
                p[2][:k],
                p[3][:k],
                alpha,
                beta=0.5,
                eps=0.1,
                adaptive=adaptive,
                loss_type=loss_type,
                combine=combine,
            )
            for p in PAIRS
        ]
        torch.testing.assert_close(out.losses, t(*expected), atol=1e-9, rtol=0)


def test_label_smoothing_matches_scalar_reference():
    p = PAIRS[0]
    out = mrpo_loss(
        t(p[0]),
        t(p[1]),
        torch.tensor([p[2]], dtype=D),
        torch.tensor([p[3]], dtype=D),
        t(1, 1, 1),
        beta=0.2,
        epsilon=0.1,
        label_smoothing=0.1,
    )
    expected = scalar_mrpo(
        p[0], p[1], p[2], p[3], [1, 1, 1], beta=0.2, eps=0.1, adaptive=True, loss_type="sigmoid", s=0.1
    )
    assert out.losses.item() == pytest.approx(expected, abs=1e-9)


def dpo(pi_w, pi_l, r_w, r_l, beta):
    """DPO (Rafailov et al. 2023) written directly: -log sigmoid(beta * ((pi_w - r_w) - (pi_l - r_l)))."""
    return -torch.nn.functional.logsigmoid(beta * ((pi_w - r_w) - (pi_l - r_l)))


def test_k1_is_dpo():
    g = torch.Generator().manual_seed(0)
    pi_w, pi_l = -50 * torch.rand(64, generator=g, dtype=D), -50 * torch.rand(64, generator=g, dtype=D)
    r_w, r_l = -50 * torch.rand(64, 1, generator=g, dtype=D), -50 * torch.rand(64, 1, generator=g, dtype=D)
    for fn in (mrpo_loss, multi_dpo_loss):
        out = fn(pi_w, pi_l, r_w, r_l, t(1.0), beta=0.1, epsilon=0.5)
        torch.testing.assert_close(out.losses, dpo(pi_w, pi_l, r_w[:, 0], r_l[:, 0], 0.1), atol=1e-6, rtol=0)
        torch.testing.assert_close(out.chosen_rewards, 0.1 * (pi_w - r_w[:, 0]), atol=1e-6, rtol=0)
        assert out.clipped_fraction.item() == 0.0


def demo_combined(r1, r2, a):
    """The authors' demo code: r1 + r2 - log(a*exp(r1) + (1-a)*exp(r2)), r2 their anchor."""
    return r1 + r2 - torch.log(a * torch.exp(r1) + (1 - a) * torch.exp(r2))


def test_parity_with_authors_demo_when_its_weights_are_passed():
    anchor_w, anchor_l = t(-30.0, -42.0, -18.0), t(-33.0, -40.0, -19.5)
    other_w, other_l = t(-31.0, -41.0, -18.5), t(-32.5, -41.5, -19.0)  # inside the band: no clipping
    pi_w, pi_l = t(-29.0, -43.0, -17.0), t(-34.0, -39.0, -20.0)
    beta = 0.1
    # The demo's adaptive a is the OTHER reference's confidence and weighs the anchor (spec section 6).
    m_other, m_anchor = (other_w - other_l).abs(), (anchor_w - anchor_l).abs()
    a = m_other / (m_other + m_anchor)
    demo_w, demo_l = demo_combined(other_w, anchor_w, a), demo_combined(other_l, anchor_l, a)
    demo_loss = -torch.nn.functional.logsigmoid(beta * ((pi_w - pi_l) - (demo_w - demo_l)))

    weights = torch.stack([a, 1 - a], dim=1)  # (anchor, other), per pair
    out = mrpo_loss(
        pi_w,
        pi_l,
        torch.stack([anchor_w, other_w], 1),
        torch.stack([anchor_l, other_l], 1),
        weights,
        beta=beta,
        epsilon=0.1,
    )
    assert out.clipped_fraction.item() == 0.0
    torch.testing.assert_close(out.ref_chosen_logps, demo_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.losses, demo_loss, atol=1e-6, rtol=0)
    # ... and this project's own-confidence weighting differs from the demo's on the same pairs.
    own = mrpo_loss(
        pi_w,
        pi_l,
        torch.stack([anchor_w, other_w], 1),
        torch.stack([anchor_l, other_l], 1),
        torch.stack([1 - a, a], dim=1),
        beta=beta,
        epsilon=0.1,
    )
    assert (own.losses - demo_loss).abs().max() > 1e-4


@pytest.mark.parametrize("fn", [mrpo_loss, multi_dpo_loss])
def test_extreme_values_zero_weight_and_single_pair_stay_finite(fn):
    pi_w = torch.tensor([-1e4], dtype=torch.float32, requires_grad=True)
    pi_l = torch.tensor([-2.0], dtype=torch.float32, requires_grad=True)
    ref_w = torch.tensor([[-1e4, -3.0, -9e3]], requires_grad=True)
    ref_l = torch.tensor([[-1.0, -1e4, -2.0]], requires_grad=True)
    weights = torch.tensor([0.0, 0.5, 0.5], requires_grad=True)
    for loss_type in ("sigmoid", "ipo", "hinge"):
        out = fn(pi_w, pi_l, ref_w, ref_l, weights, beta=0.1, epsilon=0.1, loss_type=loss_type)
        assert torch.isfinite(out.losses).all() and torch.isfinite(out.chosen_rewards).all()
        out.losses.sum().backward()
        assert torch.isfinite(pi_w.grad).all() and torch.isfinite(pi_l.grad).all()
        # references and weights are constants of the objective
        assert ref_w.grad is None and ref_l.grad is None and weights.grad is None
        pi_w.grad = pi_l.grad = None


def test_zero_weight_removes_a_reference_exactly():
    p = PAIRS[0]
    ref_w, ref_l = torch.tensor([p[2]], dtype=D), torch.tensor([p[3]], dtype=D)
    with_zero = mrpo_loss(
        t(p[0]), t(p[1]), ref_w, ref_l, t(0.5, 0.0, 0.5), beta=0.1, epsilon=0.1, adaptive_epsilon=False
    )
    without = mrpo_loss(
        t(p[0]),
        t(p[1]),
        ref_w[:, [0, 2]],
        ref_l[:, [0, 2]],
        t(0.5, 0.5),
        beta=0.1,
        epsilon=0.1,
        adaptive_epsilon=False,
    )
    assert with_zero.losses.item() == pytest.approx(without.losses.item(), abs=1e-12)


def test_bad_arguments_are_named():
    one, refs = t(-1.0), torch.tensor([[-1.0, -2.0]], dtype=D)
    with pytest.raises(ValueError, match="weights: expected shape"):
        mrpo_loss(one, one, refs, refs, t(1, 1, 1), beta=0.1, epsilon=0.1)
    with pytest.raises(ValueError, match="weights: must be non-negative"):
        mrpo_loss(one, one, refs, refs, t(1, -1), beta=0.1, epsilon=0.1)
    with pytest.raises(ValueError, match="loss_type: got 'kto'"):
        mrpo_loss(one, one, refs, refs, t(1, 1), beta=0.1, epsilon=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="beta: got 0"):
        mrpo_loss(one, one, refs, refs, t(1, 1), beta=0, epsilon=0.1)
    with pytest.raises(ValueError, match=r"epsilon: got 1.0; must be in \[0, 1\)"):
        mrpo_loss(one, one, refs, refs, t(1, 1), beta=0.1, epsilon=1.0)


logprob = st.floats(min_value=-500.0, max_value=-0.01, allow_nan=False)


@st.composite
def batches(draw, max_k=5):
    b, k = draw(st.integers(1, 4)), draw(st.integers(1, max_k))
    cells = st.lists(logprob, min_size=b * k, max_size=b * k)
    ref_w = torch.tensor(draw(cells), dtype=D).reshape(b, k)
    ref_l = torch.tensor(draw(cells), dtype=D).reshape(b, k)
    weights = torch.tensor(draw(st.lists(st.floats(0.01, 1.0), min_size=k, max_size=k)), dtype=D)
    pi = torch.tensor(draw(st.lists(logprob, min_size=2 * b, max_size=2 * b)), dtype=D)
    return pi[:b], pi[b:], ref_w, ref_l, weights


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(batches(), st.floats(0.0, 0.99), st.booleans())
def test_combined_reference_lies_within_clipped_references(batch, eps, adaptive):
    _, _, ref_w, ref_l, weights = batch
    band_w, _ = trust_region_bands(ref_w, ref_l, eps, adaptive)
    clipped = clip_to_anchor(ref_w, band_w)
    combined = harmonic_reference(clipped, (weights / weights.sum()).expand_as(clipped))
    tol = 1e-9 * clipped.abs().max()
    assert (combined >= clipped.min(dim=-1).values - tol).all()
    assert (combined <= clipped.max(dim=-1).values + tol).all()


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(batches(), st.randoms(use_true_random=False))
def test_permuting_non_anchor_references_changes_nothing(batch, rnd):
    pi_w, pi_l, ref_w, ref_l, weights = batch
    k = ref_w.shape[1]
    rest = list(range(1, k))
    rnd.shuffle(rest)
    perm = [0, *rest]
    for fn in (mrpo_loss, multi_dpo_loss):
        a = fn(pi_w, pi_l, ref_w, ref_l, weights, beta=0.1, epsilon=0.1)
        b = fn(pi_w, pi_l, ref_w[:, perm], ref_l[:, perm], weights[perm], beta=0.1, epsilon=0.1)
        torch.testing.assert_close(a.losses, b.losses, atol=1e-9, rtol=1e-9)


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(batches(max_k=1), st.integers(1, 6), st.sampled_from(["mrpo", "multi_dpo"]))
def test_uniform_weights_over_identical_references_is_dpo(batch, k, objective):
    pi_w, pi_l, ref_w, ref_l, _ = batch
    fn = mrpo_loss if objective == "mrpo" else multi_dpo_loss
    out = fn(
        pi_w, pi_l, ref_w.expand(-1, k), ref_l.expand(-1, k), torch.ones(k, dtype=D), beta=0.1, epsilon=0.1
    )
    torch.testing.assert_close(
        out.losses, dpo(pi_w, pi_l, ref_w[:, 0], ref_l[:, 0], 0.1), atol=1e-9, rtol=1e-9
    )


def test_bf16_policy_is_computed_in_fp32():
    out = mrpo_loss(
        torch.tensor([-10.0], dtype=torch.bfloat16),
        torch.tensor([-12.0], dtype=torch.bfloat16),
        torch.tensor([[-11.0, -14.0]], dtype=D),
        torch.tensor([[-11.5, -10.0]], dtype=D),
        torch.tensor([0.5, 0.5]),
        beta=0.1,
        epsilon=0.1,
    )
    assert out.losses.dtype == torch.float32
    assert out.losses.item() == pytest.approx(0.5950061810861841, abs=1e-6)


def test_ipo_norm_is_ipo_on_per_token_log_probs():
    """Each log-prob divided by its own length (each reference's in its own tokenizer), then IPO."""
    from mrpo.core.inputs import TokenCounts

    pi_w, pi_l = t(-10.0, -30.0), t(-12.0, -20.0)
    ref_w, ref_l = t(-11.0, -14.0, -29.0, -33.0).reshape(2, 2), t(-11.5, -10.0, -21.0, -19.0).reshape(2, 2)
    tokens = TokenCounts(
        t(5.0, 10.0), t(4.0, 8.0), t(5.0, 9.0, 10.0, 12.0).reshape(2, 2), t(4.0, 3.0, 8.0, 7.0).reshape(2, 2)
    )
    w = t(0.3, 0.7)
    for fn in (mrpo_loss, multi_dpo_loss):
        norm = fn(pi_w, pi_l, ref_w, ref_l, w, beta=0.1, epsilon=0.1, loss_type="ipo_norm", tokens=tokens)
        by_hand = fn(
            pi_w / tokens.chosen,
            pi_l / tokens.rejected,
            ref_w / tokens.ref_chosen,
            ref_l / tokens.ref_rejected,
            w,
            beta=0.1,
            epsilon=0.1,
            loss_type="ipo",
        )
        torch.testing.assert_close(norm.losses, by_hand.losses, rtol=0, atol=1e-15)
    # K = 1 by hand: h = (-10/5 - -11/5) - (-12/4 - -11.5/4) = 0.2 + 0.125; loss (h - 5)^2
    k1 = mrpo_loss(
        pi_w[:1],
        pi_l[:1],
        ref_w[:1, :1],
        ref_l[:1, :1],
        t(1.0),
        beta=0.1,
        epsilon=0.1,
        loss_type="ipo_norm",
        tokens=TokenCounts(t(5.0), t(4.0), t(5.0).reshape(1, 1), t(4.0).reshape(1, 1)),
    )
    assert k1.losses.item() == pytest.approx((0.325 - 5) ** 2, abs=1e-12)
    with pytest.raises(ValueError, match="ipo_norm' needs the response token counts"):
        mrpo_loss(pi_w, pi_l, ref_w, ref_l, w, beta=0.1, epsilon=0.1, loss_type="ipo_norm")
