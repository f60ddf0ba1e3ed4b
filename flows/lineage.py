"""MLflow lineage at the end of a Prefect pipeline run; the logic is the library's (mrpo.tracking.lineage).

The train stage records the run's git state, launcher and starting `dvc.lock` digest, evaluate completes it;
the flow calls `record_lineage` once more after every stage, when `dvc.lock` holds the whole pipeline's
final entries. Re-exports the helpers other flows use.
"""

from __future__ import annotations

from pathlib import Path

from mrpo.config.schema import Config
from mrpo.tracking.lineage import (  # noqa: F401  (re-exported)
    complete_lineage,
    dvc_lock_stage_digests,
    git_commit,
    reference_lineage,
)
from mrpo.tracking.store import PipelineRun, client_for, read_run_record, run_record_path, tracking_uri
from mrpo.tracking.tracker import Tracker


def read_run(cfg: Config, project_dir: str | Path) -> PipelineRun | None:
    """The MLflow run (id and store) the train stage recorded, or None when it recorded none."""
    return read_run_record(Path(project_dir) / cfg.train.output_dir)


def record_lineage(cfg: Config, project_dir: str | Path, run_id: str | None = None) -> str:
    """Complete the pipeline's MLflow run with its lineage and artifacts; returns the run id.

    `run_id` defaults to the one the train stage recorded. Raises FileNotFoundError naming the
    file when the train stage recorded none (run `dvc repro train` first).
    """
    root = Path(project_dir).resolve()
    record = read_run(cfg, root)
    if run_id is None and record is None:
        raise FileNotFoundError(
            f"{run_record_path(root / cfg.train.output_dir)}: the train stage recorded no MLflow run; "
            "run `dvc repro train` (or the pipeline flow) first"
        )
    if record is not None and (run_id is None or record.run_id == run_id):
        run = record
    else:
        uri = tracking_uri(cfg, root)
        run = PipelineRun(run_id, client_for(uri).get_run(run_id).info.experiment_id, uri)
    complete_lineage(cfg, Tracker(run), root, extra_tags={"mrpo.flow": "pipeline"})
    return run.run_id
