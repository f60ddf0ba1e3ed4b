"""The `diagnose` stage: which references are worth using, read from their stored scores before training.

Over one split (default: validation) of the pairs every reference could score, per reference k with the
raw margin m_k = r_k^w - r_k^l (sequence log-probs, docs/mrpo-spec.md section 5):

* preference accuracy: the share of pairs with m_k > 0 (what `vaw` weights by);
* the mean and standard deviation of m_k;
* how often the trust-region clip (mrpo.losses, at train.epsilon / train.adaptive_epsilon) moves its
  log-probs: the share of its (pair, response) values clipped, as the trainer's `clipped_fraction`
  (on sequence log-probs; with loss_type ipo_norm training clips per-token log-probs instead);
* for each pair of references, the share of pairs both order alike (m_i > 0 == m_j > 0) and the
  Pearson correlation of their margins;
* the weights each registered strategy would give them (mrpo.weighting): offline strategies fitted as
  training fits them, per-pair ones (arwc) averaged over the pairs, online ones their initial weights.

Outputs (params.yaml `diagnose`): metrics JSON, a per-reference CSV and PNG for `dvc plots`, a markdown
report (the Prefect artifact and the comparison report embed it) and one MLflow run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrpo.config.schema import Config
from mrpo.core.losses import clip_to_anchor, trust_region_bands
from mrpo.core.weighting import REGISTRY, make_strategy
from mrpo.errors import ScoreDataError
from mrpo.io import atomic_file, write_json_atomically, write_text_atomically

log = logging.getLogger("mrpo")


# ---------------------------------------------------------------- small pure pieces


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

    The clip of the objective itself (mrpo.losses); the anchor (column 0) is never clipped.
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
    """The metrics JSON: per reference, per pair of references, per strategy (DVC flattens the nesting)."""
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


# ---------------------------------------------------------------- reading the scores


def split_scores(cfg: Config, split: str) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """(names, chosen (N, K), rejected (N, K), skipped) of `split`'s pairs that every reference scored.

    All references of params.yaml, anchor first; the score files are checked against each other and the
    prepared data as training checks them.
    """
    from mrpo.data.prepared import prepared_digest, read_split
    from mrpo.data.scorefile import load_reference_scores

    names = [r.name for r in cfg.references]
    scores = load_reference_scores(cfg.score.output_dir, names, prepared_digest(cfg.data.output_dir))
    ids = read_split(cfg.data.output_dir, split)["pair_id"].tolist()
    chosen, rejected, fits = [], [], np.ones(len(ids), dtype=bool)
    for s in scores:
        missing = [p for p in ids if p not in s.frame.index]
        if missing:
            raise ScoreDataError(
                f"{s.path}: {len(missing)} {split} pair(s) have no score (e.g. {missing[0]!r}); "
                f"re-run `mrpo score --reference {s.name}`"
            )
        rows = s.frame.loc[ids]
        chosen.append(rows["chosen_logp"].to_numpy(np.float64))
        rejected.append(rows["rejected_logp"].to_numpy(np.float64))
        fits &= rows["fits"].to_numpy(bool)
    w, lo = np.stack(chosen, axis=1)[fits], np.stack(rejected, axis=1)[fits]
    return names, w, lo, int((~fits).sum())


# ---------------------------------------------------------------- the stage


def diagnose(cfg: Config, *, track: bool = True) -> Diagnostics:
    """Run the diagnose stage: read the scores, compute, write metrics, plots and report, log to MLflow."""
    from mrpo.preflight import check_stage

    check_stage(cfg, "diagnose")
    g, t = cfg.diagnose, cfg.train
    names, chosen, rejected, skipped = split_scores(cfg, g.split)
    if len(chosen) == 0:
        raise ScoreDataError(
            f"{cfg.data.output_dir}: the {g.split} split has no pair every reference scored; set "
            "diagnose.split to another split or raise data.val_fraction / score.max_length"
        )
    d = diagnose_scores(
        names,
        chosen,
        rejected,
        split=g.split,
        skipped=skipped,
        epsilon=t.epsilon,
        adaptive_epsilon=t.adaptive_epsilon,
        fixed_weights=t.fixed_weights if t.fixed_weights and len(t.fixed_weights) == len(names) else None,
        window_size=t.window_size,
        seed=cfg.seed,
    )
    write_outputs(cfg, d)
    for k, name in enumerate(names):
        log.info(
            "diagnose: %s accuracy %.3f, margin %.3f ± %.3f, clipped %.3f",
            name,
            d.accuracy[k],
            d.margin_mean[k],
            d.margin_std[k],
            d.clipped[k],
        )
    if track:
        run_id = log_to_mlflow(cfg, d)
        log.info("diagnose: %s, MLflow run %s", g.metrics_file, run_id)
    return d


def write_outputs(cfg: Config, d: Diagnostics) -> None:
    import pandas as pd

    g = cfg.diagnose
    write_json_atomically(g.metrics_file, metrics_dict(d))
    write_text_atomically(g.plots_file, pd.DataFrame(plot_rows(d)).to_csv(index=False))
    write_text_atomically(g.report_file, report_markdown(d))
    plot_diagnostics(d, g.image_file)


def flat_metrics(d: Diagnostics) -> dict[str, float]:
    """`diagnose/<reference>/<metric>`, `diagnose/weight/<strategy>/<reference>`: the finite numbers, for
    MLflow."""
    m = metrics_dict(d)
    out = {f"diagnose/{n}/{k}": v for n, vals in m["references"].items() for k, v in vals.items()}
    out.update(
        {f"diagnose/{p}/{k}": v for p, vals in m["pairs_of_references"].items() for k, v in vals.items()}
    )
    out.update({f"diagnose/weight/{s}/{n}": v for s, ws in m["weights"].items() for n, v in ws.items()})
    return {k.replace("~", "-"): float(v) for k, v in out.items() if v is not None}


def log_to_mlflow(cfg: Config, d: Diagnostics) -> str:
    """One run (tag mrpo.stage=diagnose) in the pipeline's experiment: the numbers and the four output
    files."""
    from mrpo.tracking import tracker as tracking

    uri = tracking.tracking_uri(cfg)
    client = tracking.client_for(uri)
    experiment_id = tracking.ensure_experiment(client, cfg.tracking.experiment, uri)
    run = client.create_run(
        experiment_id,
        run_name=f"diagnose-{'+'.join(d.names)}-{d.split}-s{cfg.seed}",
        tags={"mrpo.stage": "diagnose", "mrpo.kind": "diagnostics", "mrpo.references": ",".join(d.names)},
    )
    r = tracking.PipelineRun(run.info.run_id, experiment_id, uri)
    try:
        tracking.log_params(
            r,
            {
                "diagnose.split": d.split,
                "train.epsilon": d.epsilon,
                "train.adaptive_epsilon": d.adaptive_epsilon,
                "reference_set.names": d.names,
                "seed": cfg.seed,
            },
        )
        tracking.log_metrics(r, {"diagnose/pairs": d.pairs, **flat_metrics(d)})
        g = cfg.diagnose
        for path in (g.metrics_file, g.plots_file, g.image_file, g.report_file):
            client.log_artifact(r.run_id, str(path), "diagnostics")
    except BaseException:
        tracking.finish_run(r, "FAILED")
        raise
    tracking.finish_run(r)
    return r.run_id
