"""Reference-weighting strategies (spec section 5):
hand-computed values, no lookahead, bandit behaviour, state."""

import json

import pytest
import torch

from mrpo.core.weighting import make_strategy

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


# ---------------------------------------------------------------- margins that live on an accelerator


class OffHostTensor(torch.Tensor):
    """Behaves like a CUDA tensor on a CPU-only machine: its values cannot be read on the host (numpy, tolist,
    item) and it does not mix with host tensors of dim > 0, until moved with `.cpu()` or `.to("cpu")`."""

    _READS = {torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.item}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in cls._READS:
            raise TypeError(f"{func.__name__}: can't read an off-host tensor on the host; call .cpu() first")
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and _targets_cpu(args[1:], kwargs)):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        plain = [
            a
            for a in _leaves(args) + _leaves(list(kwargs.values()))
            if type(a) is torch.Tensor and a.dim() > 0
        ]
        if plain:
            raise RuntimeError(
                f"{func.__name__}: expected all tensors to be on the same device (off-host and cpu)"
            )
        return super().__torch_function__(func, types, args, kwargs)


def _targets_cpu(args, kwargs) -> bool:
    targets = list(args) + [kwargs.get("device")]
    return any(isinstance(t, str | torch.device) and torch.device(t).type == "cpu" for t in targets)


def _leaves(values) -> list:
    out = []
    for v in values:
        out.extend(_leaves(v) if isinstance(v, list | tuple) else [v])
    return out


def test_off_host_tensor_refuses_what_a_cuda_tensor_refuses():
    off = VAL.as_subclass(OffHostTensor)
    with pytest.raises(TypeError, match="off-host"):
        (off > 0).to(D).mean(dim=0).numpy()
    with pytest.raises(TypeError, match="off-host"):
        off.tolist()
    with pytest.raises(RuntimeError, match="same device"):
        off + VAL
    back = off.to("cpu")
    assert type(back) is torch.Tensor and torch.equal(back, VAL)
    assert type(off.to(torch.float32)) is OffHostTensor  # a dtype change stays off the host


@pytest.mark.parametrize("name", ["uniform", "fixed", "arwc", "vdw", "vaw", "window", "thompson"])
def test_every_strategy_takes_margins_from_an_accelerator(name):
    """The trainer passes margins where the policy runs (CUDA); thompson used to call .numpy() on them."""
    kwargs = {"fixed_weights": [1, 2, 3], "window_size": 5, "seed": 3}
    on_host, off_host = make_strategy(name, 3, **kwargs), make_strategy(name, 3, **kwargs)
    on_host.fit(VAL)
    off_host.fit(VAL.as_subclass(OffHostTensor))
    for step in range(3):
        batch = VAL + step
        expected = (on_host.weights(batch), on_host.eval_weights(batch))
        got = (
            off_host.weights(batch.as_subclass(OffHostTensor)),
            off_host.eval_weights(batch.as_subclass(OffHostTensor)),
        )
        for e, g in zip(expected, got, strict=True):
            assert type(g) is torch.Tensor and g.device.type == "cpu" and g.dtype == D
            torch.testing.assert_close(g, e, rtol=0, atol=0)
        on_host.update(batch)
        off_host.update(batch.as_subclass(OffHostTensor))
    assert json.dumps(off_host.state_dict()) == json.dumps(on_host.state_dict())


def test_thompson_evaluates_with_its_posterior_mean():
    s = make_strategy("thompson", 3, seed=0)
    s.update(torch.tensor([[1.0, -1.0, 1.0], [1.0, -1.0, -1.0]], dtype=D))  # correct shares 1, 0, 0.5
    # posterior means 2/3, 1/3, 1/2 (Beta(1 + share, 1 + 1 - share)), normalised
    mean = torch.tensor([2 / 3, 1 / 3, 1 / 2], dtype=D)
    torch.testing.assert_close(s.eval_weights(VAL), mean / mean.sum())
    assert not torch.allclose(s.weights(VAL), s.eval_weights(VAL))  # training draws a sample
    torch.testing.assert_close(make_strategy("window", 3).eval_weights(VAL), torch.full((3,), 1 / 3, dtype=D))
