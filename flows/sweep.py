"""The `sweep` flow: a set of DVC experiments under one MLflow parent run, and a comparison; the `compare`
flow: `mrpo compare` (mrpo/stages/compare.py) with one Prefect task per member and the report as a
markdown artifact.

    python -m flows.sweep                      # the DVC-experiment sweep (every member re-runs its stages)
    python -m flows.sweep --compare            # the comparison, in this process, on the stored scores
    python -m flows.sweep --compare --set compare.seeds=[0,1]

The comparison is the fast, seeded way to answer "does multi-reference help here?" (see docs/results.md);
the DVC sweep keeps every member as a DVC experiment with its full pipeline outputs (`dvc exp show`).

Default members: DPO with each reference alone, MRPO with each weighting strategy (all
references), each over the given seeds. Every member is one `dvc exp run --temp -S ...`, so
DVC re-uses every stage whose inputs did not change (the zoo, data and scores are built once
per seed) and keeps each member as an experiment (`dvc exp show`). The sweep opens an MLflow
parent run and exports its id as MRPO_PARENT_RUN_ID, so each member's training run nests
under it. It writes `comparison.md`, `comparison.csv` and `comparison.png` to
`<output_dir>/<sweep id>/` and logs them on the parent run.

Note: `seed` is the pipeline's only seed, so a second seed also rebuilds the zoo, the data
split and the scores for that seed (once, shared by all members of that seed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.lineage import git_commit
from flows.reports import flatten, markdown_table, numeric_items
from flows.stages import dvc_running_mrpo, retry_if_transient
from mrpo.config.load import load_config
from mrpo.core.loss_types import LOSS_TYPES
from mrpo.core.weighting import STRATEGIES
from mrpo.io import file_sha256
from mrpo.tracking.names import metric_name
from mrpo.tracking.store import PARENT_RUN_ENV  # MRPO_PARENT_RUN_ID: new training runs nest under it

DEFAULT_STRATEGIES = tuple(s for s in STRATEGIES if s != "fixed")  # fixed needs weights: pass them explicitly
# The comparison's headline metric: the first of these that the members report.
HEADLINE_METRICS = (
    "eval.mrpo_facts_mc",
    "eval.accuracy_vs_anchor",
    "train.test_accuracy",
    "train.val_accuracy",
)
# Columns of the comparison table, where members report them (metrics/<file>.json keys, by file stem).
TABLE_METRICS = (
    "eval.mrpo_facts_mc",
    "eval.mrpo_facts_gen",
    "eval.accuracy_vs_anchor",
    "train.test_accuracy",
    "train.train_loss",
)


@dataclass(frozen=True)
class SweepMember:
    """One experiment: a label shared across seeds, the seed, and the params it sets."""

    label: str
    seed: int
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return f"{self.label.replace(':', '-').replace('_', '-')}-s{self.seed}"


def sweep_members(
    reference_names: Sequence[str],
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    seeds: Sequence[int] = (0, 1),
    dpo_references: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    loss_types: Sequence[str | Sequence[str]] | None = None,
) -> list[SweepMember]:
    """DPO with each of `dpo_references` (default: every reference) alone, then MRPO with each
    strategy over all references; every one with each seed and the `extra` params, and, given
    `loss_types` (each a loss type or a list of them, weighted by train.loss_weights), once per loss type."""
    extra = dict(extra or {})
    for loss_type in loss_types or ():
        for name in [loss_type] if isinstance(loss_type, str) else loss_type:
            if name not in LOSS_TYPES:
                raise ValueError(f"loss_types: {name!r} is not one of {list(LOSS_TYPES)}")
    members = []
    for seed in seeds:
        for ref in reference_names if dpo_references is None else dpo_references:
            if ref not in reference_names:
                raise ValueError(
                    f"dpo_references: {ref!r} is not a reference; known: {list(reference_names)}"
                )
            members.append(SweepMember(f"dpo:{ref}", seed, {**extra, "seed": seed, **_dpo_params(ref)}))
        for strategy in strategies:
            members.append(
                SweepMember(f"mrpo:{strategy}", seed, {**extra, "seed": seed, **_mrpo_params(strategy)})
            )
    if loss_types:
        members = [
            SweepMember(
                f"{m.label}:{lt if isinstance(lt, str) else '+'.join(lt)}",
                m.seed,
                {**m.overrides, "train.loss_type": lt if isinstance(lt, str) else list(lt)},
            )
            for m in members
            for lt in loss_types
        ]
    return members


def _dpo_params(ref: str) -> dict[str, Any]:
    """K = 1: weighting is moot, so what params.yaml sets for it is reset."""
    return {
        "train.objective": "dpo",
        "train.dpo_reference": ref,
        "train.strategy": "uniform",
        "train.fixed_weights": None,
    }


def _mrpo_params(strategy: str) -> dict[str, Any]:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategies: {strategy!r} is not one of {list(STRATEGIES)}")
    weights = {} if strategy == "fixed" else {"train.fixed_weights": None}  # only `fixed` reads them
    return {"train.objective": "mrpo", "train.strategy": strategy, "train.references": None, **weights}


def set_param_args(overrides: Mapping[str, Any]) -> list[str]:
    """`-S key=value` arguments for `dvc exp run`; values as YAML flow (DVC parses them as YAML)."""
    args = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        args += ["-S", f"{key}={text}"]
    return args


def experiment_results(
    project_dir: str | Path, names: Sequence[str], metrics_files: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Metrics of the named DVC experiments, {name: {"<file stem>.<key>": value}}, read from each
    experiment's commit (metrics are git-tracked: `cache: false`)."""
    import subprocess

    import dvc.api

    wanted = set(names)
    out: dict[str, dict[str, Any]] = {}
    for row in dvc.api.exp_show(repo=str(project_dir)):
        name = row.get("Experiment")
        if name not in wanted:
            continue
        metrics: dict[str, Any] = {}
        for metrics_file in metrics_files:
            proc = subprocess.run(
                ["git", "show", f"{row['rev']}:{metrics_file}"],
                cwd=project_dir,
                capture_output=True,
                text=True,
            )
            if proc.returncode == 0:
                metrics.update(flatten(json.loads(proc.stdout), Path(metrics_file).stem))
        out[name] = metrics
    return out


def aggregate(rows: list[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each metric, per label (members that failed left out)."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "ok":
            by_label.setdefault(row["label"], []).append(row)
    table = []
    for label, group in by_label.items():
        entry: dict[str, Any] = {"label": label, "seeds": len(group)}
        for metric in metrics:
            values = [float(r[metric]) for r in group if isinstance(r.get(metric), int | float)]
            if values:
                mean = sum(values) / len(values)
                std = (
                    math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                    if len(values) > 1
                    else 0.0
                )
                entry[f"{metric} mean"] = mean
                entry[f"{metric} std"] = std
        table.append(entry)
    return table


def _mean_sd(mean: float, std: float, n: int) -> str:
    """'0.5000 ± 0.0100'; a single seed has no spread to show."""
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def headline_metric(rows: list[dict[str, Any]], preferred: str | None = None) -> str | None:
    """`preferred` if given, else the first HEADLINE_METRICS entry any member reports."""
    present = {k for r in rows for k, v in r.items() if isinstance(v, int | float)}
    if preferred:
        if preferred not in present:
            raise ValueError(f"metric {preferred!r}: no member reports it; available: {sorted(present)}")
        return preferred
    return next((m for m in HEADLINE_METRICS if m in present), None)


def plot_comparison(summary: list[dict[str, Any]], metric: str, path: str | Path) -> Path:
    """Bar chart of `metric` per label, mean over seeds with the standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary if f"{metric} mean" in r]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 2), 3.8))
    labels = [r["label"] for r in rows]
    colors = ["tab:blue" if lbl.startswith("dpo") else "tab:orange" for lbl in labels]
    ax.bar(
        range(len(rows)),
        [r[f"{metric} mean"] for r in rows],
        yerr=[r[f"{metric} std"] for r in rows],
        color=colors,
        capsize=3,
    )
    ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(metric, fontsize=8)
    ax.set_title("Sweep: DPO (blue) vs MRPO (orange), mean ± sd over seeds", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_comparison(
    rows: list[dict[str, Any]], out_dir: str | Path, metric: str | None = None
) -> dict[str, Path]:
    """comparison.csv (one row per member), comparison.md (per label mean ± sd, then per member)
    and comparison.png (the headline metric) in `out_dir`."""
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    paths = {"csv": out_dir / "comparison.csv", "md": out_dir / "comparison.md"}
    frame.to_csv(paths["csv"], index=False)
    metric = headline_metric(rows, metric)
    metric_cols = sorted(
        {
            k
            for r in rows
            for k, v in r.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and "." in k
        }
    )
    key_cols = [m for m in (metric, *TABLE_METRICS) if m and m in metric_cols]
    key_cols = list(dict.fromkeys(key_cols))
    summary = aggregate(rows, key_cols)
    md = [
        f"# Sweep comparison\n\nHeadline metric: `{metric}`\n\n## Per configuration (mean ± sd over seeds)\n"
    ]
    md.append(
        markdown_table(
            [
                {
                    "label": s["label"],
                    "seeds": s["seeds"],
                    **{
                        c: _mean_sd(s[f"{c} mean"], s[f"{c} std"], s["seeds"])
                        for c in key_cols
                        if f"{c} mean" in s
                    },
                }
                for s in summary
            ],
            ["label", "seeds", *key_cols],
        )
    )
    md.append("\n## Per member\n")
    md.append(markdown_table(rows, ["experiment", "label", "seed", "status", *key_cols, "mlflow_run_id"]))
    paths["md"].write_text("\n".join(md))
    if metric and summary:
        paths["png"] = plot_comparison(summary, metric, out_dir / "comparison.png")
    return paths


# ---------------------------------------------------------------- Prefect


@task(
    task_run_name="{member.slug}",
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=retry_if_transient,
    cache_policy=None,
)
def run_member(member: SweepMember, project_dir: str, experiment: str, env: dict[str, str]) -> dict[str, Any]:
    """`dvc exp run --temp` one member; raises StageFailed with DVC's output when it fails."""
    logger = get_run_logger()
    start = time.perf_counter()
    args = [
        "exp",
        "run",
        "--temp",
        "-n",
        experiment,
        *set_param_args(member.overrides),
        "-S",
        f"tracking.run_name={experiment}",
    ]
    dvc_running_mrpo(args, experiment, project_dir, env)
    seconds = time.perf_counter() - start
    logger.info("experiment %s (%s, seed %d) done in %.0fs", experiment, member.label, member.seed, seconds)
    return {"seconds": round(seconds, 1)}


def start_parent_run(cfg, root: Path, sweep_id: str, params: dict[str, Any]):
    """The MLflow run (kind `sweep`, a mrpo.tracking.tracker.Tracker) every member's training run nests
    under."""
    from mrpo.tracking import lineage, names
    from mrpo.tracking.tracker import start_run

    git = lineage.git_tags(lineage.git_state(root, lineage.pipeline_outputs(root)))
    parent = start_run(
        cfg,
        kind="sweep",
        name=sweep_id,
        source="python -m flows.sweep",
        tags={names.GROUP: sweep_id, **git},
        description=f"Sweep {sweep_id}: {params['members']} DVC experiments, seeds {params['seeds']}.",
    )
    parent.log_params(params)
    if (root / "dvc.lock").is_file():
        parent.set_tags({"mrpo.dvc_lock_digest": file_sha256(root / "dvc.lock")})
    return parent


def run_members(members: Sequence[SweepMember], root: Path, sweep_id: str, env: dict[str, str]) -> list[dict]:
    """One row per member: its experiment name, label, seed, overrides and whether it ran."""
    logger = get_run_logger()
    rows = []
    for member in members:
        name = f"{sweep_id}-{member.slug}"
        row: dict[str, Any] = {
            "experiment": name,
            "label": member.label,
            "seed": member.seed,
            "overrides": json.dumps(dict(member.overrides)),
        }
        try:
            row.update(run_member(member, str(root), name, env))
            row["status"] = "ok"
        except Exception as exc:  # one failed member must not sink the sweep
            logger.error("member %s failed: %s", name, exc)
            row["status"] = "failed"
        rows.append(row)
    return rows


def link_member_runs(parent, sweep_id: str, rows: list[dict], labels: dict[str, str]) -> None:
    """Tag each member's training run with its sweep and label, add its evaluation scores,
    note its id in `rows`."""
    children = parent.children()
    for row in rows:
        child = children.get(row["experiment"])
        if child is None:
            continue
        row["mlflow_run_id"] = child.run_id
        child.set_tags(
            {
                "mrpo.sweep": sweep_id,
                "mrpo.sweep_label": labels[row["experiment"]],
                "mrpo.dvc_experiment": row["experiment"],
            }
        )
        # under the names the evaluate stage logs them by, so a member that logged them has each once
        evals = {
            metric_name(k.removeprefix("eval.")): v
            for k, v in row.items()
            if k.startswith("eval.") and isinstance(v, int | float)
        }
        have = child.metric_names()
        child.log_metrics({k: v for k, v in numeric_items(evals).items() if k not in have})


def record_results(cfg, root: Path, parent, sweep_id: str, rows: list[dict], out_dir: Path, metric) -> int:
    """The members' metrics (from their DVC experiments) on their runs and in the comparison files, which
    the parent run and a Prefect artifact carry; the parent ends. Returns how many members failed."""
    results = experiment_results(
        root, [r["experiment"] for r in rows], [cfg.train.metrics_file, cfg.evaluate.metrics_file]
    )
    for row in rows:
        row.update(results.get(row["experiment"], {}))
    link_member_runs(parent, sweep_id, rows, {r["experiment"]: r["label"] for r in rows})
    paths = write_comparison(rows, out_dir, metric)
    for path in paths.values():
        parent.log_artifact(path, "comparison")
    failed = sum(r["status"] != "ok" for r in rows)
    parent.log_metrics({"members_failed": failed})
    parent.end("FINISHED" if failed < len(rows) else "FAILED")
    create_markdown_artifact(
        key="sweep-comparison",
        markdown=paths["md"].read_text(),
        description=f"Sweep {sweep_id}: {len(rows)} members, {failed} failed",
    )
    get_run_logger().info("sweep %s: comparison in %s", sweep_id, out_dir)
    if failed == len(rows):
        raise RuntimeError(f"sweep {sweep_id}: every member failed; see the task logs")
    return failed


@flow(name="sweep", log_prints=True)
def sweep(
    project_dir: str = ".",
    seeds: list[int] = [0, 1],  # noqa: B006 - Prefect parameters must be JSON values
    strategies: list[str] | None = None,
    dpo_references: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    output_dir: str = "sweeps",
    metric: str | None = None,
    loss_types: list[str | list[str]] | None = None,
) -> dict[str, Any]:
    """Run the sweep's members as DVC experiments under one MLflow parent run; compare them.

    Shrink it with `seeds`, `strategies` (default: all but `fixed`), `dpo_references` (default:
    every reference; [] for none) and `overrides` (params for every member, e.g.
    {"train.max_steps": 50}). `loss_types` runs every member once per loss type (e.g.
    ["sigmoid", "robust", ["sigmoid", "sft"]]); their own settings go in `overrides`.
    """
    from mrpo.tracking.store import tracking_uri
    from mrpo.tracking.uri import redact

    logger = get_run_logger()
    root = Path(project_dir).resolve()
    cfg = load_config(root / "params.yaml")
    strategies = DEFAULT_STRATEGIES if strategies is None else strategies
    members = sweep_members(
        [r.name for r in cfg.references], strategies, seeds, dpo_references, overrides, loss_types
    )
    sweep_id = time.strftime("sweep-%Y%m%d-%H%M%S")
    uri = tracking_uri(cfg, root)  # absolute: members run in DVC temp dirs
    parent = start_parent_run(
        dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, tracking_uri=uri)),
        root,
        sweep_id,
        {
            "seeds": seeds,
            "strategies": list(strategies),
            "members": len(members),
            "overrides": overrides or {},
            "dpo_references": dpo_references if dpo_references is not None else "all",
            "loss_types": loss_types if loss_types is not None else "params.yaml",
        },
    )
    parent_id = parent.run_id
    shown = redact(uri)
    logger.info("sweep %s: %d members under MLflow run %s (%s)", sweep_id, len(members), parent_id, shown)

    rows = run_members(members, root, sweep_id, {PARENT_RUN_ENV: parent_id, "MLFLOW_TRACKING_URI": uri})
    out_dir = root / output_dir / sweep_id
    failed = record_results(cfg, root, parent, sweep_id, rows, out_dir, metric)
    return {
        "sweep_id": sweep_id,
        "parent_run_id": parent_id,
        "output_dir": str(out_dir),
        "members": len(rows),
        "failed": failed,
        "dirty_worktree": git_commit(root)[1],
    }


# ---------------------------------------------------------------- the comparison as a flow


@task(task_run_name="{member.label}-s{member.seed}", cache_policy=None)
def compare_member(comparison, member):
    """Train and score one member of the comparison (mrpo.stages.compare.run_member)."""
    from mrpo.stages.compare import run_member

    return run_member(comparison, member)


@flow(name="compare", log_prints=True)
def compare_flow(
    project_dir: str = ".", overrides: dict[str, Any] | None = None, comparison_id: str | None = None
) -> dict[str, Any]:
    """`mrpo compare` as a flow: each member a task (a failed one is left out of the summary, and
    logged), the report published as the `comparison` markdown artifact. `overrides`: params, e.g.
    {"compare.seeds": [0, 1]}."""
    import contextlib

    from prefect.utilities.annotations import quote

    from mrpo.stages.compare import report, start

    logger = get_run_logger()
    root = Path(project_dir).resolve()
    with contextlib.chdir(root):  # params.yaml's paths are relative to the project
        cfg = load_config("params.yaml", overrides)
        comparison = start(cfg, comparison_id, source="python -m flows.sweep --compare")
        results = []
        for member in comparison.members:
            try:  # quote: Prefect must not walk the tokenized splits to find upstream tasks
                results.append(compare_member(quote(comparison), member))
            except Exception as exc:  # one failed member must not sink the comparison
                logger.error("member %s seed %d failed: %s", member.label, member.seed, exc)
        if not results:
            raise RuntimeError(
                f"comparison {comparison.comparison_id}: every member failed; see the task logs"
            )
        out = report(comparison, results, command="python -m flows.sweep --compare")
        markdown = out["paths"]["md"].read_text()
    create_markdown_artifact(
        key="comparison",
        markdown=markdown,
        description=(
            f"Comparison {comparison.comparison_id}: {len(results)} of {len(comparison.members)} members"
        ),
    )
    print(out["table"])
    return {
        "comparison_id": comparison.comparison_id,
        "output_dir": str(root / comparison.out_dir),
        "members": len(comparison.members),
        "failed": len(comparison.members) - len(results),
        "wall_s": round(out["wall_s"], 1),
    }


def main(argv: list[str] | None = None) -> None:
    import argparse

    from mrpo.cli import _parse_overrides

    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--project-dir", default=".")
    parser.add_argument(
        "--compare", action="store_true", help="run the `compare` flow instead of the DVC sweep"
    )
    parser.add_argument("--id", help="comparison id (with --compare)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a param (with --compare)"
    )
    args = parser.parse_args(argv)
    if args.compare:
        compare_flow(args.project_dir, _parse_overrides(args.set) or None, args.id)
    else:
        sweep(args.project_dir)


if __name__ == "__main__":
    main()
