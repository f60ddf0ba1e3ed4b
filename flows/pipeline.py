"""The `pipeline` flow: one Prefect task per DVC stage, then MLflow lineage.

Each task reproduces its DVC stage (`dvc repro --single-item <stage>`), so DVC still decides
what is stale and versions the outputs; Prefect adds retries, logs, schedules and a UI, and
publishes each stage's metrics as a markdown artifact.

    python -m flows.pipeline                # run once against the local Prefect API
    python -m flows.deploy                  # serve the scheduled deployments
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.lineage import record_lineage
from flows.reports import artifact_key, stage_markdown, stage_metrics, stage_report
from flows.stages import pipeline_stages, reproduce_stage, retry_if_transient
from mrpo.config.load import load_config
from mrpo.reporting.summary import mlflow_run_url

STAGE_RETRIES = 2
STAGE_RETRY_DELAYS = [10, 60]


@task(
    task_run_name="{stage}",
    retries=STAGE_RETRIES,
    retry_delay_seconds=STAGE_RETRY_DELAYS,
    retry_condition_fn=retry_if_transient,
    cache_policy=None,  # DVC is the cache; Prefect must always ask it
)
def run_stage(
    stage: str, project_dir: str, params_file: str = "params.yaml", position: int = 0
) -> dict[str, Any]:
    """Reproduce one DVC stage, its output in the task's logs, and publish its metrics as a markdown artifact
    keyed by its `position` in the pipeline, so artifacts list in pipeline order."""
    logger = get_run_logger()
    result = reproduce_stage(stage, project_dir, on_output=logger.info)
    logger.info("dvc repro %s: %s in %.1fs", stage, result.status, result.seconds)
    cfg = load_config(Path(project_dir) / params_file)
    metrics = stage_metrics(stage, cfg, project_dir)
    if stage != "summary":  # the summary's markdown is the pipeline-summary artifact
        create_markdown_artifact(
            key=stage_artifact_key(position, stage),
            markdown=stage_markdown(result, metrics, cfg),
            description=f"DVC stage {stage}: {result.status}",
        )
    report = stage_report(stage, cfg, project_dir)
    if report:  # the diagnose stage: which references are worth using, readable in the UI
        create_markdown_artifact(
            key=stage_artifact_key(position, "reference-diagnostics"),
            markdown=report,
            description="Reference diagnostics",
        )
    return {"stage": stage, "status": result.status, "seconds": round(result.seconds, 2), "metrics": metrics}


def stage_artifact_key(position: int, stage: str) -> str:
    """`stage-01-zoo`, `stage-03-score-anchor`, ...: sorted by key, the artifacts are in pipeline order."""
    return artifact_key(f"stage-{position:02d}-{stage}")


@task(
    name="mlflow lineage",
    task_run_name="mlflow-lineage",
    retries=2,
    retry_delay_seconds=[5, 30],
    cache_policy=None,
)
def record_mlflow_lineage(project_dir: str, params_file: str = "params.yaml") -> str:
    """Git commit, dvc.lock and data digests, metrics, plots and lm-eval results on the MLflow run."""
    cfg = load_config(Path(project_dir) / params_file)
    run_id = record_lineage(cfg, project_dir)
    get_run_logger().info("MLflow lineage recorded on run %s", run_id)
    return run_id


def summary_markdown(project_dir: str, results: dict[str, dict[str, Any]], run_id: str | None) -> str:
    """The pipeline-summary artifact: the summary stage's markdown (scores before/after, the policy, the
    MLflow run linked), then what DVC did with each stage."""
    cfg = load_config(Path(project_dir) / "params.yaml")
    summary_file = Path(project_dir) / cfg.summary.file
    text = summary_file.read_text() if "summary" in results and summary_file.is_file() else ""
    if run_id:
        from mrpo.tracking.store import read_run_record

        run = read_run_record(Path(project_dir) / cfg.train.output_dir)
        if run is not None and run.run_id == run_id:
            text += f"\nMLflow run: [{run_id}]({mlflow_run_url(run)})\n"
        else:
            text += f"\nMLflow run: `{run_id}`\n"
    rows = "".join(f"| {s} | {r['status']} | {r['seconds']:.1f} |\n" for s, r in results.items())
    return text + "\n| stage | status | seconds |\n|---|---|---|\n" + rows


@flow(name="pipeline", log_prints=True)
def pipeline(project_dir: str = ".", stages: list[str] | None = None, lineage: bool = True) -> dict[str, Any]:
    """Run the MRPO pipeline stage by stage through DVC; `stages` limits it to a subset, in order."""
    project_dir = str(Path(project_dir).resolve())
    cfg = load_config(Path(project_dir) / "params.yaml")
    order = pipeline_stages(cfg)
    if stages:
        unknown = sorted(set(stages) - set(order))
        if unknown:
            raise ValueError(f"stages {unknown} are not in this pipeline; known: {order}")
        order = [s for s in order if s in stages]
    positions = {s: i for i, s in enumerate(pipeline_stages(cfg))}  # check is 0, so zoo stays stage-01
    results = {}
    for stage in order:  # sequential: DVC holds one repo lock, and CPU stages gain nothing from overlap
        results[stage] = run_stage(stage, project_dir, position=positions[stage])
    summary = {
        "stages": {s: {k: r[k] for k in ("status", "seconds")} for s, r in results.items()},
        "metrics": {s: r["metrics"] for s, r in results.items()},
    }
    if lineage and "train" in order:
        summary["mlflow_run_id"] = record_mlflow_lineage(project_dir)
    create_markdown_artifact(
        key="pipeline-summary",
        markdown=summary_markdown(project_dir, results, summary.get("mlflow_run_id")),
        description=(
            "The pipeline's scores before and after training, its MLflow run, what DVC did with each stage"
        ),
    )
    return summary


if __name__ == "__main__":
    pipeline(project_dir=os.environ.get("MRPO_PROJECT_DIR", "."))
