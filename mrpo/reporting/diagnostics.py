"""Reference diagnostics computed from stored scores (the `diagnose` stage and the comparison use them):
Over one split (default: validation) of the pairs every reference could score, per reference k with the
raw margin m_k = r_k^w - r_k^l (sequence log-probs, docs/mrpo-spec.md section 5):

* preference accuracy: the share of pairs with m_k > 0 (what `vaw` weights by);
* the mean and standard deviation of m_k;
* how often the trust-region clip (mrpo.core.reference, at train.epsilon / train.adaptive_epsilon) moves its
  log-probs: the share of its (pair, response) values clipped, as the trainer's `clipped_fraction`
  (on sequence log-probs; with loss_type ipo_norm training clips per-token log-probs instead);
* for each pair of references, the share of pairs both order alike (m_i > 0 == m_j > 0) and the
  Pearson correlation of their margins;
* the weights each registered strategy would give them (mrpo.core.weighting): offline strategies fitted as
  training fits them, per-pair ones (arwc) averaged over the pairs, online ones their initial weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrpo.core.reference import clip_to_anchor, trust_region_bands
from mrpo.core.weighting import REGISTRY, make_strategy
from mrpo.io import atomic_file


def preference_accuracy(margins: np.ndarray) -> np.ndarray:
    """Share of pairs with m_k > 0 per reference, (N, K) -> (K,); NaN without pairs."""
    if margins.shape[0] == 0:
        return np.full(margins.shape[1], np.nan)
    return (margins > 0).mean(axis=0)


def margin_summary(margins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, sample standard deviation) of each reference's margins, (N, K) -> (K,), (K,)."""
    n = margins.shape[0]
    mean = margins.mean(axis=0) if n else np.full(margins.shape[1], np.nan)
    std = margins.std(axis=0, ddof=1) if n > 1 else np.full(margins.shape[1], np.nan)
    return mean, std


def pairwise_agreement(margins: np.ndarray) -> np.ndarray:
    """(K, K): share of pairs on which references i and j prefer the same response (m > 0 alike)."""
    wins = margins > 0
    k = margins.shape[1]
    out = np.ones((k, k))
    for i in range(k):
        for j in range(k):
            out[i, j] = (wins[:, i] == wins[:, j]).mean() if margins.shape[0] else np.nan
    return out


def margin_correlation(margins: np.ndarray) -> np.ndarray:
    """(K, K) Pearson correlation of the margins; NaN where a reference's margins do not vary."""
    k = margins.shape[1]
    out = np.full((k, k), np.nan)
    centred = margins - margins.mean(axis=0)
    norms = np.sqrt((centred**2).sum(axis=0))
    for i in range(k):
        for j in range(k):
            if norms[i] > 0 and norms[j] > 0:
                out[i, j] = float((centred[:, i] * centred[:, j]).sum() / (norms[i] * norms[j]))
    return out


def clip_fractions(chosen: np.ndarray, rejected: np.ndarray, epsilon: float, adaptive: bool) -> np.ndarray:
    """Share of each reference's (pair, response) log-probs the CTRO clip moves, (N, K) x (N, K) -> (K,).

    The clip of the objective itself (mrpo.core.reference); the anchor (column 0) is never clipped.
    """
    if chosen.shape[0] == 0:
        return np.full(chosen.shape[1], np.nan)
    w, lo = torch.from_numpy(chosen), torch.from_numpy(rejected)
    eps_w, eps_l = trust_region_bands(w, lo, epsilon, adaptive)
    moved_w = (clip_to_anchor(w, eps_w) != w).numpy()
    moved_l = (clip_to_anchor(lo, eps_l) != lo).numpy()
    return np.concatenate([moved_w, moved_l]).mean(axis=0)


def strategy_weights(
    margins: np.ndarray, *, fixed_weights: Sequence[float] | None, window_size: int, seed: int
) -> dict[str, dict[str, Any]]:
    """{strategy: {"weights": [K floats] or None, "how": what they are}} for every registered strategy.

    Fitted on these margins as training fits on validation; a per-pair strategy's (B, K) weights are
    averaged over the pairs; an online strategy reports the weights it starts from (its evaluation
    weights before any step), which training then changes.
    """
    k = margins.shape[1]
    m = torch.from_numpy(np.asarray(margins, dtype=np.float64))
    out: dict[str, dict[str, Any]] = {}
    for name, cls in REGISTRY.items():
        try:
            strategy = make_strategy(name, k, fixed_weights=fixed_weights, window_size=window_size, seed=seed)
        except ValueError as exc:  # `fixed` without weights: nothing to show, say why
            out[name] = {"weights": None, "how": f"not available: {exc}"}
            continue
        if cls.fitted_on_validation:
            strategy.fit(m)
        w = strategy.eval_weights(m)
        how = "fitted on these pairs" if cls.fitted_on_validation else "fixed"
        if w.dim() == 2:
            w, how = w.mean(dim=0), "per pair; mean over these pairs"
        if cls.online:
            how = "online: initial weights, learnt during training"
        out[name] = {"weights": [float(x) for x in w], "how": how}
    return out


@dataclass(frozen=True)
class Diagnostics:
    """Everything the stage reports, for one split of K references (anchor first)."""

    names: list[str]
    split: str
    pairs: int
    skipped: int
    accuracy: np.ndarray
    margin_mean: np.ndarray
    margin_std: np.ndarray
    clipped: np.ndarray
    agreement: np.ndarray
    correlation: np.ndarray
    weights: dict[str, dict[str, Any]]
    epsilon: float
    adaptive_epsilon: bool


def diagnose_scores(
    names: Sequence[str],
    chosen: np.ndarray,
    rejected: np.ndarray,
    *,
    split: str = "val",
    skipped: int = 0,
    epsilon: float = 0.1,
    adaptive_epsilon: bool = True,
    fixed_weights: Sequence[float] | None = None,
    window_size: int = 256,
    seed: int = 0,
) -> Diagnostics:
    """The diagnostics of (N, K) chosen and rejected log-probs, reference order as `names` (anchor first)."""
    margins = chosen - rejected
    mean, std = margin_summary(margins)
    return Diagnostics(
        names=list(names),
        split=split,
        pairs=int(margins.shape[0]),
        skipped=skipped,
        accuracy=preference_accuracy(margins),
        margin_mean=mean,
        margin_std=std,
        clipped=clip_fractions(chosen, rejected, epsilon, adaptive_epsilon),
        agreement=pairwise_agreement(margins),
        correlation=margin_correlation(margins),
        weights=strategy_weights(margins, fixed_weights=fixed_weights, window_size=window_size, seed=seed),
        epsilon=epsilon,
        adaptive_epsilon=adaptive_epsilon,
    )


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def metrics_dict(d: Diagnostics) -> dict[str, Any]:
    """The metrics JSON (`dvc metrics show`): each reference's preference accuracy, the question "which
    references are worth using" in one number each. The rest is in the report, the CSV and the MLflow run:
    `dvc metrics show` prints every metrics file's keys as columns of one table, which must fit a terminal."""
    return {"accuracy": {name: _num(d.accuracy[k]) for k, name in enumerate(d.names)}}


def full_metrics(d: Diagnostics) -> dict[str, Any]:
    """Everything numeric: per reference, per pair of references, per strategy (the MLflow run's metrics)."""
    refs = {
        name: {
            "preference_accuracy": _num(d.accuracy[k]),
            "margin_mean": _num(d.margin_mean[k]),
            "margin_std": _num(d.margin_std[k]),
            "clipped_fraction": _num(d.clipped[k]),
        }
        for k, name in enumerate(d.names)
    }
    pairs = {
        f"{a}~{b}": {"agreement": _num(d.agreement[i, j]), "margin_correlation": _num(d.correlation[i, j])}
        for i, a in enumerate(d.names)
        for j, b in enumerate(d.names)
        if i < j
    }
    weights = {s: dict(zip(d.names, w["weights"], strict=True)) for s, w in d.weights.items() if w["weights"]}
    return {
        "split": d.split,
        "pairs": d.pairs,
        "skipped": d.skipped,
        "epsilon": d.epsilon,
        "references": refs,
        "pairs_of_references": pairs,
        "weights": weights,
    }


def plot_rows(d: Diagnostics) -> list[dict[str, Any]]:
    """One row per reference for the CSV plot: its numbers and each strategy's weight for it."""
    rows = []
    for k, name in enumerate(d.names):
        row: dict[str, Any] = {
            "reference": name,
            "preference_accuracy": d.accuracy[k],
            "margin_mean": d.margin_mean[k],
            "margin_std": d.margin_std[k],
            "clipped_fraction": d.clipped[k],
        }
        for s, w in d.weights.items():
            if w["weights"]:
                row[f"weight/{s}"] = w["weights"][k]
        rows.append(row)
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats to 3 decimals, None as a dash."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        return f"{v:.3f}" if isinstance(v, float | np.floating) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def report_markdown(d: Diagnostics) -> str:
    """The human-readable report: per reference, per pair of references, per strategy."""
    band = "adaptive" if d.adaptive_epsilon else "fixed"
    out = [
        f"### Reference diagnostics ({d.split} split, {d.pairs} pairs"
        + (f", {d.skipped} not scored by every reference" if d.skipped else "")
        + ")\n",
        "Margin m = log pi_ref(chosen) - log pi_ref(rejected). Accuracy: share of pairs with m > 0. "
        f"Clipped: share of log-probs the trust region moves (epsilon {d.epsilon:g}, {band} band).\n",
        markdown_table(
            ["reference", "accuracy", "margin mean", "margin sd", "clipped"],
            [
                [n, d.accuracy[k], d.margin_mean[k], d.margin_std[k], d.clipped[k]]
                for k, n in enumerate(d.names)
            ],
        ),
    ]
    if len(d.names) > 1:
        out += [
            "\nAgreement: share of pairs both references order alike; r: correlation of their margins.\n",
            markdown_table(
                ["references", "agreement", "r"],
                [
                    [f"{a} / {b}", d.agreement[i, j], d.correlation[i, j]]
                    for i, a in enumerate(d.names)
                    for j, b in enumerate(d.names)
                    if i < j
                ],
            ),
        ]
    out += [
        "\nWeights each strategy would give (anchor first).\n",
        markdown_table(
            ["strategy", *d.names, "how"],
            [[s, *(w["weights"] or [None] * len(d.names)), w["how"]] for s, w in d.weights.items()],
        ),
    ]
    return "\n".join(out)


def plot_diagnostics(d: Diagnostics, path: str | Path) -> None:
    """Four panels: accuracy, margin mean +- sd, clip rate, each strategy's weights; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(d.names))
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    axes[0].bar(x, d.accuracy, color="tab:blue")
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("preference accuracy (m > 0)", fontsize=9)
    axes[1].bar(x, d.margin_mean, yerr=np.nan_to_num(d.margin_std), capsize=3, color="tab:green")
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set_title("margin mean ± sd (nats)", fontsize=9)
    axes[2].bar(x, d.clipped, color="tab:red")
    axes[2].set_ylim(0, 1)
    axes[2].set_title(f"clipped by CTRO (eps {d.epsilon:g})", fontsize=9)
    shown = {s: w["weights"] for s, w in d.weights.items() if w["weights"]}
    width = 0.8 / max(1, len(shown))
    for i, (s, w) in enumerate(shown.items()):
        axes[3].bar(x + (i - (len(shown) - 1) / 2) * width, w, width, label=s)
    axes[3].set_title("weights per strategy", fontsize=9)
    axes[3].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.set_xticks(x, d.names, rotation=20, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def flat_metrics(d: Diagnostics) -> dict[str, float]:
    """`diagnose/<reference>/<metric>`, `diagnose/weight/<strategy>/<reference>`: the finite numbers, for
    MLflow."""
    m = full_metrics(d)
    out = {f"diagnose/{n}/{k}": v for n, vals in m["references"].items() for k, v in vals.items()}
    out.update(
        {f"diagnose/{p}/{k}": v for p, vals in m["pairs_of_references"].items() for k, v in vals.items()}
    )
    out.update({f"diagnose/weight/{s}/{n}": v for s, ws in m["weights"].items() for n, v in ws.items()})
    return {k.replace("~", "-"): float(v) for k, v in out.items() if v is not None}
