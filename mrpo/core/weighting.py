"""Reference weights alpha (docs/mrpo-spec.md section 5) behind one interface.

Every strategy sees raw reference margins m_k = r_k^w - r_k^l as a (B, K) tensor:

* ``fit(val_margins)`` once before training (offline strategies learn here),
* ``weights(margins)`` for a training batch -> (K,) or (B, K) alpha, rows summing to 1,
* ``eval_weights(margins)`` the same for evaluation batches (a bandit uses its posterior mean, not a draw),
* ``update(margins)`` once after each optimizer step with all of that step's pairs
  (online strategies learn here),
* ``state_dict()`` / ``load_state_dict()`` JSON-able, saved with each checkpoint.

Each strategy class registers itself under its ``name`` with its properties (``online``,
``fitted_on_validation``), so adding one touches only this file: the config, the trainer and
the sweep read :data:`STRATEGIES` and the class attributes.

``weights`` never changes state, so calling it for evaluation batches between
training steps does not perturb training.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import torch

REGISTRY: dict[str, type[WeightingStrategy]] = {}


def _as_margins(margins: torch.Tensor, k: int) -> torch.Tensor:
    """(B, K) float64 on the CPU: the trainer's margins may live on an accelerator, and strategies keep
    their state (numpy, Python lists) on the host; weights come back on the CPU and the caller moves them."""
    margins = torch.as_tensor(margins).detach().to(device="cpu", dtype=torch.float64)
    if margins.dim() != 2 or margins.shape[1] != k:
        raise ValueError(f"margins: expected shape (B, {k}), got {tuple(margins.shape)}")
    return margins


def _normalise_or_uniform(scores: torch.Tensor) -> torch.Tensor:
    """scores / sum over the last dim; rows summing to 0 (no information) become uniform."""
    total = scores.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(scores, 1.0 / scores.shape[-1])
    return torch.where(total > 0, scores / torch.where(total > 0, total, 1.0), uniform)


def arwc_weights(margins: torch.Tensor) -> torch.Tensor:
    """Per-pair confidence weights |m_k| / sum_j |m_j|, (B, K) -> (B, K)."""
    return _normalise_or_uniform(margins.abs())


def discrimination_weights(margins: torch.Tensor) -> torch.Tensor:
    """vdw: mean |m_k| over pairs, normalised, (N, K) -> (K,)."""
    return _normalise_or_uniform(margins.abs().mean(dim=0))


def accuracy_weights(margins: torch.Tensor) -> torch.Tensor:
    """vaw: share of pairs with m_k > 0, normalised, (N, K) -> (K,)."""
    return _normalise_or_uniform((margins > 0).to(torch.float64).mean(dim=0))


class WeightingStrategy:
    """Uniform weights; the base of every strategy (no fitting, no state)."""

    name = "uniform"
    online = False  # learns during training, from the pairs of each optimizer step
    fitted_on_validation = False  # learns before training, from the validation split

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"number of references: got {k}; need at least 1")
        self.k = k

    @classmethod
    def from_settings(cls, k: int, *, fixed_weights=None, window_size: int = 256, seed: int = 0):
        """An instance for K references from the train.* settings; each strategy takes what it needs."""
        return cls(k)

    def fit(self, val_margins: torch.Tensor) -> None:
        """Offline strategies learn from validation margins here."""

    def weights(self, margins: torch.Tensor) -> torch.Tensor:
        _as_margins(margins, self.k)
        return torch.full((self.k,), 1.0 / self.k, dtype=torch.float64)

    def eval_weights(self, margins: torch.Tensor) -> torch.Tensor:
        """Weights for an evaluation batch; the training weights unless the strategy samples them."""
        return self.weights(margins)

    def update(self, margins: torch.Tensor) -> None:
        """Online strategies learn from the pairs of the optimizer step just taken here."""

    def state_dict(self) -> dict:
        return {"name": self.name}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"weighting state is for strategy {state.get('name')!r}, not {self.name!r}")


REGISTRY[WeightingStrategy.name] = WeightingStrategy


class FixedWeights(WeightingStrategy):
    name = "fixed"

    @classmethod
    def from_settings(cls, k: int, *, fixed_weights=None, **_):
        if fixed_weights is None:
            raise ValueError("strategy 'fixed' needs fixed_weights, one per reference")
        return cls(k, fixed_weights)

    def __init__(self, k: int, weights: Sequence[float]):
        super().__init__(k)
        w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
        if w.shape != (k,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"fixed_weights: got {list(weights)}; need {k} non-negative numbers, not all 0")
        self.alpha = w / w.sum()

    def weights(self, margins: torch.Tensor) -> torch.Tensor:
        _as_margins(margins, self.k)
        return self.alpha.clone()


class ARWC(WeightingStrategy):
    """MRPO paper's per-pair weights; uses the pair's own label (label leakage, spec section 5)."""

    name = "arwc"

    def weights(self, margins: torch.Tensor) -> torch.Tensor:
        return arwc_weights(_as_margins(margins, self.k))


class _ValidationFitted(WeightingStrategy):
    """Weights fixed before training from the validation split's margins."""

    fitted_on_validation = True

    def __init__(self, k: int):
        super().__init__(k)
        self.alpha: torch.Tensor | None = None

    def _fit_alpha(self, margins: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fit(self, val_margins: torch.Tensor) -> None:
        margins = _as_margins(val_margins, self.k)
        if margins.shape[0] == 0:
            raise ValueError(f"strategy {self.name!r} is fitted on the validation split, which has no pairs")
        self.alpha = self._fit_alpha(margins)

    def weights(self, margins: torch.Tensor) -> torch.Tensor:
        _as_margins(margins, self.k)
        if self.alpha is None:
            raise RuntimeError(f"strategy {self.name!r}: call fit(validation margins) before weights()")
        return self.alpha.clone()

    def state_dict(self) -> dict:
        return {"name": self.name, "alpha": None if self.alpha is None else self.alpha.tolist()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.alpha = None if state["alpha"] is None else torch.tensor(state["alpha"], dtype=torch.float64)


class ValidationDiscrimination(_ValidationFitted):
    name = "vdw"

    def _fit_alpha(self, margins: torch.Tensor) -> torch.Tensor:
        return discrimination_weights(margins)


class ValidationAccuracy(_ValidationFitted):
    name = "vaw"

    def _fit_alpha(self, margins: torch.Tensor) -> torch.Tensor:
        return accuracy_weights(margins)


class WindowARWC(WeightingStrategy):
    """arwc averaged over the last `window_size` pairs trained on BEFORE the current batch."""

    name = "window"
    online = True

    def __init__(self, k: int, window_size: int):
        super().__init__(k)
        if window_size < 1:
            raise ValueError(f"window_size: got {window_size}; must be >= 1")
        self.window: deque[list[float]] = deque(maxlen=window_size)

    @classmethod
    def from_settings(cls, k: int, *, window_size: int = 256, **_):
        return cls(k, window_size)

    def weights(self, margins: torch.Tensor) -> torch.Tensor:
        _as_margins(margins, self.k)
        if not self.window:
            return torch.full((self.k,), 1.0 / self.k, dtype=torch.float64)
        return torch.tensor(list(self.window), dtype=torch.float64).mean(dim=0)

    def update(self, margins: torch.Tensor) -> None:
        self.window.extend(arwc_weights(_as_margins(margins, self.k)).tolist())

    def state_dict(self) -> dict:
        return {"name": self.name, "window_size": self.window.maxlen, "window": list(self.window)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.window = deque(state["window"], maxlen=state["window_size"])


class ThompsonSampling(WeightingStrategy):
    """Beta-Bernoulli bandit over references (spec section 5).

    The sample for step t is drawn from a generator seeded by (seed, t), so it is
    a pure function of the state: repeated `weights` calls within a step agree,
    and a run resumed from a checkpoint draws the same samples.
    """

    name = "thompson"
    online = True

    def __init__(self, k: int, seed: int = 0):
        super().__init__(k)
        self.seed = seed
        self.a = np.ones(k)
        self.b = np.ones(k)
        self.steps = 0

    @classmethod
    def from_settings(cls, k: int, *, seed: int = 0, **_):
        return cls(k, seed)

    def weights(self, margins: torch.Tensor) -> torch.Tensor:
        _as_margins(margins, self.k)
        sample = np.random.default_rng([self.seed, self.steps]).beta(self.a, self.b)
        return _normalise_or_uniform(torch.from_numpy(sample))

    def update(self, margins: torch.Tensor) -> None:
        margins = _as_margins(margins, self.k)
        if margins.shape[0] == 0:
            return
        correct = (margins > 0).to(torch.float64).mean(dim=0).numpy()
        self.a = self.a + correct
        self.b = self.b + (1 - correct)
        self.steps += 1

    def eval_weights(self, margins: torch.Tensor) -> torch.Tensor:
        """The normalised posterior mean:
        evaluation should not depend on the next training step's random draw."""
        _as_margins(margins, self.k)
        return _normalise_or_uniform(torch.from_numpy(self.posterior_mean()))

    def posterior_mean(self) -> np.ndarray:
        return self.a / (self.a + self.b)

    def state_dict(self) -> dict:
        return {
            "name": self.name,
            "seed": self.seed,
            "a": self.a.tolist(),
            "b": self.b.tolist(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.seed, self.steps = state["seed"], state["steps"]
        self.a, self.b = np.asarray(state["a"], dtype=np.float64), np.asarray(state["b"], dtype=np.float64)


STRATEGIES = tuple(REGISTRY)  # in definition order: uniform, fixed, arwc, vdw, vaw, window, thompson


def make_strategy(
    name: str, k: int, *, fixed_weights: Sequence[float] | None = None, window_size: int = 256, seed: int = 0
) -> WeightingStrategy:
    """The strategy called `name` for K references (anchor first)."""
    if name not in REGISTRY:
        raise ValueError(f"strategy: got {name!r}; allowed: {', '.join(STRATEGIES)}")
    return REGISTRY[name].from_settings(k, fixed_weights=fixed_weights, window_size=window_size, seed=seed)
