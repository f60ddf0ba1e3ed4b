"""MLflow lineage for one pipeline run; no Prefect here.

The train stage opens the pipeline's MLflow run and records its id in
`<train.output_dir>/mlflow_run.json`. After evaluate, `record_lineage` completes that run with
what only the whole pipeline knows: the git commit, the `dvc.lock` digest, the prepared data
digest, the reference set with each score file's digest, the downstream scores, and the
artifacts (metrics files, training plots as PNG, lm-eval results). Values that identify a
pipeline state go into tags (searchable, and re-recordable when `dvc repro` re-uses a cached
training run); every params.yaml value goes into params.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import yaml

from flows.stages import flatten, numeric_items
from mrpo.config import Config, config_to_flat_dict
from mrpo.io import file_sha256
from mrpo.plots import PNG_FILES, VALIDATION_FILE
from mrpo.tracking import RUN_RECORD, PipelineRun, read_run_record, tracking_uri

log = logging.getLogger("mrpo")


def git_commit(project_dir: str | Path) -> tuple[str | None, bool]:
    """(HEAD commit, whether the work tree has uncommitted changes); (None, False) outside git."""

    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, bool(status)


def dvc_lock_stage_digests(project_dir: str | Path) -> dict[str, str]:
    """Output path -> md5 as recorded in dvc.lock (the digests DVC versions the data by)."""
    lock = Path(project_dir) / "dvc.lock"
    if not lock.is_file():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    out = {}
    for stage in (data.get("stages") or {}).values():
        for entry in stage.get("outs") or []:
            if entry.get("md5"):
                out[entry["path"]] = entry["md5"]
    return out


def read_run(cfg: Config, project_dir: str | Path) -> PipelineRun | None:
    """The MLflow run (id and store) the train stage recorded, or None when it recorded none."""
    return read_run_record(Path(project_dir) / cfg.train.output_dir)


def reference_lineage(cfg: Config, project_dir: str | Path) -> dict[str, str]:
    """Tags naming the reference set: names, model ids or revisions, and each score file's digest."""
    digests = dvc_lock_stage_digests(project_dir)
    training = [r.name for r in cfg.training_references()]
    tags = {
        "mrpo.reference_set": ",".join(training),
        "mrpo.references": ",".join(r.name for r in cfg.references),
        "mrpo.anchor": cfg.anchor.name,
        "mrpo.objective": cfg.train.objective,
        "mrpo.strategy": cfg.train.strategy,
    }
    for ref in cfg.references:
        tags[f"mrpo.reference.{ref.name}.model"] = ref.model
        if ref.revision:
            tags[f"mrpo.reference.{ref.name}.revision"] = ref.revision
        score_path = f"{cfg.score.output_dir}/{ref.name}.parquet"
        digest = digests.get(score_path)
        if digest is None and (Path(project_dir) / score_path).is_file():
            digest = file_sha256(Path(project_dir) / score_path)
        if digest:
            tags[f"mrpo.reference.{ref.name}.score_digest"] = digest
    return tags


def record_lineage(cfg: Config, project_dir: str | Path, run_id: str | None = None) -> str:
    """Complete the pipeline's MLflow run with its lineage and artifacts; returns the run id.

    `run_id` defaults to the one the train stage recorded. Raises FileNotFoundError naming the
    file when the train stage recorded none (run `dvc repro train` first).
    """
    from mlflow.tracking import MlflowClient

    root = Path(project_dir).resolve()
    record = read_run(cfg, root)
    if run_id is None and record is None:
        raise FileNotFoundError(
            f"{root / cfg.train.output_dir / RUN_RECORD}: the train stage recorded no MLflow run; "
            "run `dvc repro train` (or the pipeline flow) first"
        )
    run_id = run_id or record.run_id
    uri = record.tracking_uri if record is not None and record.run_id == run_id else tracking_uri(cfg, root)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)

    commit, dirty = git_commit(root)
    tags: dict[str, str] = {"mrpo.pipeline": "dvc"}
    if commit:
        tags.update(
            {"mlflow.source.git.commit": commit, "mrpo.git_commit": commit, "mrpo.git_dirty": str(dirty)}
        )
    if (root / "dvc.lock").is_file():
        tags["mrpo.dvc_lock_digest"] = file_sha256(root / "dvc.lock")
    report = root / cfg.data.output_dir / "report.json"
    try:
        from mrpo.data import prepared_digest

        tags["mrpo.prepared_digest"] = prepared_digest(root / cfg.data.output_dir)
    except (ImportError, FileNotFoundError, OSError):
        if report.is_file():
            tags["mrpo.prepared_digest"] = str(json.loads(report.read_text()).get("digest"))
    tags.update(reference_lineage(cfg, root))
    for key, value in tags.items():
        client.set_tag(run_id, key, value)

    # params: every params.yaml value not already logged (MLflow params are immutable; a cached
    # training run re-used by a later `dvc repro` already holds identical values)
    logged = run.data.params
    params = {k: _param_value(v) for k, v in config_to_flat_dict(cfg).items() if k not in logged}
    from mlflow.entities import Metric, Param

    if params:
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])

    # downstream scores: eval metrics under `eval.` unless the evaluate stage logged them already
    eval_metrics = numeric_items(flatten(_read_json(root / cfg.evaluate.metrics_file)))
    have = set(run.data.metrics)
    new = {f"eval.{k}": v for k, v in eval_metrics.items() if k not in have and f"eval.{k}" not in have}
    if new:
        import time

        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in new.items()])

    _log_artifacts(client, run_id, cfg, root)
    log.info("lineage recorded on MLflow run %s (%s)", run_id, uri)
    return run_id


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]  # MLflow's param value limit


def _log_artifacts(client, run_id: str, cfg: Config, root: Path) -> None:
    for metrics_file in (cfg.train.metrics_file, cfg.evaluate.metrics_file):
        if (root / metrics_file).is_file():
            client.log_artifact(run_id, str(root / metrics_file), "metrics")
    for name in ("params.yaml", "dvc.yaml", "dvc.lock"):
        if (root / name).is_file():
            client.log_artifact(run_id, str(root / name), "lineage")
    report = root / cfg.data.output_dir / "report.json"
    if report.is_file():
        client.log_artifact(run_id, str(report), "data")
    # The curves and their PNG renders, as the train stage wrote them (mrpo.train.write_plots).
    curves = [root / cfg.train.plots_file, root / cfg.train.plots_dir / VALIDATION_FILE]
    for path in [*curves, *(root / cfg.train.plots_dir / name for name in PNG_FILES)]:
        if path.is_file():
            client.log_artifact(run_id, str(path), "plots")
    results = root / cfg.evaluate.results_dir
    if results.is_dir() and any(results.iterdir()):
        client.log_artifacts(run_id, str(results), "lm_eval")
