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
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from mrpo.config.schema import Config, config_to_flat_dict

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


def ensure_experiment(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created (with artifacts beside a local store) when it does not exist."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(uri))


def start_pipeline_run(
    cfg: Config, *, resume_run_id: str | None = None, tags: Mapping[str, str] | None = None
) -> PipelineRun:
    """Create the pipeline run in experiment `tracking.experiment`,
    or reopen `resume_run_id` when it still exists."""
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
    experiment_id = ensure_experiment(client, cfg.tracking.experiment, uri)
    tags = dict(tags or {})
    if os.environ.get(PARENT_RUN_ENV):  # a sweep member: nest under the sweep's parent run
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    tags.setdefault("mlflow.note.content", run_description(cfg))
    run = client.create_run(experiment_id, run_name=cfg.tracking.run_name or default_run_name(cfg), tags=tags)
    log.info("mlflow: started run %s (experiment %r) in %s", run.info.run_id, cfg.tracking.experiment, uri)
    return PipelineRun(run.info.run_id, experiment_id, uri)


def default_run_name(cfg: Config) -> str:
    """What the run is, e.g. `mrpo-vdw-anchor+gpt2_char+llama_expert-b0.1-s0-3f9a1c`.

    MLflow's random names repeat here (the stage seeds Python's RNG before the run exists), and say nothing;
    the suffix, a hash of the whole configuration, tells apart runs that differ elsewhere.
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
    loss = t.loss_type if isinstance(t.loss_type, str) else " + ".join(t.loss_type)
    return (
        f"{t.objective} ({loss} loss, beta {t.beta:g}, weighting {t.strategy}) against {refs}; "
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
def fluent_store(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at `uri` for the `with` block, then exactly as before.

    `mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI in os.environ (for subprocesses), which
    `tracking_uri` reads first: restoring with `set_tracking_uri(mlflow.get_tracking_uri())` would leave every
    later run of this process in that store (or in the default one), so restore the setting and the variable.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_setting, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_setting)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


@contextlib.contextmanager
def open_pipeline_run(cfg: Config) -> Iterator[Any]:
    """Reopen the run the train stage recorded in
    `<train.output_dir>/mlflow_run.json` as the active MLflow run.

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
    with fluent_store(record.tracking_uri), mlflow.start_run(run_id=record.run_id) as run:
        yield run


_METRIC_NAME_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")


def metric_name(key: str) -> str:
    """A name MLflow accepts (letters, digits, _ - . / and space): anything else becomes '_'."""
    return _METRIC_NAME_BAD.sub("_", key)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:_MAX_PARAM_CHARS]


def log_params(run: PipelineRun, params: Mapping[str, Any]) -> None:
    """Log params, skipping those the run already has: a resumed run re-logs its config, and MLflow refuses to
    change a param's value (a changed one, e.g. a new eval interval on resume, is kept as first logged,
    with a warning)."""
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
    """The references (name, model id, revision/content hash, score file sha256)
    as params and a JSON artifact."""
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


def record_policy(run: PipelineRun, policy_dir: str | Path) -> None:
    """Where the trained policy lives (tag `mrpo.policy_dir`) and what it holds (artifact `policy.json`: files
    and sizes). The weights stay in DVC's cache, not copied into the MLflow store."""
    root = Path(policy_dir).resolve()
    files = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    client = client_for(run.tracking_uri)
    client.set_tag(run.run_id, "mrpo.policy_dir", str(root))
    client.log_dict(run.run_id, {"policy_dir": str(root), "files": files}, "policy.json")


def set_tags(run: PipelineRun, tags: Mapping[str, str]) -> None:
    client = client_for(run.tracking_uri)
    for key, value in tags.items():
        client.set_tag(run.run_id, key, str(value)[:_MAX_PARAM_CHARS])


def log_datasets(run: PipelineRun, data_dir: str | Path, prepared_digest: str) -> None:
    """The prepared splits as the run's dataset inputs (the Datasets column): name `prepared/<split>`, the
    parquet file as source, its sha256 (first 32 hex digits, MLflow's limit) as digest, the split as
    context; the prepared data's full digest (mrpo.data.prepared_digest) as a tag on each. MLflow records a
    dataset once per run, so a resumed run does not repeat them."""
    import warnings

    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    from mrpo.data.prepared import SPLITS, read_split, split_path
    from mrpo.io import file_sha256

    contexts = {"train": "training", "val": "validation", "test": "testing"}
    inputs = []
    for split in SPLITS:
        path = split_path(data_dir, split).resolve()
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways" (two equal ones)
            warnings.simplefilter("ignore")
            dataset = mlflow.data.from_pandas(
                read_split(data_dir, split),
                source=str(path),
                name=f"prepared/{split}",
                digest=file_sha256(path)[:32],
            )
        tags = [
            InputTag("mlflow.data.context", contexts[split]),
            InputTag("mrpo.prepared_digest", prepared_digest),
        ]
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=tags))
    client_for(run.tracking_uri).log_inputs(run.run_id, datasets=inputs)


def log_policy_model(
    run: PipelineRun,
    policy_dir: str | Path,
    *,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    step: int,
    registered_model: str | None = None,
) -> str:
    """The trained policy as an MLflow logged model (the Models column): an *external* model, since its
    weights stay where DVC versions them (`policy_dir`, tag `mrpo.policy_dir`); its model card is copied in
    as an artifact. Registered under `registered_model` when one is named. Returns the model id, also
    tagged on the run as `mrpo.model_id`."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    root = Path(policy_dir).resolve()
    client = client_for(run.tracking_uri)
    with fluent_store(run.tracking_uri):  # create_external_model and register_model use the fluent client
        model = mlflow.create_external_model(
            name="policy",
            source_run_id=run.run_id,
            experiment_id=run.experiment_id,
            model_type="mrpo-policy",
            params={k: _param_value(v) for k, v in params.items()},
            tags={"mrpo.policy_dir": str(root), **tags},
        )
        client.log_outputs(run.run_id, [LoggedModelOutput(model.model_id, step)])
        card = root / "README.md"
        if card.is_file():
            client.log_model_artifact(model.model_id, str(card))
        if registered_model:
            version = mlflow.register_model(f"models:/{model.model_id}", registered_model)
            client.set_tag(run.run_id, "mrpo.registered_model", f"{registered_model}/{version.version}")
    client.set_tag(run.run_id, "mrpo.model_id", model.model_id)
    return model.model_id


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
    """The stage's MLflow run for the `with` block (None when not `enabled`):
    FINISHED when the block completes, FAILED when anything escapes it, an interrupt included."""
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


# Trainer's bookkeeping, not curves: wall-clock of each evaluation, and its end-of-training summary (whose
# `train_loss` is over the resumed part only; the train stage logs the whole run's as `train_loss` itself).
_SKIPPED_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")
_SKIPPED = {"total_flos", "train_loss"}


def curve_metrics(logs: Mapping[str, Any]) -> dict[str, Any]:
    """One Trainer log as MLflow metrics, one name per quantity.

    Validation is `eval_*` whether Trainer evaluated on schedule or the stage evaluated after training
    (`val_*`), test is `test_*`; `epoch` only with the training curves (Trainer adds it to every log).
    """
    training = "loss" in logs
    out = {}
    for key, value in logs.items():
        if key in _SKIPPED or key.endswith(_SKIPPED_SUFFIXES) or (key == "epoch" and not training):
            continue
        out["eval_" + key[len("val_") :] if key.startswith("val_") else key] = value
    return out


def log_evaluation(run: PipelineRun, metrics: Mapping[str, Any], step: int) -> None:
    """An evaluation's metrics (`val_*`, `test_*` from `Trainer.evaluate`) at `step`, named as curves."""
    log_metrics(run, curve_metrics(metrics), step=step)


class MLflowStepCallback(TrainerCallback):
    """Logs every Trainer log (training curves and validation metrics) as MLflow metrics with the global step;
    a value already logged at that step under that name (the evaluation after training, when the last step
    was also a scheduled one) is not logged twice."""

    def __init__(self, run: PipelineRun):
        self.run = run
        self._logged: set[tuple[str, int]] = set()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            step = state.global_step
            metrics = {k: v for k, v in curve_metrics(logs).items() if (k, step) not in self._logged}
            self._logged.update((k, step) for k in metrics)
            log_metrics(self.run, metrics, step=step)
        return control
