"""Which checkpoint a train run resumes from, and how a checkpoint is known to be complete.

`models/checkpoints/mrpo_run.json` records the configuration fingerprint, the MLflow run and
whether that run finished. Each checkpoint is sealed last with `mrpo_checkpoint.json`, the
names and sizes of every file in it; a checkpoint without a matching seal (a crash or a full
disk mid-save, a file deleted since) is incomplete and never resumed.

A re-run of a configuration whose run already finished starts from scratch as a new MLflow
run: resuming the final checkpoint would train nothing and append to a finished record.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mrpo.io import write_json_atomically

log = logging.getLogger("mrpo")

RUN_STATE_FILE = "mrpo_run.json"
SEAL_FILE = "mrpo_checkpoint.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def seal_checkpoint(checkpoint: str | Path) -> None:
    """Record every file of a finished checkpoint with its size; written last, atomically."""
    checkpoint = Path(checkpoint)
    files = {
        p.relative_to(checkpoint).as_posix(): p.stat().st_size
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != SEAL_FILE and not p.name.startswith(".")
    }
    write_json_atomically(checkpoint / SEAL_FILE, {"files": files})


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why `checkpoint` cannot be resumed, or None when its seal matches what is on disk."""
    seal = Path(checkpoint) / SEAL_FILE
    try:
        files = json.loads(seal.read_text())["files"]
    except FileNotFoundError:
        return "it was never finished (no seal: the save was interrupted, or an older mrpo wrote it)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its seal {SEAL_FILE} is unreadable ({exc})"
    for name, size in files.items():
        path = Path(checkpoint) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not the {size} it was saved with"
    return None


def checkpoints_by_step(checkpoint_dir: str | Path) -> list[Path]:
    """`checkpoint-<step>` directories, newest first."""
    found = [
        (int(m.group(1)), p)
        for p in Path(checkpoint_dir).glob("checkpoint-*")
        if p.is_dir() and (m := _CHECKPOINT_NAME.match(p.name))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def latest_complete_checkpoint(checkpoint_dir: str | Path, clean: bool = True) -> Path | None:
    """The newest complete checkpoint; with `clean`, newer incomplete ones are removed with a warning (Trainer
    would otherwise save into them again and mix old and new files)."""
    for checkpoint in checkpoints_by_step(checkpoint_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        if clean:
            log.warning(
                "train: checkpoint %s is incomplete: %s; removing it and falling back to an earlier one",
                checkpoint,
                problem,
            )
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


@dataclass(frozen=True)
class RunState:
    fingerprint: str
    mlflow_run_id: str | None = None
    completed: bool = False


def read_run_state(checkpoint_dir: str | Path) -> RunState | None:
    path = Path(checkpoint_dir) / RUN_STATE_FILE
    try:
        raw = json.loads(path.read_text())
        return RunState(raw["fingerprint"], raw.get("mlflow_run_id"), bool(raw.get("completed", False)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("train: %s is unreadable (%s); not resuming", path, exc)
        return None


def write_run_state(checkpoint_dir: str | Path, state: RunState) -> None:
    write_json_atomically(Path(checkpoint_dir) / RUN_STATE_FILE, state.__dict__)


def _discard_checkpoints(checkpoint_dir: Path, clean: bool) -> None:
    for checkpoint in checkpoints_by_step(checkpoint_dir) if clean else ():
        shutil.rmtree(checkpoint, ignore_errors=True)


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: Path | None = None
    mlflow_run_id: str | None = None


def resume_point(checkpoint_dir: str | Path, fingerprint: str, clean: bool = True) -> ResumePoint:
    """Where a train run with this configuration fingerprint starts.

    Resumes only an unfinished run of the same configuration, from its newest complete
    checkpoint. Anything else (another configuration, a finished run) starts over, after
    removing the old checkpoints (with `clean`: the ranks of one job agree without each deleting) so they
    cannot be mixed in later.
    """
    checkpoint_dir = Path(checkpoint_dir)
    state = read_run_state(checkpoint_dir)
    if state is None:
        if checkpoints_by_step(checkpoint_dir):
            log.warning("train: checkpoints in %s have no %s; starting over", checkpoint_dir, RUN_STATE_FILE)
            _discard_checkpoints(checkpoint_dir, clean)
        return ResumePoint()
    if state.fingerprint != fingerprint:
        if checkpoints_by_step(checkpoint_dir):
            log.warning(
                "train: the checkpoints in %s are from a different configuration; starting over",
                checkpoint_dir,
            )
        _discard_checkpoints(checkpoint_dir, clean)
        return ResumePoint()
    if state.completed:
        log.info(
            "train: this configuration already finished (MLflow run %s); training again from scratch "
            "as a new run",
            state.mlflow_run_id,
        )
        _discard_checkpoints(checkpoint_dir, clean)
        return ResumePoint()
    checkpoint = latest_complete_checkpoint(checkpoint_dir, clean)
    # Without a checkpoint the run starts at step 1 again:
    # a new MLflow run, not a second curve in the old one.
    return ResumePoint(checkpoint, state.mlflow_run_id if checkpoint else None)
