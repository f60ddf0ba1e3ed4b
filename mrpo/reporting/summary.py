"""The end-of-pipeline summary as markdown, and numbers written as people read them.

Before/after on the key metrics, the reference weights, where the policy is, and the commands that open
MLflow and the plots: from what train and evaluate recorded (mrpo.reporting.records).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mrpo.config.schema import Config

# (label, key before, key after) in train.metrics_file: validation and test before and after training.
TRAIN_ROWS = (
    ("val reward accuracy", "val_reward_accuracy_before", "val_reward_accuracy_after"),
    ("val reward margin", "val_reward_margin_before", "val_reward_margin_after"),
    ("val loss", "val_loss_before", "val_loss_after"),
    ("test reward accuracy", "test_reward_accuracy_before", "test_reward_accuracy_after"),
)


def format_number(value: Any) -> str:
    """A number as people read it: 0.5053, -0.000654, 2,422, 16,270.5; never 1.627e+04. None and NaN:
    `n/a`."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a" if value is None else str(value)
    if not math.isfinite(value):
        return "n/a"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    if value != 0 and abs(value) < 1e-3:  # three significant digits, in plain decimals down to 1e-8
        if abs(value) < 1e-8:
            return f"{value:.2e}"
        return f"{value:.{2 - math.floor(math.log10(abs(value)))}f}"
    return f"{value:.4f}"


def format_share(value: Any) -> str:
    """0.5667 -> 56.7%."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.1f}%"


def format_change(before: Any, after: Any) -> str:
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in (before, after)):
        return ""
    change = after - before
    return ("+" if change >= 0 else "") + format_number(change)


def before_after_rows(train_metrics: dict, eval_metrics: dict) -> list[tuple[str, Any, Any]]:
    """(label, before, after) for each key metric present: training's validation/test metrics (before = the
    untrained policy, i.e. the anchor) and each lm-eval score (before = the anchor, after = the policy)."""
    rows = [
        (label, train_metrics[b], train_metrics[a])
        for label, b, a in TRAIN_ROWS
        if b in train_metrics and a in train_metrics
    ]
    for key in sorted(eval_metrics):
        if key.startswith("policy/"):
            name = key.removeprefix("policy/")
            task, _, metric = name.partition("/")
            rows.append((f"{task} {metric}", eval_metrics.get(f"anchor/{name}"), eval_metrics[key]))
    return rows


def final_weights(train_metrics: dict) -> dict[str, float]:
    return {k.removeprefix("weight/"): v for k, v in train_metrics.items() if k.startswith("weight/")}


def mlflow_ui_command(uri: str, project_dir: Path) -> str:
    """`mlflow ui` for this store; a sqlite file inside the project is named relative to it; no user info."""
    from mrpo.tracking.uri import redact

    uri = redact(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            uri = f"sqlite:///{db.resolve().relative_to(project_dir.resolve())}"
        except ValueError:
            pass
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri}" if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}"


def mlflow_run_url(run: Any) -> str:
    """The run's page: on its tracking server when it is one, else on `mlflow ui`'s default address."""
    from mrpo.tracking.uri import redact

    uri = redact(run.tracking_uri)
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{run.experiment_id}/runs/{run.run_id}"


def run_lines(run: Any | None) -> list[str]:
    """What only the terminal gets: this run's id and page (they differ run to run: not in the markdown)."""
    if run is None:
        return []
    return [f"MLflow run of this policy: {run.run_id}", f"  {mlflow_run_url(run)}"]


def summary_markdown(
    cfg: Config, train_metrics: dict, eval_metrics: dict, run: Any | None, project_dir: Path
) -> str:
    """The summary as markdown; `run` is the MLflow run recorded with the policy (or None). The markdown is
    a tracked DVC output, so it names nothing that differs run to run (the run id: `run_lines`)."""
    t = cfg.train
    refs = [r.name for r in cfg.training_references()]
    lines = ["# MRPO pipeline summary", ""]
    setup = f"Objective **{t.objective}**, strategy **{t.strategy}**, beta {t.beta:g}"
    setup += f"; references {', '.join(refs)} (the policy starts from {cfg.anchor.name}); seed {cfg.seed}"
    if "steps" in train_metrics:
        setup += f"; {format_number(train_metrics['steps'])} steps"
    lines += [setup + ".", ""]
    weights = final_weights(train_metrics)
    if weights:
        shown = ", ".join(f"{name} {format_number(w)}" for name, w in weights.items())
        lines += [f"Reference weights at the end of training: {shown}.", ""]

    rows = before_after_rows(train_metrics, eval_metrics)
    if rows:
        lines += ["| metric | before (anchor) | after (policy) | change |", "|---|---:|---:|---:|"]
        lines += [
            f"| {m} | {format_number(b)} | {format_number(a)} | {format_change(b, a)} |" for m, b, a in rows
        ]
        lines.append("")
    else:
        lines += ["_No metrics yet: run `mrpo train` and `mrpo evaluate` (or `dvc repro`)._", ""]
    if "pref/reward_accuracy_vs_anchor" in eval_metrics:
        lines += [
            f"Test pairs: the policy's implicit reward against the anchor ranks the chosen response first on "
            f"{format_share(eval_metrics['pref/reward_accuracy_vs_anchor'])} of them (mean reward margin "
            f"{format_number(eval_metrics.get('pref/reward_margin_vs_anchor'))}); the anchor alone finds the "
            "chosen response more likely on "
            f"{format_share(eval_metrics.get('pref/anchor_likelihood_accuracy'))}.",
            "",
        ]

    lines.append(f"Policy: `{t.output_dir}`" + (" (its MLflow run: `mrpo runs`)" if run else "") + ".")
    lines += ["", "Look further:", "", "```"]
    if run is not None:
        ui = mlflow_ui_command(run.tracking_uri, project_dir)
        lines.append(f"{ui}   # experiment '{cfg.tracking.experiment}', the run printed with this summary")
    lines += [
        "dvc plots show      # training curves and reference weights -> dvc_plots/index.html",
        "dvc metrics show    # the metrics files; `dvc metrics diff` compares with the last commit",
        "```",
        "",
    ]
    return "\n".join(lines)
