"""The lineage of a pipeline run, recorded the same way whatever started it: `mrpo train`, `dvc repro`,
`dvc exp run` or the Prefect flow.

Three moments, because DVC writes a stage's `dvc.lock` entry only after the stage's command has ended:

* train starts (`start_tags`): the git commit, whether the work tree differs from it (with the sha256 of
  `git diff HEAD`), what launched the run, the `dvc.lock` digest as it was before training, the key params;
* train ends (`record_training_outputs`): the training curves (CSV and PNG) and `metrics/train.json`;
* evaluate ends, and again when the Prefect flow ends (`complete_lineage`): the `dvc.lock` digest as it is
  then (after `dvc repro`, evaluate sees train's entry; the flow, or `python -m mrpo.tracking.lineage` run
  after `dvc repro`, sees the final one), the DVC digest of every stage output (artifact
  `lineage/dvc_outputs.json`, digested in one tag), the score and data digests, the downstream scores and
  the artifacts. Each call re-records the same tags and files, so it is idempotent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mrpo.config.schema import Config
from mrpo.io import file_sha256
from mrpo.reporting.records import EVAL_RECORD, TRAIN_RECORD
from mrpo.tracking.names import (
    ACCURACY_VS_ANCHOR,
    PARAMS_DIGEST,
    key_tags,
    metric_name,
    params_digest,
    run_params,
    score_tags,
)
from mrpo.tracking.uri import redact

log = logging.getLogger("mrpo")

DVC_OUTPUTS_FILE = "lineage/dvc_outputs.json"
DVC_OUTPUTS_DIGEST = "mrpo.dvc_outputs_digest"
_GIT_CHANGED_MAX = 20  # changed paths listed in the `mrpo.git_changed` tag; the diff hash covers them all


# ---------------------------------------------------------------- git


@dataclass(frozen=True)
class GitState:
    commit: str
    dirty: bool  # tracked files differ from HEAD (staged or not), pipeline outputs aside
    diff_sha256: str | None  # of `git diff HEAD --binary` over those files; None when clean
    changed: tuple[str, ...]


def _git(root: Path, *args: str) -> bytes | None:
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True)
    except OSError:  # no git on this machine
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state(root: str | Path, ignore: Iterable[str] = ()) -> GitState | None:
    """HEAD and the uncommitted changes to tracked files, `ignore`d paths left out; None outside git.

    Untracked files and .gitignore files do not count. `ignore` is for what the pipeline itself rewrites
    (dvc.lock, git-tracked metrics and curves): a run would otherwise call its own outputs from the previous
    stage a dirty tree.
    """
    root = Path(root)
    head = _git(root, "rev-parse", "HEAD")
    if head is None:
        return None
    # .gitignore files too: DVC writes (and with core.autostage stages) one next to each output it adds
    excluded = [":(exclude,glob)**/.gitignore", *(f":(exclude){p}" for p in sorted(set(ignore)))]
    spec = ["--", ".", *excluded]
    names = _git(root, "diff", "HEAD", "--name-only", *spec) or b""
    changed = tuple(n for n in names.decode().splitlines() if n)
    diff = _git(root, "diff", "HEAD", "--binary", *spec) if changed else None
    return GitState(
        commit=head.decode().strip(),
        dirty=bool(changed),
        diff_sha256=hashlib.sha256(diff).hexdigest() if diff is not None else None,
        changed=changed,
    )


def git_commit(project_dir: str | Path) -> tuple[str | None, bool]:
    """(HEAD commit, whether tracked files changed); (None, False) outside git."""
    state = git_state(project_dir)
    return (state.commit, state.dirty) if state else (None, False)


def git_tags(state: GitState | None) -> dict[str, str]:
    if state is None:
        return {}
    tags = {
        "mlflow.source.git.commit": state.commit,
        "mrpo.git_commit": state.commit,
        "mrpo.git_dirty": str(state.dirty),
    }
    if state.dirty:
        tags["mrpo.git_diff_sha256"] = state.diff_sha256 or ""
        more = len(state.changed) - _GIT_CHANGED_MAX
        tags["mrpo.git_changed"] = ",".join(state.changed[:_GIT_CHANGED_MAX]) + (
            f",... ({more} more)" if more > 0 else ""
        )
    return tags


# ---------------------------------------------------------------- DVC


def _resolve(text: str, params: Mapping[str, Any]) -> str | None:
    """`${a.b}` in a dvc.yaml path from params.yaml; None when a name does not resolve (`${key}`)."""

    def lookup(match: re.Match) -> str:
        value: Any = params
        for part in match.group(1).strip().split("."):
            if not isinstance(value, Mapping) or part not in value:
                raise KeyError(match.group(1))
            value = value[part]
        return str(value)

    try:
        return re.sub(r"\$\{([^}]+)\}", lookup, text)
    except KeyError:
        return None


def pipeline_outputs(root: str | Path) -> list[str]:
    """`dvc.lock` and every path `dvc.yaml` declares as a stage's outs, metrics or plots (params resolved):
    what the pipeline rewrites, so not what makes a work tree dirty."""
    root = Path(root)
    out = ["dvc.lock"]
    try:
        spec = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
        params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return out
    for stage in (spec.get("stages") or {}).values():
        body = stage.get("do", stage) if isinstance(stage, Mapping) else {}
        for section in ("outs", "metrics", "plots"):
            for entry in body.get(section) or []:
                for path in entry if isinstance(entry, Mapping) else [entry]:
                    resolved = _resolve(str(path), params)
                    if resolved:
                        out.append(resolved.rstrip("/"))
    return out


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


def launch_tags() -> dict[str, str]:
    """What started this process: DVC sets DVC_STAGE for a stage's command, `dvc exp run` also DVC_EXP_*."""
    env = os.environ
    tags = {"mrpo.launcher": "mrpo"}
    if env.get("DVC_STAGE"):
        tags["mrpo.launcher"] = "dvc repro"
        tags["mrpo.dvc_stage"] = env["DVC_STAGE"]
    if env.get("DVC_EXP_BASELINE_REV") or env.get("DVC_EXP_NAME"):
        tags["mrpo.launcher"] = "dvc exp run"
        if env.get("DVC_EXP_NAME"):
            tags["mrpo.dvc_experiment"] = env["DVC_EXP_NAME"]
        if env.get("DVC_EXP_BASELINE_REV"):
            tags["mrpo.dvc_exp_baseline"] = env["DVC_EXP_BASELINE_REV"]
    return tags


# ---------------------------------------------------------------- what the run is


def reference_lineage(cfg: Config, project_dir: str | Path) -> dict[str, str]:
    """`key_tags` plus each score file's digest: DVC's md5 from dvc.lock, else the file's sha256."""
    digests = dvc_lock_stage_digests(project_dir)
    tags = key_tags(cfg)
    for ref in cfg.references:
        score_path = f"{cfg.score.output_dir}/{ref.name}.parquet"
        digest = digests.get(score_path)
        if digest is None and (Path(project_dir) / score_path).is_file():
            digest = file_sha256(Path(project_dir) / score_path)
        if digest:
            tags[f"mrpo.reference.{ref.name}.score_digest"] = digest
    return tags


def start_tags(cfg: Config, project_dir: str | Path = ".") -> dict[str, str]:
    """What is known before training: git state, launcher, the dvc.lock the run started from, key params."""
    root = Path(project_dir)
    tags = {**launch_tags(), **git_tags(git_state(root, pipeline_outputs(root))), **key_tags(cfg)}
    tags[PARAMS_DIGEST] = params_digest(run_params(cfg))
    if (root / "dvc.lock").is_file():
        tags["mrpo.dvc_lock_digest_at_start"] = file_sha256(root / "dvc.lock")
    return tags


TRAIN_SCORES = ("val_reward_accuracy_after", "test_reward_accuracy_after")


def eval_score_names(metrics: Mapping[str, Any]) -> list[str]:
    """The policy's benchmark scores and its test-split reward accuracy against the anchor."""
    return [k for k in metrics if k.startswith("policy/")] + [ACCURACY_VS_ANCHOR]


# ---------------------------------------------------------------- plots and artifacts


def record_training_outputs(cfg: Config, run, project_dir: str | Path = ".") -> None:
    """The training curves (CSV and PNG under `plots/`) and the train metrics file (under `metrics/`) on
    `run` (a mrpo.tracking.tracker.Tracker)."""
    from mrpo.reporting.plots import PNG_FILES, VALIDATION_FILE

    root = Path(project_dir)
    if (root / cfg.train.metrics_file).is_file():
        run.log_artifact(root / cfg.train.metrics_file, "metrics")
    plots_dir = root / cfg.train.plots_dir
    for path in (
        root / cfg.train.plots_file,
        plots_dir / VALIDATION_FILE,
        *(plots_dir / f for f in PNG_FILES),
    ):
        if path.is_file():  # the curves and their PNG renders, as the train stage wrote them
            run.log_artifact(path, "plots")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _flat_numbers(data: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            out.update(_flat_numbers(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, int | float) and not isinstance(data, bool) and data == data:
        out[prefix] = float(data)
    return out


def dvc_outputs(root: Path) -> dict[str, Any]:
    """The dvc.lock digest and every stage output's md5, as artifact `lineage/dvc_outputs.json` plus the
    two digest tags (one tag per output crowded the Tags panel)."""
    if not (root / "dvc.lock").is_file():
        return {}
    outputs = dvc_lock_stage_digests(root)
    return {
        "tags": {
            "mrpo.dvc_lock_digest": file_sha256(root / "dvc.lock"),
            DVC_OUTPUTS_DIGEST: params_digest(outputs),
        },
        "outputs": outputs,
    }


def lineage_tags(cfg: Config, root: Path, has_git_state: bool) -> dict[str, str]:
    """Reference set and score digests, git state (for a run from before train recorded it), the prepared
    data's digest, and the headline scores of the metrics files."""
    tags: dict[str, str] = dict(reference_lineage(cfg, root))
    if not has_git_state:
        tags.update(git_tags(git_state(root, pipeline_outputs(root))))
    try:
        from mrpo.data.prepared import prepared_digest

        tags["mrpo.prepared_digest"] = prepared_digest(root / cfg.data.output_dir)
    except (OSError, ValueError):  # mrpo.errors.DataError included: nothing prepared here
        pass
    eval_metrics = _flat_numbers(_read_json(root / cfg.evaluate.results_dir / EVAL_RECORD))
    tags.update(score_tags(_read_json(root / cfg.train.output_dir / TRAIN_RECORD), TRAIN_SCORES))
    tags.update(score_tags(eval_metrics, eval_score_names(eval_metrics)))
    return tags


def complete_lineage(
    cfg: Config, run, project_dir: str | Path = ".", extra_tags: Mapping[str, str] | None = None
) -> None:
    """Everything the pipeline's outputs tell about `run` (a mrpo.tracking.tracker.Tracker) once they exist;
    idempotent: params and metrics already on the run stay (MLflow params are immutable). Nothing for a
    NullTracker (no run recorded)."""
    if not run:
        return
    root = Path(project_dir).resolve()
    current = run.outbox.read(lambda: run.client.get_run(run.run_id).data, None)  # None: server away
    tags, metrics = (current.tags, current.metrics) if current else ({}, {})
    dvc = dvc_outputs(root)
    run.set_tags({**lineage_tags(cfg, root, "mrpo.git_commit" in tags), **dvc.get("tags", {})})
    run.set_tags(extra_tags or {})
    if dvc:
        run.log_dict({"outputs": dvc["outputs"]}, DVC_OUTPUTS_FILE)
    run.log_params(run_params(cfg))  # every params.yaml value a run from before the train stage logged them
    # downstream scores under the names evaluate logs them by, unless it already did (e.g. no run was open)
    eval_metrics = _flat_numbers(_read_json(root / cfg.evaluate.results_dir / EVAL_RECORD))
    run.log_metrics({k: v for k, v in eval_metrics.items() if metric_name(k) not in metrics})
    record_artifacts(cfg, run, root)
    log.info("lineage recorded on MLflow run %s (%s)", run.run_id, redact(run.run.tracking_uri))


def record_artifacts(cfg: Config, run, root: Path) -> None:
    """The curves, the metrics files, params.yaml / dvc.yaml / dvc.lock, the data report, lm-eval results."""
    record_training_outputs(cfg, run, root)
    if (root / cfg.evaluate.metrics_file).is_file():
        run.log_artifact(root / cfg.evaluate.metrics_file, "metrics")
    for name in ("params.yaml", "dvc.yaml", "dvc.lock"):
        if (root / name).is_file():
            run.log_artifact(root / name, "lineage")
    report = root / cfg.data.output_dir / "report.json"
    if report.is_file():
        run.log_artifact(report, "data")
    results = root / cfg.evaluate.results_dir
    if results.is_dir() and any(results.iterdir()):
        run.log_artifacts(results, "lm_eval")


def main(argv: list[str] | None = None) -> int:
    """`python -m mrpo.tracking.lineage [params.yaml]`: complete the lineage of the run the train stage
    recorded, e.g. after `dvc repro` has written the final dvc.lock."""
    import sys

    from mrpo.config.load import load_config
    from mrpo.runtime import setup_logging
    from mrpo.tracking.store import read_run_record, run_record_path
    from mrpo.tracking.tracker import Tracker

    args = sys.argv[1:] if argv is None else argv
    setup_logging()
    cfg = load_config(args[0] if args else "params.yaml")
    record = read_run_record(cfg.train.output_dir)
    if record is None:
        print(f"{run_record_path(cfg.train.output_dir)}: no MLflow run recorded; run `mrpo train` first")
        return 2
    complete_lineage(cfg, Tracker(record), ".")
    print(f"lineage recorded on MLflow run {record.run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
