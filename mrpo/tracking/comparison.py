"""A comparison's MLflow runs (mrpo.stages.compare): the parent (kind `compare`) and one run per member (kind
`compare-member`), recorded under the names a pipeline run uses (mrpo.tracking.names), with the prepared
splits as datasets, a description and the lineage that reproduces a member (git commit, params digest,
comparison id `mrpo.sweep`, seed, score and data digests).

`comparison` and `result` are read by attribute (mrpo.stages.compare.Comparison / MemberResult).
"""

from __future__ import annotations

import dataclasses
import logging

from mrpo.config.schema import Config
from mrpo.tracking import lineage, names
from mrpo.tracking.tracker import start_run, tracked_run

log = logging.getLogger("mrpo")


def start_comparison_run(comparison) -> None:
    """The comparison's run (kind `compare`) and the lineage every member's run shares: git state, launcher,
    the score files' digests."""
    cfg, cid = comparison.cfg, comparison.comparison_id
    comparison.lineage_tags = {
        names.GROUP: cid,
        "mrpo.prepared_digest": comparison.prepared_digest,
        **lineage.launch_tags(),
        **lineage.git_tags(lineage.git_state(".", lineage.pipeline_outputs("."))),
        **{k: v for k, v in lineage.reference_lineage(cfg, ".").items() if k.endswith(".score_digest")},
    }
    end_stale_parents(cfg, cid)
    parent = start_run(
        cfg,
        kind="compare",
        name=cid,
        source=comparison.source,
        tags={**comparison.lineage_tags, "mrpo.references": ",".join(comparison.names)},
        description=_description(comparison),
    )
    parent.log_params(
        {f"compare.{k}": v for k, v in dataclasses.asdict(cfg.compare).items()}
        | {"seed": cfg.seed, "members": len(comparison.members)}
    )
    parent.log_datasets(cfg.data.output_dir, comparison.prepared_digest)
    comparison.parent_run = parent


def _runs_of(cfg: Config, cid: str, kind: str, extra: str = "") -> tuple[object, list]:
    from mrpo.tracking.store import client_for, tracking_uri

    client = client_for(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return client, []
    text = f"tags.`{names.GROUP}` = '{cid}' and tags.`{names.KIND}` = '{kind}'{extra}"
    return client, client.search_runs([experiment.experiment_id], text, max_results=1000)


def end_stale_parents(cfg: Config, cid: str) -> None:
    """An earlier run of comparison `cid` still RUNNING was killed (compare holds its output lock while it
    runs): it ends KILLED, so no run stays RUNNING forever."""
    client, found = _runs_of(cfg, cid, "compare", " and attributes.status = 'RUNNING'")
    for run in found:
        log.warning(
            "mlflow: comparison %s's earlier run %s was left RUNNING; marked KILLED", cid, run.info.run_id
        )
        client.set_tag(run.info.run_id, "mrpo.ended", "killed: found RUNNING when the comparison was re-run")
        client.set_terminated(run.info.run_id, status="KILLED")


def replace_earlier_member(cfg: Config, cid: str, run_name: str) -> None:
    """A re-run comparison replaces a member recorded by an earlier run of it: one run per member and id."""
    client, found = _runs_of(cfg, cid, "compare-member", f" and attributes.run_name = '{run_name}'")
    for run in found:
        log.info("mlflow: member %s of comparison %s replaces run %s", run_name, cid, run.info.run_id)
        client.delete_run(run.info.run_id)


def adopt_member(comparison, run_id: str | None) -> None:
    """A member kept from an earlier run of the comparison moves under this run's parent in the UI."""
    parent = comparison.parent_run
    if not parent or run_id is None:
        return
    try:
        parent.client.set_tag(run_id, names.PARENT, parent.run_id)
    except Exception as exc:  # the kept run lives in another store, or was deleted: the result stands
        log.warning("mlflow: kept member run %s not moved under %s: %s", run_id, parent.run_id, exc)


def _description(comparison) -> str:
    c, ds = comparison.cfg.compare, comparison.datasets
    configurations = len({m.label for m in comparison.members})
    return (
        f"Comparison {comparison.comparison_id}: {configurations} configurations x {len(c.seeds)} seeds, "
        f"each on {min(c.train_pairs, len(ds['train']))} training pairs drawn per seed, scored on "
        f"{len(ds['test'])} test pairs against the anchor."
    )


_SCRATCH = ("train.output_dir", "train.checkpoint_dir")  # a temporary directory per member: not a setting


def log_member(comparison, mcfg: Config, result) -> str | None:
    """The member's run (kind `compare-member`) under the parent: every setting it trained with, the
    prepared splits, the lineage, and the pipeline run's metric names."""
    m, parent = result.member, comparison.parent_run
    params = {k: v for k, v in names.run_params(mcfg).items() if k not in _SCRATCH}
    n_test = len(comparison.datasets["test"])
    description = (
        f"Comparison {comparison.comparison_id}, {m.label} seed {m.seed}: {names.run_description(mcfg)} "
        f"Trained from the anchor on {result.train_pairs} pairs drawn by seed {m.seed} for "
        f"{mcfg.train.num_epochs:g} epoch(s); scored on {n_test} test pairs against the anchor."
    )
    tags = {
        **comparison.lineage_tags,
        **names.key_tags(mcfg),
        "mrpo.sweep_label": m.label,
        names.PARAMS_DIGEST: names.params_digest(params),
    }
    start = {"kind": "compare-member", "name": f"{comparison.comparison_id}-{m.label}-s{m.seed}"}
    if parent:
        replace_earlier_member(mcfg, comparison.comparison_id, start["name"])
    with tracked_run(
        mcfg,
        enabled=bool(parent),  # an untracked comparison: a NullTracker, so nothing is recorded
        **start,
        source=comparison.source,
        tags=tags,
        description=description,
        parent=parent,
    ) as run:
        run.log_params(params)
        run.log_datasets(mcfg.data.output_dir, comparison.prepared_digest)
        run.log_metrics(
            {
                names.ACCURACY_VS_ANCHOR: result.accuracy,
                names.TRAIN_PAIRS: result.train_pairs,
                names.STEPS: result.steps,
                names.RUNTIME: result.seconds,
                names.TRAIN_LOSS: result.final_loss,
                **result.scores,
            }
        )
    return run.run_id


def finish_comparison_run(comparison, rows: list[dict], paths: dict, wall: float) -> None:
    """The per-configuration summary as the parent's metrics, the report files as its artifacts; it ends."""
    parent = comparison.parent_run
    metrics = {"compare/wall_s": wall}
    for r in rows:
        keys = ("accuracy", "accuracy_low", "accuracy_high", "diff", "diff_low", "diff_high", "p", "p_holm")
        for key in keys:
            if key in r:
                metrics[f"{r['label'].replace(':', '.')}/{key}"] = r[key]
    parent.log_metrics(metrics)
    for path in paths.values():
        parent.log_artifact(path, "comparison")
    parent.end()
