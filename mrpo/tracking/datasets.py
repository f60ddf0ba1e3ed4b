"""What a run used and made, in MLflow's own columns: the prepared splits as dataset inputs (Datasets) and
the trained policy as an external logged model (Models)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mrpo.tracking.store import fluent_store

_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


@functools.lru_cache(maxsize=4)  # a comparison logs the same splits on every member
def prepared_inputs(data_dir: str, prepared_digest: str) -> tuple:
    """One DatasetInput per split: name `prepared/<split>`, the parquet file as source, its sha256 (first 32
    hex digits, MLflow's limit) as digest, the split as context; the prepared data's full digest
    (mrpo.data.prepared.prepared_digest) as a tag on each. MLflow records a dataset once per run, so a
    resumed run does not repeat them."""
    import warnings

    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    from mrpo.data.prepared import SPLITS, read_split, split_path
    from mrpo.io import file_sha256

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
            InputTag("mlflow.data.context", _CONTEXTS[split]),
            InputTag("mrpo.prepared_digest", prepared_digest),
        ]
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=tags))
    return tuple(inputs)


def policy_listing(policy_dir: str | Path) -> dict[str, Any]:
    """Where the trained policy lives and what it holds (files and sizes): the weights stay in DVC's cache,
    not copied into the MLflow store."""
    root = Path(policy_dir).resolve()
    files = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    return {"policy_dir": str(root), "files": files}


def log_policy(
    run,
    policy_dir: str | Path,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    step: int,
    registered_model: str | None = None,
) -> str:
    """The trained policy as an MLflow logged model of `run` (a mrpo.tracking.tracker.Tracker): an *external*
    model, since its weights stay where DVC versions them (tag `mrpo.policy_dir`, artifact `policy.json`);
    its model card copied in. Registered under `registered_model` when one is named. Returns the model id,
    also tagged on the run as `mrpo.model_id`."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    from mrpo.tracking.names import param_value

    listing = policy_listing(policy_dir)
    root = Path(listing["policy_dir"])
    run.set_tags({"mrpo.policy_dir": str(root)})
    run.log_dict(listing, "policy.json")
    client = run.client
    with fluent_store(run.run.tracking_uri):  # create_external_model and register_model use the fluent client
        model = mlflow.create_external_model(
            name="policy",
            source_run_id=run.run_id,
            experiment_id=run.run.experiment_id,
            model_type="mrpo-policy",
            params={k: param_value(v) for k, v in params.items()},
            tags={"mrpo.policy_dir": str(root), **tags},
        )
        client.log_outputs(run.run_id, [LoggedModelOutput(model.model_id, step)])
        card = root / "README.md"
        if card.is_file():
            client.log_model_artifact(model.model_id, str(card))
        if registered_model:
            version = mlflow.register_model(f"models:/{model.model_id}", registered_model)
            run.set_tags({"mrpo.registered_model": f"{registered_model}/{version.version}"})
    run.set_tags({"mrpo.model_id": model.model_id})
    return model.model_id
