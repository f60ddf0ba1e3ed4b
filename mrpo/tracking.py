"""MLflow bookkeeping for the pipeline: one run per trained policy, shared by the train and evaluate stages.

The train stage creates (or, when it resumes from a checkpoint, reopens) the
pipeline run and records its id in ``<train.output_dir>/mlflow_run.json``; the
evaluate stage reopens the SAME run with :func:`open_pipeline_run`.

Where runs are stored: ``MLFLOW_TRACKING_URI`` wins, then
``tracking.tracking_uri`` in params.yaml, else ``sqlite:///<project>/mlflow.db``
with artifacts under ``<project>/mlruns``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from mrpo.config import Config, config_to_flat_dict

log = logging.getLogger("mrpo")

RUN_RECORD = "mlflow_run.json"
_MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
_BATCH = 100  # MLflow accepts at most 100 params per log_batch call
PARENT_RUN_ENV = "MRPO_PARENT_RUN_ID"  # set by the sweep flow: new runs nest under that MLflow run


@dataclass(frozen=True)
class PipelineRun:
    """Where the pipeline's MLflow run lives: enough to reopen it from another stage or process."""

    run_id: str
    experiment_id: str
    tracking_uri: str


def tracking_uri(cfg: Config, project_dir: str | Path | None = None) -> str:
    """MLFLOW_TRACKING_URI, else params.yaml `tracking.tracking_uri`, else a sqlite store in the project."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    root = Path(project_dir or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Artifacts next to a sqlite store (in mlruns/, which git ignores); other stores choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()
    return None


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def start_pipeline_run(
    cfg: Config, *, resume_run_id: str | None = None, tags: Mapping[str, str] | None = None
) -> PipelineRun:
    """Create the pipeline run in experiment `tracking.experiment`, or reopen `resume_run_id` when it still exists."""
    uri = tracking_uri(cfg)
    client = client_for(uri)
    if resume_run_id:
        try:
            run = client.get_run(resume_run_id)
            client.update_run(resume_run_id, status="RUNNING")
            log.info("mlflow: resuming run %s in %s", resume_run_id, uri)
            return PipelineRun(resume_run_id, run.info.experiment_id, uri)
        except Exception as exc:  # the store was moved or wiped: start a fresh run rather than fail training
            log.warning("mlflow: cannot reopen run %s (%s); starting a new one", resume_run_id, exc)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        experiment_id = client.create_experiment(
            cfg.tracking.experiment, artifact_location=artifact_root(uri)
        )
    else:
        experiment_id = experiment.experiment_id
    tags = dict(tags or {})
    if os.environ.get(PARENT_RUN_ENV):  # a sweep member: nest under the sweep's parent run
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    tags.setdefault("mlflow.note.content", run_description(cfg))
    run = client.create_run(experiment_id, run_name=cfg.tracking.run_name or default_run_name(cfg), tags=tags)
    log.info("mlflow: started run %s (experiment %r) in %s", run.info.run_id, cfg.tracking.experiment, uri)
    return PipelineRun(run.info.run_id, experiment_id, uri)


def default_run_name(cfg: Config) -> str:
    """What the run is, e.g. `mrpo-vdw-anchor+gpt2_char+llama_expert-b0.1-s0-3f9a1c`.

    MLflow's random names repeat here (the stage seeds Python's RNG before the run exists), and say nothing; the
    suffix, a hash of the whole configuration, tells apart runs that differ elsewhere.
    """
    t = cfg.train
    refs = "+".join(r.name for r in cfg.training_references())
    what = t.objective if t.objective == "dpo" else f"{t.objective}-{t.strategy}"
    digest = hashlib.sha256(
        json.dumps(config_to_flat_dict(cfg), sort_keys=True, default=str).encode()
    ).hexdigest()
    return f"{what}-{refs}-b{t.beta:g}-s{cfg.seed}-{digest[:6]}"


def run_description(cfg: Config) -> str:
    t = cfg.train
    refs = ", ".join(f"{r.name} ({r.model})" for r in cfg.training_references())
    return (
        f"{t.objective} ({t.loss_type} loss, beta {t.beta:g}, weighting {t.strategy}) against {refs}; "
        f"anchor {cfg.anchor.name}; data {cfg.data.source}; seed {cfg.seed}."
    )


def write_run_record(directory: str | Path, run: PipelineRun) -> Path:
    path = Path(directory) / RUN_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(run), indent=2) + "\n")
    return path


def read_run_record(directory: str | Path) -> PipelineRun | None:
    path = Path(directory) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        return PipelineRun(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"{path}: not a valid MLflow run record ({exc}); delete it and re-run `mrpo train`"
        ) from exc


@contextlib.contextmanager
def open_pipeline_run(cfg: Config) -> Iterator[Any]:
    """Reopen the run the train stage recorded in `<train.output_dir>/mlflow_run.json` as the active MLflow run.

    Inside the `with`, the fluent API (`mlflow.log_metric`, `mlflow.log_artifact`,
    ...) logs into that run; on exit it is marked finished again. The run's
    recorded store is used (a different current tracking URI gets a warning).
    """
    import mlflow

    record = read_run_record(cfg.train.output_dir)
    if record is None:
        raise FileNotFoundError(
            f"{Path(cfg.train.output_dir) / RUN_RECORD}: no pipeline run recorded; run `mrpo train` first"
        )
    current = tracking_uri(cfg)
    if current != record.tracking_uri:
        log.warning(
            "mlflow: run %s lives in %s, not in the current tracking URI %s; logging there",
            record.run_id,
            record.tracking_uri,
            current,
        )
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(record.tracking_uri)
    try:
        with mlflow.start_run(run_id=record.run_id) as run:
            yield run
    finally:
        mlflow.set_tracking_uri(previous)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:_MAX_PARAM_CHARS]


def log_params(run: PipelineRun, params: Mapping[str, Any]) -> None:
    """Log params, skipping those the run already has: a resumed run re-logs its config, and MLflow refuses to
    change a param's value (a changed one, e.g. a new eval interval on resume, is kept as first logged, with a warning)."""
    from mlflow.entities import Param

    client = client_for(run.tracking_uri)
    existing = client.get_run(run.run_id).data.params
    items = []
    for k, v in params.items():
        value = _param_value(v)
        if k in existing:
            if existing[k] != value:
                log.warning(
                    "mlflow: run %s already has param %s=%r; not changing it to %r",
                    run.run_id,
                    k,
                    existing[k],
                    value,
                )
            continue
        items.append(Param(k, value))
    for i in range(0, len(items), _BATCH):
        client.log_batch(run.run_id, params=items[i : i + _BATCH])


def log_config(run: PipelineRun, cfg: Config) -> None:
    """Every params.yaml value as a `section.key` param."""
    log_params(run, config_to_flat_dict(cfg))


def log_reference_set(run: PipelineRun, references: list[dict[str, Any]]) -> None:
    """The references (name, model id, revision/content hash, score file sha256) as params and a JSON artifact."""
    params = {}
    for ref in references:
        for key, value in ref.items():
            if key != "name" and value is not None:
                params[f"reference_set.{ref['name']}.{key}"] = value
    params["reference_set.names"] = [r["name"] for r in references]
    log_params(run, params)
    client_for(run.tracking_uri).log_dict(run.run_id, {"references": references}, "reference_set.json")


def log_metrics(run: PipelineRun, metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Finite numeric values only (MLflow rejects strings; NaN says nothing)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step or 0)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ]
    client = client_for(run.tracking_uri)
    for i in range(0, len(items), 1000):
        client.log_batch(run.run_id, metrics=items[i : i + 1000])


def log_files(run: PipelineRun, paths, artifact_path: str) -> None:
    """Copy `paths` (files) into the run's artifacts under `artifact_path`."""
    client = client_for(run.tracking_uri)
    for path in paths:
        client.log_artifact(run.run_id, str(path), artifact_path)


def record_policy(run: PipelineRun, policy_dir: str | Path) -> None:
    """Where the trained policy lives (tag `mrpo.policy_dir`) and what it holds (artifact `policy.json`: files and
    sizes). The weights stay in DVC's cache, not copied into the MLflow store."""
    root = Path(policy_dir).resolve()
    files = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    client = client_for(run.tracking_uri)
    client.set_tag(run.run_id, "mrpo.policy_dir", str(root))
    client.log_dict(run.run_id, {"policy_dir": str(root), "files": files}, "policy.json")


def finish_run(run: PipelineRun, status: str = "FINISHED") -> None:
    client_for(run.tracking_uri).set_terminated(run.run_id, status=status)


@contextlib.contextmanager
def pipeline_run(
    cfg: Config,
    *,
    enabled: bool = True,
    resume_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[PipelineRun | None]:
    """The stage's MLflow run for the `with` block (None when not `enabled`): FINISHED when the block completes,
    FAILED when anything escapes it, an interrupt included."""
    if not enabled:
        yield None
        return
    run = start_pipeline_run(cfg, resume_run_id=resume_run_id, tags=tags)
    try:
        yield run
    except BaseException:
        finish_run(run, status="FAILED")
        raise
    finish_run(run)


class MLflowStepCallback(TrainerCallback):
    """Logs every Trainer log (training curves and validation metrics) as MLflow metrics with the global step."""

    def __init__(self, run: PipelineRun):
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            log_metrics(self.run, logs, step=state.global_step)
        return control
