"""The comparison's report (mrpo.stages.compare runs the members): per-configuration summaries with their
intervals and paired differences against the baseline, the tables (markdown and terminal), the plot, and
comparison.md / comparison.csv / members.csv / comparison.png.

The report reads a comparison and its member results by attribute (`comparison.cfg`, `.comparison_id`,
`.out_dir`, `.names`, `.datasets`, `.members`, `.lm_eval_tasks`, `.diagnostics_md`, `.baseline`,
`.started`; a result's `.member.label`, `.member.seed`, `.correct`, `.scores`, `.seconds`, `.steps`,
`.final_loss`, `.mlflow_run_id`), so nothing here imports the stage.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mrpo.core.stats import bootstrap_summary, holm_adjusted, paired_t_p_value, t_interval
from mrpo.io import atomic_file, write_text_atomically
from mrpo.reporting.tables import markdown_table, text_table

ACCURACY = "test_reward_accuracy_vs_anchor"  # members.csv's column (MLflow: pref/reward_accuracy_vs_anchor)


# ---------------------------------------------------------------- summarising


def summarise(
    results: Sequence[Any],
    baseline: str,
    resamples: int = 2000,
    confidence: float = 0.95,
    untrained: Any = None,
) -> list[dict[str, Any]]:
    """One row per configuration: accuracy with its bootstrap interval; the paired difference against
    `baseline` with interval and p-value (seeds present in both); lm-eval scores with t intervals and paired
    t-tests; every p also Holm-adjusted over the family (`holm_family`). With `untrained` (a result for the
    policy before training), a first row for it: its scores, no difference (it is not in the family)."""
    by_label: dict[str, dict[int, Any]] = {}
    for r in results:
        by_label.setdefault(r.member.label, {})[r.member.seed] = r
    base = by_label.get(baseline, {})
    rows = []
    for i, (label, runs) in enumerate(by_label.items()):
        row = accuracy_summary(label, runs, base if label != baseline else {}, i, resamples, confidence)
        row.update(lm_eval_summary(runs, base if label != baseline else {}, confidence))
        rows.append(row)
    holm_family(rows)
    if untrained is not None:
        label = untrained.member.label
        row = accuracy_summary(label, {0: untrained}, {}, len(rows), resamples, confidence)
        row.update(lm_eval_summary({0: untrained}, {}, confidence))
        rows.insert(0, dict(row, seeds=0, untrained=True))
    return rows


def family_keys(rows: Sequence[dict]) -> list[tuple[int, str]]:
    """The tested hypotheses, (row index, p key): every configuration's difference from the baseline on
    every metric (held-out reward accuracy vs the anchor and each lm-eval metric)."""
    keys = [(i, "p") for i, r in enumerate(rows) if "p" in r]
    keys += [(i, f"{m} p") for m in lm_eval_metrics(rows) for i, r in enumerate(rows) if f"{m} p" in r]
    return sorted(keys)


def holm_family(rows: list[dict]) -> None:
    """Adds `<p key>_holm` beside every p of the family: Holm's adjustment (mrpo.core.stats.holm_adjusted)
    over configurations x metrics, so an adjusted p <= alpha controls the chance of any false claim."""
    keys = family_keys(rows)
    for (i, key), adjusted in zip(keys, holm_adjusted([rows[i][key] for i, key in keys]), strict=True):
        rows[i][f"{key}_holm"] = adjusted


def accuracy_summary(
    label: str, runs: dict[int, Any], base: dict[int, Any], i: int, resamples: int, confidence: float
) -> dict[str, Any]:
    """Test reward accuracy against the anchor over (seeds x test pairs) with its bootstrap interval; with a
    `base` (not the baseline itself), the difference paired by seed and test pair, its interval and p."""
    seeds = sorted(runs)
    matrix = np.stack([runs[s].correct for s in seeds])
    acc = bootstrap_summary(matrix, resamples, confidence, seed=i)
    row: dict[str, Any] = {
        "label": label,
        "seeds": len(seeds),
        "accuracy": acc["mean"],
        "accuracy_low": acc["low"],
        "accuracy_high": acc["high"],
        "seconds": float(np.mean([runs[s].seconds for s in seeds])),
    }
    paired = [s for s in seeds if s in base]
    if paired:
        diff = np.stack([runs[s].correct - base[s].correct for s in paired])
        d = bootstrap_summary(diff, resamples, confidence, seed=1000 + i)
        row.update({"diff": d["mean"], "diff_low": d["low"], "diff_high": d["high"], "p": d["p"]})
    return row


def lm_eval_summary(runs: dict[int, Any], base: dict[int, Any], confidence: float) -> dict[str, float]:
    """Per lm-eval metric: mean with a t interval over seeds; with a `base`, the paired difference (t interval
    over seeds) and the paired t-test's p."""
    seeds = sorted(runs)
    paired = [s for s in seeds if s in base]
    row: dict[str, float] = {}
    for metric in sorted({k for s in seeds for k in runs[s].scores}):
        values = [runs[s].scores[metric] for s in seeds if metric in runs[s].scores]
        mean, low, high = t_interval(values, confidence)
        row.update({metric: mean, f"{metric} low": low, f"{metric} high": high})
        both = [s for s in paired if metric in runs[s].scores and metric in base[s].scores]
        if both:
            a = [runs[s].scores[metric] for s in both]
            b = [base[s].scores[metric] for s in both]
            _, dlow, dhigh = t_interval(np.subtract(a, b), confidence)
            row.update(
                {
                    f"{metric} diff": float(np.mean(np.subtract(a, b))),
                    f"{metric} diff low": dlow,
                    f"{metric} diff high": dhigh,
                    f"{metric} p": paired_t_p_value(a, b),
                }
            )
    return row


# ---------------------------------------------------------------- tables and plot


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _interval(row: dict, key: str, signed: bool = False) -> str:
    if key not in row:
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    lo, hi = row.get(f"{key}_low", row.get(f"{key} low")), row.get(f"{key}_high", row.get(f"{key} high"))
    if lo is None or not math.isfinite(lo):
        return fmt.format(row[key])
    return f"{fmt.format(row[key])} [{fmt.format(lo)}, {fmt.format(hi)}]"


def lm_eval_metrics(rows: Sequence[dict]) -> list[str]:
    return sorted({k for r in rows for k in r if k.startswith("policy/") and " " not in k})


def table_rows(
    rows: Sequence[dict], baseline: str, confidence: float = 0.95, compact: bool = False
) -> tuple[list[str], list[list[str]]]:
    """The scores: configuration, seeds, accuracy [CI], lm-eval scores [CI]; `compact` (the terminal's)
    keeps one lm-eval metric per task. The differences are `difference_rows`'."""
    metrics = lm_eval_metrics(rows)
    if compact:
        metrics = list({m.split("/")[1]: m for m in reversed(metrics)}.values())[::-1]  # first of each task
    ci = f"{confidence:.0%} CI"
    header = ["configuration", "seeds", f"test reward acc vs anchor [{ci}]"]
    header += [f"{m.removeprefix('policy/')} [{ci}]" for m in metrics]
    body = []
    for r in rows:
        seeds = "-" if r.get("untrained") else str(r["seeds"])
        body.append([r["label"], seeds, _interval(r, "accuracy")] + [_interval(r, m) for m in metrics])
    return header, body


def difference_rows(
    rows: Sequence[dict], baseline: str, confidence: float = 0.95
) -> tuple[list[str], list[list[str]]]:
    """Every configuration's paired difference from the baseline on every metric: difference [CI], the raw
    p and the Holm-adjusted p (over all these rows)."""
    metrics = [("accuracy", "diff", "p", "test reward acc vs anchor")]
    metrics += [(m, f"{m} diff", f"{m} p", m.removeprefix("policy/")) for m in lm_eval_metrics(rows)]
    header = ["configuration", "metric", f"vs {baseline} [{confidence:.0%} CI]", "p", "p (Holm)"]
    body = []
    for r in rows:
        for _, diff, p, name in metrics:
            if diff in r:
                body.append([r["label"], name, _interval(r, diff, True), _f(r[p]), _f(r.get(f"{p}_holm"))])
    return header, body


def plot_comparison(rows: Sequence[dict], baseline: str, path: str | Path, confidence: float) -> None:
    """Two panels with error bars (the intervals): accuracy per configuration, its difference vs the
    baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("untrained")]  # an untrained policy's accuracy vs itself is 0
    labels = [r["label"] for r in rows]
    colors = [
        "tab:blue" if lbl.startswith("dpo") else "tab:green" if lbl == "multi_dpo" else "tab:orange"
        for lbl in labels
    ]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.42 * len(rows) + 1.6), sharey=True)
    for ax, key, title in (
        (axes[0], "accuracy", "held-out reward accuracy vs anchor"),
        (axes[1], "diff", f"difference vs {baseline} (paired)"),
    ):
        mean = np.array([r.get(key, np.nan) for r in rows], dtype=float)
        low = np.array([r.get(f"{key}_low", np.nan) for r in rows], dtype=float)
        high = np.array([r.get(f"{key}_high", np.nan) for r in rows], dtype=float)
        err = np.nan_to_num(np.vstack([mean - low, high - mean]))
        for i in range(len(rows)):  # points, not bars: an accuracy near 0.5 is not a length from 0
            ax.errorbar(mean[i], y[i], xerr=err[:, i : i + 1], fmt="o", color=colors[i], capsize=3)
        ax.axvline(0.5 if key == "accuracy" else 0.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{title}, mean and {confidence:.0%} CI", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def member_rows(results: Sequence[Any]) -> list[dict[str, Any]]:
    """members.csv: one row per member (label, seed, accuracy, steps, loss, time, lm-eval scores, run id)."""
    return [
        {
            "label": r.member.label,
            "seed": r.member.seed,
            ACCURACY: r.accuracy,
            "steps": r.steps,
            "train_loss": r.final_loss,
            "seconds": round(r.seconds, 2),
            **r.scores,
            "mlflow_run_id": r.mlflow_run_id,
        }
        for r in results
    ]


# ---------------------------------------------------------------- the report files


def diagnostics_markdown(cfg, names: list[str], val) -> str:
    """The diagnose stage's report on the validation pairs (a PreferenceDataset of every reference), for
    comparison.md."""
    from mrpo.reporting.diagnostics import diagnose_scores, report_markdown

    if not len(val):
        return "_No validation pairs: no reference diagnostics._\n"
    chosen = np.stack([e.ref_chosen_logps for e in val.examples])
    rejected = np.stack([e.ref_rejected_logps for e in val.examples])
    t = cfg.train
    return report_markdown(
        diagnose_scores(
            names,
            chosen,
            rejected,
            epsilon=t.epsilon,
            adaptive_epsilon=t.adaptive_epsilon,
            fixed_weights=t.fixed_weights if t.fixed_weights and len(t.fixed_weights) == len(names) else None,
            window_size=t.window_size,
            seed=cfg.seed,
        )
    )


def report_paths(out_dir: Path) -> dict[str, Path]:
    return {
        "md": out_dir / "comparison.md",
        "csv": out_dir / "comparison.csv",
        "members": out_dir / "members.csv",
        "png": out_dir / "comparison.png",
    }


def write_report(comparison: Any, results: Sequence[Any], command: str = "mrpo compare") -> dict:
    """Write comparison.md / .csv / .png and members.csv, copy the CSV and PNG for `dvc plots`; returns
    {"rows", "table" (text), "paths", "wall_s"}."""
    import pandas as pd

    c = comparison.cfg.compare
    untrained = getattr(comparison, "untrained", None)
    rows = summarise(results, comparison.baseline, c.bootstrap, c.confidence, untrained)
    wall = time.perf_counter() - comparison.started
    paths = report_paths(comparison.out_dir)
    write_text_atomically(paths["csv"], pd.DataFrame(rows).to_csv(index=False))
    write_text_atomically(paths["members"], pd.DataFrame(member_rows(results)).to_csv(index=False))
    plot_comparison(rows, comparison.baseline, paths["png"], c.confidence)
    write_text_atomically(paths["md"], report_markdown(comparison, results, rows, command, wall))
    for src, dest in ((paths["csv"], c.plots_file), (paths["png"], c.image_file)):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    terminal = "\n".join(
        [
            text_table(*table_rows(rows, comparison.baseline, c.confidence, compact=True)),
            text_table(*difference_rows(rows, comparison.baseline, c.confidence)),
            *verdict_lines(rows, comparison.baseline, 1 - c.confidence),
        ]
    )
    return {"rows": rows, "table": terminal, "paths": paths, "wall_s": wall}


def report_markdown(
    comparison: Any, results: Sequence[Any], rows: list[dict], command: str, wall: float
) -> str:
    """comparison.md: what was run and how it is measured, the tables, the plot, the reference diagnostics,
    and what the comparison does and does not show."""
    c = comparison.cfg.compare
    header, body = table_rows(rows, comparison.baseline, c.confidence)
    md = [
        f"# Comparison `{comparison.comparison_id}`\n",
        f"Command: `{command}`. Wall time {wall / 60:.1f} min for {len(results)} members.\n",
        *method_paragraphs(comparison),
        markdown_table(header, body),
        f"\nPaired differences from `{comparison.baseline}`, every metric; p (Holm) is adjusted over all "
        f"{len(family_keys(rows))} of them (configurations x metrics):\n",
        markdown_table(*difference_rows(rows, comparison.baseline, c.confidence)),
        "",
        *(f"- {line}" for line in verdict_lines(rows, comparison.baseline, 1 - c.confidence)),
        "\n![comparison](comparison.png)\n",
        "\n## Reference diagnostics (before training)\n",
        comparison.diagnostics_md,
        "\n## What this does and does not show\n",
        "It shows how each objective and weighting did on this data, task and reference set, with the "
        "uncertainty from training draws and the finite test set. It does not show the result transfers to "
        "other data, references or hyperparameters (all configurations share the `train` settings, untuned), "
        "and the references, data split and scores are those of params.yaml's `seed`, not re-drawn per seed. "
        "Many differences are tested at once: a raw p below 0.05 that does not survive Holm's adjustment "
        "is not evidence of a difference; one that does is a difference on these documents and this test "
        "split, at these settings.\n",
    ]
    return "\n".join(md)


def verdict_lines(rows: Sequence[dict], baseline: str, alpha: float = 0.05) -> list[str]:
    """What the adjusted numbers say: the differences with Holm p <= alpha, those with only a raw p <= alpha,
    and per lm-eval metric how many configurations score below the untrained anchor."""
    keys = family_keys(rows)
    held = [(rows[i], k) for i, k in keys if rows[i][f"{k}_holm"] <= alpha]
    raw_only = [(rows[i], k) for i, k in keys if rows[i][k] <= alpha < rows[i][f"{k}_holm"]]

    def name(row: dict, key: str) -> str:
        metric = "test reward acc" if key == "p" else key.removesuffix(" p").removeprefix("policy/")
        diff = row["diff" if key == "p" else f"{key.removesuffix(' p')} diff"]
        return f"{row['label']} {metric} {diff:+.3f} (p {row[key]:.3f}, Holm {row[f'{key}_holm']:.3f})"

    lines = [
        f"{len(held)} of {len(keys)} differences from {baseline} hold after Holm (adjusted p <= {alpha:g})"
        + (": " + "; ".join(name(r, k) for r, k in held) if held else "."),
        f"{len(raw_only)} more have raw p <= {alpha:g} but not after adjustment"
        + (": " + "; ".join(name(r, k) for r, k in raw_only) if raw_only else "."),
    ]
    untrained = next((r for r in rows if r.get("untrained")), None)
    trained = [r for r in rows if not r.get("untrained")]
    for m in lm_eval_metrics(rows) if untrained else []:
        if m in untrained:
            below = sum(r.get(m, math.inf) < untrained[m] for r in trained)
            lines.append(
                f"{m.removeprefix('policy/')}: {below} of {len(trained)} configurations below the untrained "
                f"anchor's {untrained[m]:.3f}."
            )
    return lines


def method_paragraphs(comparison: Any) -> list[str]:
    """How the members were trained and scored, and how the intervals and p-values are computed."""
    c = comparison.cfg.compare
    n_train = min(c.train_pairs, len(comparison.datasets["train"]))
    lm = (
        f"lm-eval: {', '.join(t.name for t in comparison.lm_eval_tasks)} on {c.lm_eval_limit} "
        "documents per task per member (t intervals over seeds, paired t-test p)."
        if comparison.lm_eval_tasks
        else "lm-eval: skipped (compare.lm_eval_limit is 0); "
        "run the evaluate stage on a chosen configuration."
    )
    seeds = ", ".join(map(str, sorted({m.seed for m in comparison.members})))
    return [
        f"Each configuration trained once per seed ({seeds}) "
        f"on {n_train} training pairs drawn per seed, {c.num_epochs:g} epoch(s), from the anchor "
        f"`{comparison.names[0]}`; scored on all {len(comparison.datasets['test'])} test pairs. "
        "Test reward accuracy is against the anchor: the share of test pairs whose implicit reward "
        "beta * (log pi - log pi_anchor) prefers the chosen response.\n",
        f"Intervals: {c.confidence:.0%} two-level bootstrap ({c.bootstrap} resamples of seeds, "
        "then of test pairs). "
        f"Difference: paired with `{comparison.baseline}` by seed and test pair; "
        f"p is the two-sided bootstrap p-value that it is 0. {lm} "
        "p (Holm): Holm's step-down adjustment over every configuration x metric difference.\n",
        *(
            [
                f"Row `{comparison.untrained.member.label}`: the policy before training (the anchor itself), "
                "scored the same way. Its reward against the anchor is 0 on every pair, a tie, so its test "
                "reward accuracy vs the anchor is 0 by construction; its lm-eval scores are on the same "
                "documents as the members' (the evaluate stage's anchor cache).\n"
            ]
            if getattr(comparison, "untrained", None) is not None
            else []
        ),
    ]
