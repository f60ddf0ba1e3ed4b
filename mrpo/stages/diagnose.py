"""The `diagnose` stage: which references are worth using, read from their stored scores before training.

What is computed per reference and per pair of references is mrpo.reporting.diagnostics. Outputs (params.yaml
`diagnose`): each reference's accuracy as JSON, a per-reference CSV and PNG for `dvc plots`, a markdown report
(the Prefect artifact and the comparison report embed it) and one MLflow run.
"""

from __future__ import annotations

import logging

import numpy as np

from mrpo.config.schema import Config
from mrpo.errors import ScoreDataError
from mrpo.io import write_json_atomically
from mrpo.reporting.diagnostics import (
    Diagnostics,
    diagnose_scores,
    flat_metrics,
    metrics_dict,
    plot_diagnostics,
    plot_rows,
    report_markdown,
)
from mrpo.staging import StagedOutputs, recover

log = logging.getLogger("mrpo")


# ---------------------------------------------------------------- small pure pieces


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
    recover([g.metrics_file, g.plots_file, g.report_file, g.image_file])
    with StagedOutputs() as staged:  # the four files swapped in together, or none of them
        write_json_atomically(staged.file(g.metrics_file), metrics_dict(d))
        staged.file(g.plots_file).write_text(pd.DataFrame(plot_rows(d)).to_csv(index=False))
        staged.file(g.report_file).write_text(report_markdown(d))
        plot_diagnostics(d, staged.file(g.image_file))


def log_to_mlflow(cfg: Config, d: Diagnostics) -> str:
    """One run (kind diagnostics) in the pipeline's experiment: the numbers and the four output files."""
    from mrpo.tracking import lineage, names
    from mrpo.tracking.tracker import tracked_run

    g = cfg.diagnose
    tags = {
        "mrpo.stage": "diagnose",
        names.REFERENCE_SET: ",".join(d.names),
        "mrpo.references": ",".join(d.names),
        "mrpo.seed": str(cfg.seed),
        **lineage.launch_tags(),
        **lineage.git_tags(lineage.git_state(".", lineage.pipeline_outputs("."))),
    }
    start = {
        "kind": "diagnostics",
        "name": f"diagnose-{'+'.join(d.names)}-{d.split}-s{cfg.seed}",
        "source": "mrpo diagnose",
        "tags": tags,
        "description": f"Reference diagnostics of {', '.join(d.names)} on the {d.split} split "
        f"({d.pairs} pairs) before training; seed {cfg.seed}.",
    }
    with tracked_run(cfg, **start) as run:
        params = {
            "diagnose.split": d.split,
            "train.epsilon": d.epsilon,
            "train.adaptive_epsilon": d.adaptive_epsilon,
            "seed": cfg.seed,
        }
        run.log_params(params)
        run.set_tags({names.PARAMS_DIGEST: names.params_digest(params)})
        run.log_metrics({"diagnose/pairs": d.pairs, **flat_metrics(d)})
        for path in (g.metrics_file, g.plots_file, g.image_file, g.report_file):
            run.log_artifact(path, "diagnostics")
    return run.run_id
