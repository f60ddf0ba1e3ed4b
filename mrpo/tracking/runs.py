"""`mrpo runs`: existing MLflow runs of every kind side by side in the terminal, filtered by experiment and
tags, in 120 columns by default.

Pipeline runs, sweep members, comparison members and diagnostics runs record the same quantities under the
same names (mrpo.tracking.names), so each column means the same for every kind of run:

  id, kind        the run's id and kind (pipeline, compare, compare-member, diagnostics, sweep, sft);
                  status only where a run did not finish; label: its configuration in a sweep or comparison
  objective, strategy, refs, seed, beta
                  what was trained: params train.objective, train.strategy (n/a for DPO), the reference
                  set (tag mrpo.reference_set), seed, train.beta
  pairs           training pairs actually trained on (metric train_pairs)
  acc_vs_anchor   held-out (test split) reward accuracy against the anchor (pref/reward_accuracy_vs_anchor)
  mc_acc          the policy's lm-eval multiple-choice accuracy (policy/mrpo_facts_mc/acc)
  loss            mean training loss (metric train_loss)
  run             the run's name, in the characters the other columns leave

A dash: the run does not have that value (a pipeline run before evaluate has no acc_vs_anchor). `--metric`
and `--param` add columns, `--sort` orders the rows by a metric (best first), `--width 0` never shortens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mrpo.errors import ConfigError
from mrpo.tracking import names

WIDTH = 120


def _param(key: str) -> Callable[[Any], Any]:
    return lambda run: run.data.params.get(key)


def _tag(key: str) -> Callable[[Any], Any]:
    return lambda run: run.data.tags.get(key)


def _metric(key: str) -> Callable[[Any], Any]:
    return lambda run: run.data.metrics.get(key)


# header -> where every kind of run keeps it; `status` only where a run did not finish, `run` last: it gets
# the characters the others leave (the id names the run as well)
COLUMNS: dict[str, Callable[[Any], Any]] = {
    "id": lambda run: run.info.run_id[:8],
    "kind": _tag(names.KIND),
    "status": lambda run: None if run.info.status == "FINISHED" else run.info.status,
    "label": _tag("mrpo.sweep_label"),
    "objective": _param("train.objective"),
    "strategy": _param("train.strategy"),
    "refs": _tag(names.REFERENCE_SET),
    "seed": _param("seed"),
    "beta": _param("train.beta"),
    "pairs": _metric(names.TRAIN_PAIRS),
    "acc_vs_anchor": _metric(names.ACCURACY_VS_ANCHOR),
    "mc_acc": _metric("policy/mrpo_facts_mc/acc"),
    "loss": _metric(names.TRAIN_LOSS),
    "run": lambda run: run.info.run_name or None,
}
SHORTENED = ("run", "label", "refs")  # free text, shortened in this order to fit (a column under 8 goes)


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
    """One dict per MLflow run: COLUMNS, then the wanted `params` and `metrics`."""
    rows = []
    for run in runs:
        row = {column: value(run) for column, value in COLUMNS.items()}
        row.update({k: run.data.params.get(k) for k in params})
        row.update({k: run.data.metrics.get(k) for k in metrics})
        rows.append(row)
    return rows


def columns_of(
    rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = (), params: Sequence[str] = ()
) -> list[str]:
    """The columns some row fills, in COLUMNS order, then the asked-for params and metrics."""
    wanted = [*COLUMNS, *params, *metrics]
    return [c for c in dict.fromkeys(wanted) if any(r.get(c) is not None for r in rows)]


def cell(value: Any) -> str:
    """Floats to 4 decimals (whole numbers as integers), a dash where a run lacks a value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) >= 1 else f"{value:.4f}"
    return str(value)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def fit(columns: list[str], widths: list[int], width: int) -> tuple[list[str], list[int]]:
    """Columns and their widths within `width` characters (0: no limit): the free-text columns (SHORTENED)
    give up characters first, a column that would be narrower than 8 goes; then columns go from the right."""
    columns, widths = list(columns), list(widths)

    def excess() -> int:
        return sum(widths) + 2 * (len(widths) - 1) - width

    for name in SHORTENED if width else ():
        if name in columns and excess() > 0:
            i = columns.index(name)
            if widths[i] - excess() < max(8, len(name)):
                del columns[i], widths[i]
            else:
                widths[i] -= excess()
    while width and excess() > 0 and len(columns) > 1:
        columns.pop(), widths.pop()
    return columns, widths


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], width: int = WIDTH) -> str:
    """A fixed-width text table at most `width` characters wide (0: no limit; see `fit`)."""
    cells = [{c: cell(r.get(c)) for c in columns} for r in rows]
    full = [max(len(c), *(len(b[c]) for b in cells)) if cells else len(c) for c in columns]
    columns, widths = fit(list(columns), full, width)
    body = [[_shorten(b[c], w) for c, w in zip(columns, widths, strict=True)] for b in cells]

    def line(values: Sequence[str]) -> str:
        return "  ".join(x.ljust(w) for x, w in zip(values, widths, strict=True)).rstrip()

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
    from mlflow.exceptions import MlflowException

    from mrpo.tracking.health import check_store
    from mrpo.tracking.store import client_for
    from mrpo.tracking.uri import redact

    check_store(uri)
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = [e.name for e in client.search_experiments()]
        raise ConfigError(
            f"--experiment {experiment!r}: no such MLflow experiment in {redact(uri)}; known: {known}"
        )
    text = " and ".join(f for f in (tag_filter(tags or {}), filter_string) if f)
    order = [f"metrics.`{sort}` DESC"] if sort else ["attributes.start_time DESC"]
    try:
        return client.search_runs(
            [exp.experiment_id], filter_string=text, order_by=order, max_results=max_results
        )
    except MlflowException as exc:
        reason = str(exc.message).splitlines()[0][:300]
        raise ConfigError(
            f"--filter {filter_string!r}: MLflow rejects it ({reason}); write it as MLflow's search syntax, "
            "e.g. --filter \"metrics.train_loss < 0.5 and params.seed = '0'\""
        ) from exc


def runs_table(
    uri: str,
    experiment: str,
    tags: Mapping[str, str] | None = None,
    filter_string: str | None = None,
    metrics: Sequence[str] = (),
    params: Sequence[str] = (),
    sort: str | None = None,
    max_results: int = 200,
    width: int = WIDTH,
) -> str:
    """The text table `mrpo runs` prints, at most `width` characters wide (0: no limit)."""
    runs = search(uri, experiment, tags, filter_string, sort, max_results)
    if not runs:
        wanted = tag_filter(tags or {}) or filter_string or "(all)"
        return f"no runs in experiment {experiment!r} match {wanted}\n"
    rows = run_rows(runs, metrics, params)
    return format_table(rows, columns_of(rows, metrics, params), width)
