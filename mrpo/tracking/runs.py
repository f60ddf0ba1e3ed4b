"""`mrpo runs`: a comparison table of existing MLflow runs, filtered by experiment and tags, in the terminal.

Any set of runs can be compared this way, not only a sweep's: pipeline runs, sweep members, comparison
members, diagnostics runs. Columns are a few key params (what was trained) and the scores that the
runs report; `--metric` and `--param` add columns, `--sort` orders the rows by a metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from mrpo.errors import ConfigError

# What a run is: the first of these params it has, per column.
KEY_PARAMS = {
    "objective": ("train.objective",),
    "strategy": ("train.strategy",),
    "refs": ("reference_set.names", "train.references"),
    "seed": ("seed",),
    "beta": ("train.beta",),
    "pairs": ("compare.train_pairs",),
}
# Scores shown when runs report them, in this order (train stage `final/...`, evaluate stage, mrpo compare).
KEY_METRICS = (
    "compare/test_reward_accuracy_vs_anchor",
    "pref/reward_accuracy_vs_anchor",
    "final/test_reward_accuracy_after",
    "final/val_reward_accuracy_after",
    "policy/mrpo_facts_mc/acc",
    "policy/mrpo_facts_gen/exact_match/first-value",
    "final/final_loss",
)


def tag_filter(tags: Mapping[str, str]) -> str:
    """MLflow's filter string for runs carrying every tag, e.g. tags.`mrpo.sweep` = 'sweep-1'."""
    parts = []
    for key, value in tags.items():
        if "`" in key or "'" in value:
            raise ConfigError(f"--tag {key}={value}: quotes are not allowed in tag keys or values")
        parts.append(f"tags.`{key}` = '{value}'")
    return " and ".join(parts)


def parse_tags(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"--tag {pair!r}: expected KEY=VALUE, e.g. --tag mrpo.sweep=compare-20260101-1200"
            )
        out[key] = value
    return out


def run_rows(
    runs: Sequence[Any], metrics: Sequence[str] = (), params: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """One dict per MLflow run: name, short id, status, the key params and the wanted `params`, the
    metrics."""
    rows = []
    for run in runs:
        p, m, tags = run.data.params, run.data.metrics, run.data.tags
        row: dict[str, Any] = {
            "run": tags.get("mlflow.runName", ""),
            "id": run.info.run_id[:8],
            "status": run.info.status,
        }
        for column, keys in KEY_PARAMS.items():
            row[column] = next((p[k] for k in keys if k in p), None)
        if tags.get("mrpo.sweep_label"):
            row["label"] = tags["mrpo.sweep_label"]
        row.update({k: p.get(k) for k in params})
        row.update({k: m[k] for k in (*KEY_METRICS, *metrics) if k in m})
        rows.append(row)
    return rows


def columns_of(
    rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = (), params: Sequence[str] = ()
) -> list[str]:
    """The columns some row fills: identity, key params, asked-for params, then metrics in KEY_METRICS
    order."""
    wanted = ["run", "id", "status", "label", *KEY_PARAMS, *params, *KEY_METRICS, *metrics]
    return [c for c in dict.fromkeys(wanted) if any(r.get(c) is not None for r in rows)]


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width text table; floats to 4 decimals, a dash where a run lacks a value."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, body)]) + "\n"


def search(
    uri: str,
    experiment: str,
    tags: Mapping[str, str] | None = None,
    filter_string: str | None = None,
    sort: str | None = None,
    max_results: int = 200,
) -> list[Any]:
    """The runs of `experiment` in the store at `uri` with every tag in `tags` and matching
    `filter_string`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = [e.name for e in client.search_experiments()]
        raise ConfigError(f"--experiment {experiment!r}: no such MLflow experiment in {uri}; known: {known}")
    text = " and ".join(f for f in (tag_filter(tags or {}), filter_string) if f)
    order = [f"metrics.`{sort}` DESC"] if sort else ["attributes.start_time DESC"]
    return client.search_runs(
        [exp.experiment_id], filter_string=text, order_by=order, max_results=max_results
    )


def runs_table(
    uri: str,
    experiment: str,
    tags: Mapping[str, str] | None = None,
    filter_string: str | None = None,
    metrics: Sequence[str] = (),
    params: Sequence[str] = (),
    sort: str | None = None,
    max_results: int = 200,
) -> str:
    """The text table `mrpo runs` prints."""
    runs = search(uri, experiment, tags, filter_string, sort, max_results)
    if not runs:
        wanted = tag_filter(tags or {}) or filter_string or "(all)"
        return f"no runs in experiment {experiment!r} match {wanted}\n"
    rows = run_rows(runs, metrics, params)
    return format_table(rows, columns_of(rows, metrics, params))
