"""Reference-weighting strategies (spec section 5): hand-computed values, no lookahead, bandit behaviour, state."""

import json

import pytest
import torch

from mrpo.weighting import make_strategy

D = torch.float64

VAL = torch.tensor(
    [  # validation margins m_k = r_k^w - r_k^l for K = 3
        [2.0, -1.0, 0.5],
        [4.0, 3.0, -0.5],
        [-2.0, 1.0, 0.0],
        [1.0, -2.0, 1.0],
    ],
    dtype=D,
)


def test_uniform_and_fixed():
    batch = torch.zeros(5, 3, dtype=D)
    torch.testing.assert_close(make_strategy("uniform", 3).weights(batch), torch.full((3,), 1 / 3, dtype=D))
    torch.testing.assert_close(
        make_strategy("fixed", 3, fixed_weights=[2, 0, 6]).weights(batch),
        torch.tensor([0.25, 0, 0.75], dtype=D),
    )
    with pytest.raises(ValueError, match="fixed_weights"):
        make_strategy("fixed", 3, fixed_weights=[1, 1])
    with pytest.raises(ValueError, match="strategy: got 'best'"):
        make_strategy("best", 3)


def test_arwc_is_per_pair_confidence():
    w = make_strategy("arwc", 3).weights(torch.tensor([[2.0, -1.0, 1.0], [0.0, 0.0, 0.0]], dtype=D))
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]], dtype=D))


def test_vdw_matches_hand_computation():
    # mean |m|: (2+4+2+1)/4 = 2.25, (1+3+1+2)/4 = 1.75, (0.5+0.5+0+1)/4 = 0.5; total 4.5
    s = make_strategy("vdw", 3)
    s.fit(VAL)
    torch.testing.assert_close(
        s.weights(torch.zeros(2, 3, dtype=D)), torch.tensor([0.5, 1.75 / 4.5, 0.5 / 4.5], dtype=D)
    )


def test_vaw_matches_hand_computation():
    # share of m > 0: 3/4, 2/4, 2/4 (a margin of exactly 0 is not correct); total 1.75
    s = make_strategy("vaw", 3)
    s.fit(VAL)
    torch.testing.assert_close(
        s.weights(torch.zeros(1, 3, dtype=D)), torch.tensor([0.75, 0.5, 0.5], dtype=D) / 1.75
    )


def test_offline_strategies_need_fitting_on_a_non_empty_split():
    s = make_strategy("vdw", 3)
    with pytest.raises(RuntimeError, match="call fit"):
        s.weights(VAL)
    with pytest.raises(ValueError, match="validation split, which has no pairs"):
        s.fit(torch.zeros(0, 3, dtype=D))
    with pytest.raises(ValueError, match=r"margins: expected shape \(B, 3\)"):
        s.fit(torch.zeros(4, 2, dtype=D))


def test_window_never_uses_the_current_batch():
    s = make_strategy("window", 2, window_size=3)
    first = torch.tensor([[3.0, 1.0], [1.0, 1.0]], dtype=D)
    # nothing seen yet: uniform, whatever the current batch says
    torch.testing.assert_close(s.weights(first), torch.tensor([0.5, 0.5], dtype=D))
    s.update(first)
    # two different current batches get the same weights: the mean arwc of `first` = ([.75,.25] + [.5,.5]) / 2
    a = s.weights(torch.tensor([[0.0, 9.0]], dtype=D))
    b = s.weights(torch.tensor([[9.0, 0.0]], dtype=D))
    torch.testing.assert_close(a, torch.tensor([0.625, 0.375], dtype=D))
    torch.testing.assert_close(a, b)
    # window of 3 pairs: after two more pairs, the oldest (the [3, 1] pair) drops out
    s.update(torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=D))
    torch.testing.assert_close(s.weights(first), torch.tensor([0.5 / 3, 2.5 / 3], dtype=D))


def run_bandit(strategy, steps, seed=0):
    """Reference 0 always orders pairs correctly; references 1 and 2 only for about 20% of pairs."""
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        noise = torch.randn(8, 3, generator=g, dtype=D)
        margins = torch.cat([noise[:, :1].abs() + 0.1, noise[:, 1:] - 0.85], dim=1)
        history.append(strategy.weights(margins))
        strategy.update(margins)
    return torch.stack(history)


def test_thompson_concentrates_on_the_reliable_reference():
    history = run_bandit(make_strategy("thompson", 3, seed=7), 300)
    # normalised Beta samples converge to accuracy shares 1 : 0.2 : 0.2, i.e. about 0.71 for reference 0
    late = history[-50:].mean(dim=0)
    assert 0.65 < late[0] < 0.78, late
    assert late[0] > history[:3].mean(dim=0)[0] + 0.15


def test_thompson_is_deterministic_under_a_seed():
    a = run_bandit(make_strategy("thompson", 3, seed=1), 20)
    b = run_bandit(make_strategy("thompson", 3, seed=1), 20)
    c = run_bandit(make_strategy("thompson", 3, seed=2), 20)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    s = make_strategy("thompson", 3, seed=1)
    torch.testing.assert_close(
        s.weights(VAL), s.weights(VAL), rtol=0, atol=0
    )  # weights() draws, never advances


@pytest.mark.parametrize("name", ["uniform", "fixed", "arwc", "vdw", "vaw", "window", "thompson"])
def test_state_round_trips_through_json(name):
    kwargs = {"fixed_weights": [1, 2, 3], "window_size": 5, "seed": 3}
    original = make_strategy(name, 3, **kwargs)
    original.fit(VAL)
    run_bandit(original, 6)
    restored = make_strategy(name, 3, **kwargs)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    torch.testing.assert_close(
        run_bandit(restored, 10, seed=5), run_bandit(original, 10, seed=5), rtol=0, atol=0
    )


def test_state_of_another_strategy_is_refused():
    with pytest.raises(ValueError, match="weighting state is for strategy 'window', not 'thompson'"):
        make_strategy("thompson", 3).load_state_dict(make_strategy("window", 3).state_dict())
