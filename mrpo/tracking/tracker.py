"""The one way stages record a run: `Tracker` (an MLflow run) or `NullTracker` (tracking off, or a rank that
does not record), with the same methods, so a stage never asks whether it is tracked.

    with tracked_run(cfg, kind="pipeline", name=..., source="mrpo train", enabled=track) as run:
        run.log_params(...); run.log_metrics(..., step=...); run.log_artifact(path, "plots")

A run is FINISHED when the `with` block completes, KILLED when interrupted, FAILED when anything else escapes.
`reopen(cfg)` gives the pipeline run the train stage recorded (for evaluate and the lineage). Names of the
quantities recorded: mrpo.tracking.names.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mrpo.config.schema import Config
from mrpo.interrupts import deferred_interrupts
from mrpo.tracking import names
from mrpo.tracking.store import (
    PARENT_RUN_ENV,
    POLICY_CARD_TAG,
    PipelineRun,
    card_digest,
    client_for,
    ensure_experiment,
    fluent_store,
    read_run_record,
    run_record_path,
    tracking_uri,
    write_run_record,
)
from mrpo.tracking.uri import redact

log = logging.getLogger("mrpo")

_BATCH = 100  # MLflow accepts at most 100 params per log_batch call
_MAX_TAG_CHARS = 6000  # MLflow's limit on a tag value


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class NullTracker:
    """Tracking off: every record is dropped; `run` and `run_id` are None."""

    run: PipelineRun | None = None
    run_id: str | None = None
    run_name: str | None = None

    def __bool__(self) -> bool:
        return self.run is not None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, model_id=None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, folder: str | None = None) -> None: ...
    def log_artifacts(self, directory: str | Path, folder: str | None = None) -> None: ...
    def log_dict(self, data: Mapping[str, Any], name: str) -> None: ...
    def log_datasets(self, data_dir: str | Path, prepared_digest: str) -> None: ...
    def log_model(self, policy_dir, *, params, tags, step, registered_model=None) -> str | None: ...
    def log_model_artifact(self, model_id: str, path: str | Path) -> None: ...
    def write_record(self, directory: str | Path, policy: str | Path | None = None) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...

    def tags(self) -> dict[str, str]:
        return {}


def execute_on(client, run_id: str):
    """How a Tracker's records (`op`, JSON `args`) reach the store: now, or replayed from an outbox."""

    def log_batch(metrics=(), params=(), tags=()):
        from mlflow.entities import Metric, Param, RunTag

        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=[Metric(*m) for m in metrics[i : i + 1000]])
        for i in range(0, len(params), _BATCH):
            client.log_batch(run_id, params=[Param(*p) for p in params[i : i + _BATCH]])
        for i in range(0, len(tags), _BATCH):
            client.log_batch(run_id, tags=[RunTag(*t) for t in tags[i : i + _BATCH]])

    def log_params(params):
        """Params the run does not have yet: a resumed run re-logs its config, and MLflow refuses to change a
        param (a changed one, e.g. a new eval interval on resume, keeps its first value, with a warning)."""
        existing = client.get_run(run_id).data.params
        for k, value in params.items():
            if k in existing and existing[k] != value:
                log.warning("mlflow: run %s keeps param %s=%r, not %r", run_id, k, existing[k], value)
        log_batch(params=[(k, v) for k, v in params.items() if k not in existing])

    def log_datasets(data_dir, prepared_digest):
        from mrpo.tracking.datasets import prepared_inputs

        client.log_inputs(run_id, datasets=list(prepared_inputs(data_dir, prepared_digest)))

    ops = {
        "log_batch": log_batch,
        "log_params": log_params,
        "set_tags": lambda tags: log_batch(tags=list(tags.items())),
        "log_artifact": lambda local_path, folder: client.log_artifact(run_id, local_path, folder),
        "log_artifacts": lambda local_path, folder: client.log_artifacts(run_id, local_path, folder),
        "log_dict": lambda data, name: client.log_dict(run_id, data, name),
        "log_datasets": log_datasets,
        "log_model_artifact": lambda model_id, local_path: client.log_model_artifact(model_id, local_path),
        "set_terminated": lambda status: client.set_terminated(run_id, status=status),
    }

    def execute(op: str, args: dict):
        with deferred_interrupts():
            return ops[op](**args)

    return execute


class Tracker(NullTracker):
    """One MLflow run, reached through MlflowClient (no global active run, so runs nest and interleave).
    Records go through an Outbox (mrpo.tracking.outbox): a tracking server outage never stops training."""

    def __init__(self, run: PipelineRun):
        from mrpo.tracking.outbox import Outbox

        self.run, self.run_id = run, run.run_id
        self.client = client_for(run.tracking_uri)
        self.outbox = Outbox(run.run_id, run.tracking_uri, execute_on(self.client, run.run_id))

    @property
    def run_name(self) -> str | None:
        return self.outbox.read(lambda: self.client.get_run(self.run_id).info.run_name, None)

    def tags(self) -> dict[str, str]:
        return self.outbox.read(lambda: dict(self.client.get_run(self.run_id).data.tags), {})

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params the run does not have yet (a changed one keeps its first value, with a warning); URIs in
        values are recorded without their user info."""
        values = {k: redact(names.param_value(v)) for k, v in params.items()}
        self.outbox.call("log_params", {"params": values})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, model_id=None) -> None:
        """Finite numbers only (MLflow rejects strings; NaN says nothing), linked to `model_id` if given; sent
        in the background to a server."""
        now = int(time.time() * 1000)
        items = [
            [names.metric_name(k), float(v), now, step or 0, model_id]
            for k, v in metrics.items()
            if _finite(v)
        ]
        if items:
            self.outbox.submit("log_batch", {"metrics": items})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        values = {k: redact(str(v))[:_MAX_TAG_CHARS] for k, v in tags.items()}
        self.outbox.call("set_tags", {"tags": values})

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.outbox.call("log_artifact", {"local_path": str(path), "folder": folder})

    def log_artifacts(self, directory: str | Path, folder: str | None = None) -> None:
        self.outbox.call("log_artifacts", {"local_path": str(directory), "folder": folder})

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self.outbox.call("log_dict", {"data": dict(data), "name": name})

    def log_datasets(self, data_dir: str | Path, prepared_digest: str) -> None:
        """The prepared splits as the run's dataset inputs (the Datasets column); see tracking.datasets."""
        self.outbox.call("log_datasets", {"data_dir": str(data_dir), "prepared_digest": prepared_digest})

    def log_model(self, policy_dir, *, params, tags, step, registered_model=None) -> str | None:
        """The policy as an external logged model (the Models column); see tracking.datasets.log_policy.
        None during a tracking outage (the run's outage tag says so)."""
        from mrpo.tracking.datasets import log_policy

        if self.outbox.offline:
            return None
        try:
            return log_policy(self, policy_dir, params, tags, step, registered_model)
        except Exception as exc:
            if self.outbox.is_outage(exc):
                return None
            raise

    def log_model_artifact(self, model_id: str, path: str | Path) -> None:
        self.outbox.call("log_model_artifact", {"model_id": model_id, "local_path": str(path)})

    def write_record(self, directory: str | Path, policy: str | Path | None = None) -> None:
        """The run record beside `directory`, and the card digest of the policy (`policy`, default
        `directory`: the train stage writes the record before the staged policy is swapped in) on the run
        (`reopen` finds the run of a policy by it, e.g. after `dvc exp apply`)."""
        digest = card_digest(policy if policy is not None else directory)
        if digest:
            self.set_tags({POLICY_CARD_TAG: digest})
        write_run_record(directory, self.run, digest)

    def children(self) -> dict[str, Tracker]:
        """The runs nested under this one, by run name."""
        found = self.client.search_runs(
            [self.run.experiment_id], f"tags.`{names.PARENT}` = '{self.run_id}'", max_results=1000
        )
        return {
            r.info.run_name: Tracker(PipelineRun(r.info.run_id, r.info.experiment_id, self.run.tracking_uri))
            for r in found
        }

    def metric_names(self) -> set[str]:
        self.outbox.flush()
        return self.outbox.read(lambda: set(self.client.get_run(self.run_id).data.metrics), set())

    def end(self, status: str = "FINISHED") -> None:
        self.outbox.end(status)


def start_run(
    cfg: Config,
    *,
    kind: str,
    name: str,
    source: str,
    tags: Mapping[str, str] | None = None,
    description: str | None = None,
    parent: Tracker | None = None,
    resume_run_id: str | None = None,
) -> Tracker:
    """A new run of `kind` in experiment `tracking.experiment` (or `resume_run_id`, reopened, when it still
    exists), nested under `parent` or the sweep's run (MRPO_PARENT_RUN_ID) when there is one."""
    import os

    uri = parent.run.tracking_uri if parent else tracking_uri(cfg)
    client = client_for(uri)
    if resume_run_id:
        try:
            experiment_id = client.get_run(resume_run_id).info.experiment_id
            client.update_run(resume_run_id, status="RUNNING")
            log.info("mlflow: resuming run %s in %s", resume_run_id, redact(uri))
            return Tracker(PipelineRun(resume_run_id, experiment_id, uri))
        except Exception as exc:  # the store was moved or wiped: start a fresh run rather than fail training
            log.warning("mlflow: cannot reopen run %s (%s); starting a new one", resume_run_id, exc)
    experiment_id = (
        parent.run.experiment_id if parent else ensure_experiment(client, cfg.tracking.experiment, uri)
    )
    all_tags = {names.KIND: kind, **names.source_tags(source), **(tags or {})}
    parent_id = parent.run_id if parent else os.environ.get(PARENT_RUN_ENV)
    if parent_id:
        all_tags[names.PARENT] = parent_id
    if description:
        all_tags[names.DESCRIPTION] = description
    run = client.create_run(experiment_id, run_name=name, tags=all_tags)
    log.info(
        "mlflow: started %s run %s (experiment %r) in %s",
        kind,
        run.info.run_id,
        cfg.tracking.experiment,
        redact(uri),
    )
    return Tracker(PipelineRun(run.info.run_id, experiment_id, uri))


@contextlib.contextmanager
def tracked_run(cfg: Config, *, enabled: bool = True, **start) -> Iterator[NullTracker]:
    """`start_run(cfg, **start)` for the `with` block, or a NullTracker when not `enabled`:
    FINISHED when the block completes, KILLED when interrupted, FAILED when anything else escapes it."""
    if not enabled:
        yield NullTracker()
        return
    run = start_run(cfg, **start)
    try:
        yield run
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (mrpo.interrupts.interrupt_on_sigterm)
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    run.end()


def pipeline_run_start(cfg: Config, resume_run_id: str | None = None) -> dict[str, Any]:
    """`start_run`'s arguments for the pipeline run (the train stage's, completed by evaluate)."""
    return {
        "kind": "pipeline",
        "name": cfg.tracking.run_name or names.default_run_name(cfg),
        "source": "mrpo train",
        "tags": {"mrpo.stage": "train"},
        "description": names.run_description(cfg),
        "resume_run_id": resume_run_id,
    }


def start_pipeline_run(cfg: Config, *, resume_run_id: str | None = None) -> PipelineRun:
    """The pipeline run, started (and left RUNNING) outside a stage, e.g. by a test."""
    return start_run(cfg, **pipeline_run_start(cfg, resume_run_id)).run


def reopen(cfg: Config, stage: str) -> NullTracker:
    """The run that trained the policy in `train.output_dir`: the one recorded in
    `<train.output_dir>.mlflow_run.json`, in the store it lives in (a different current tracking URI gets a
    warning), unless that record belongs to another policy or its run is gone (`dvc exp apply` brings a
    policy, not its record): then the run the current store tags with this policy's card digest; a
    NullTracker, with a warning, when there is none."""
    record = read_run_record(cfg.train.output_dir)
    digest = card_digest(cfg.train.output_dir)
    if record is not None and record.policy_card_sha256 in (None, digest) and _exists(record):
        if tracking_uri(cfg) != record.tracking_uri:
            log.warning(
                "mlflow: run %s lives in %s; logging there", record.run_id, redact(record.tracking_uri)
            )
        return Tracker(record)
    found = _run_of_policy(cfg, digest)
    if found is not None:
        log.info("mlflow: %s logs into run %s, which trained %s", stage, found.run_id, cfg.train.output_dir)
        return Tracker(found)
    why = (
        "no MLflow run recorded"
        if record is None
        else f"the recorded run {record.run_id} is not this policy's"
    )
    log.warning("%s: %s for %s; nothing logged to MLflow", stage, why, cfg.train.output_dir)
    return NullTracker()


def _exists(record: PipelineRun) -> bool:
    """False only when the store says the run does not exist (an unreachable store is the outbox's case)."""
    from mlflow.exceptions import MlflowException

    try:
        client_for(record.tracking_uri).get_run(record.run_id)
    except MlflowException as exc:
        return exc.error_code != "RESOURCE_DOES_NOT_EXIST"
    except Exception:
        return True
    return True


def _run_of_policy(cfg: Config, digest: str | None) -> PipelineRun | None:
    if digest is None:
        return None
    uri = tracking_uri(cfg)
    client = client_for(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return None
    found = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{POLICY_CARD_TAG}` = '{digest}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return PipelineRun(found[0].info.run_id, experiment.experiment_id, uri, digest) if found else None


@contextlib.contextmanager
def open_pipeline_run(cfg: Config) -> Iterator[Any]:
    """The recorded pipeline run as MLflow's active run for the `with` block (the fluent API, e.g.
    `mlflow.log_metric`, logs into it), marked finished again on exit."""
    import mlflow

    record = read_run_record(cfg.train.output_dir)
    if record is None:
        raise FileNotFoundError(
            f"{run_record_path(cfg.train.output_dir)}: no pipeline run recorded; run `mrpo train` first"
        )
    with fluent_store(record.tracking_uri), mlflow.start_run(run_id=record.run_id) as run:
        yield run
