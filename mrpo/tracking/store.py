"""Where runs are stored and how a run is found again from another stage or process.

`MLFLOW_TRACKING_URI` wins, then `tracking.tracking_uri` in params.yaml, else
`sqlite:///<project>/mlflow.db` with artifacts under `<project>/mlruns`; a relative local store means the
project's main workspace (mrpo.tracking.uri). The train stage records its run in
`<train.output_dir>.mlflow_run.json` (the URI without user info, a store inside the project relative to it);
evaluate, the lineage and the flows reopen the same run from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from mrpo.config.schema import Config
from mrpo.errors import ConfigError
from mrpo.io import write_json_atomically
from mrpo.tracking.uri import is_remote, portable, project_root, redact, resolve

RUN_RECORD_SUFFIX = ".mlflow_run.json"


def run_record_path(policy_dir: str | Path) -> Path:
    """Where the MLflow run that trained `policy_dir` is recorded: beside it
    (`models/policy.mlflow_run.json`), not inside it, so the policy directory (a DVC output) holds only what
    the same inputs reproduce byte for byte; git ignores the record (`*.mlflow_run.json`)."""
    policy_dir = Path(policy_dir)
    return policy_dir.with_name(policy_dir.name + RUN_RECORD_SUFFIX)


PARENT_RUN_ENV = "MRPO_PARENT_RUN_ID"  # set by the sweep flow: new runs nest under that MLflow run


@dataclass(frozen=True)
class PipelineRun:
    """Where one MLflow run lives: enough to reopen it from another stage or process."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    policy_card_sha256: str | None = None  # the card of the policy the run trained: which policy it is


POLICY_CARD_TAG = "mrpo.policy_card_sha256"


def card_digest(policy_dir: str | Path) -> str | None:
    """sha256 of the policy's model card (it names the inputs, settings and metrics of the run that wrote
    it), None without one."""
    import hashlib

    card = Path(policy_dir) / "README.md"
    return hashlib.sha256(card.read_bytes()).hexdigest() if card.is_file() else None


def tracking_uri(cfg: Config, project_dir: str | Path | None = None) -> str:
    """MLFLOW_TRACKING_URI, else params.yaml `tracking.tracking_uri`, else a sqlite store in the project; a
    relative local store resolved against `project_dir` (default: the main workspace, `uri.project_root`)."""
    root = Path(project_dir).resolve() if project_dir else project_root()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri or "sqlite:///mlflow.db"
    return resolve(uri, root)


def artifact_root(uri: str) -> str | None:
    """Artifacts next to a sqlite store (in mlruns/, which git ignores); other stores choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()
    return None


# A server that accepts and never answers would otherwise hold each request for MLflow's defaults (120 s, 7
# retries with backoff: about 18 minutes); an outage is buffered instead (mrpo.tracking.outbox). The user's
# own settings of these variables win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
}


def client_for(uri: str):
    from mlflow import MlflowClient

    if is_remote(uri):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created (with artifacts beside a local store) when it does not exist."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"tracking.experiment: MLflow experiment {name!r} (id {experiment.experiment_id}) is deleted in "
            f"{redact(uri)}; restore it (`mlflow experiments restore --experiment-id "
            f"{experiment.experiment_id}` with MLFLOW_TRACKING_URI={redact(uri)}) "
            "or choose another tracking.experiment"
        )
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(uri))


def write_run_record(policy_dir: str | Path, run: PipelineRun, policy_card_sha256: str | None = None) -> Path:
    """The run's record; its URI as `uri.portable` has it (no user info, a store in the project relative);
    the policy's card digest, given or of the card in `policy_dir`."""
    path = run_record_path(policy_dir)
    record = {
        **asdict(run),
        "tracking_uri": portable(run.tracking_uri),
        "policy_card_sha256": policy_card_sha256 or card_digest(policy_dir),
    }
    write_json_atomically(path, record)
    return path


def read_run_record(policy_dir: str | Path) -> PipelineRun | None:
    path = run_record_path(policy_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(PipelineRun)}
        run = PipelineRun(**{k: v for k, v in data.items() if k in known})  # a newer record's extras: ignored
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{path}: not a valid MLflow run record ({exc}); delete it and re-run `mrpo train`"
        ) from exc
    return dataclasses.replace(run, tracking_uri=with_credentials(resolve(run.tracking_uri)))


def with_credentials(uri: str) -> str:
    """A recorded (redacted) server URI with the user info MLFLOW_TRACKING_URI gives for the same server."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    return env if env and env != uri and redact(env) == uri else uri


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
