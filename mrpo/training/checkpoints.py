"""Which checkpoint a train run resumes from, and how a checkpoint is known to be complete.

`models/checkpoints/mrpo_run.json` records the configuration fingerprint, the MLflow run and
whether that run finished. Each checkpoint is sealed last with `mrpo_checkpoint.json`, the
name, size and sha256 of every file in it, written after every file is fsynced. A checkpoint
without a matching seal (a crash or a full disk mid-save, a file deleted or changed since, a pickle
that `torch.load(weights_only=True)` refuses) is never resumed: the run falls back to the previous one.

A re-run of a configuration whose run already finished starts from scratch as a new MLflow
run: resuming the final checkpoint would train nothing and append to a finished record.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mrpo.io import file_sha256, write_json_atomically

log = logging.getLogger("mrpo")

RUN_STATE_FILE = "mrpo_run.json"
SEAL_FILE = "mrpo_checkpoint.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# The pickles Trainer loads on resume, each with `weights_only=True` (training_args.bin it never loads).
_TRAINER_PICKLE = re.compile(r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sealed_files(checkpoint: Path) -> list[Path]:
    return [
        p
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != SEAL_FILE and not p.name.startswith(".")
    ]


def seal_checkpoint(checkpoint: str | Path) -> None:
    """Record every file of a finished checkpoint with its size and sha256; written last, atomically.

    Every file and directory is fsynced before the seal is written: otherwise a power loss could leave a
    durable seal beside file contents still in the page cache (right sizes, zeroed blocks)."""
    checkpoint = Path(checkpoint)
    files = {}
    for path in _sealed_files(checkpoint):
        _fsync(path)
        files[path.relative_to(checkpoint).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": file_sha256(path),
        }
    for directory in sorted({p.parent for p in checkpoint.rglob("*")} | {checkpoint}, reverse=True):
        _fsync(directory)
    write_json_atomically(checkpoint / SEAL_FILE, {"files": files})
    _fsync(checkpoint)


def _load_safely(path: Path) -> None:
    import torch
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():  # the numpy types Trainer allows in rng_state.pth
        try:  # mapped, not read: an optimizer state can be as large as the model twice
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # torch's legacy format


def _unsafe_pickle(path: Path) -> str | None:
    """Why Trainer's own `torch.load(weights_only=True)` of this file would fail, or None."""
    try:
        _load_safely(path)
    except Exception as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        refused = re.search(r"WeightsUnpickler error:\s*(.*?)(?: Please use|\n|$)", text)
        if refused:
            why = refused.group(1).strip() or "unsupported content"
            return f"{path.name} holds a pickle that torch.load(weights_only=True) refuses ({why})"
        first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
        return f"{path.name} is unreadable ({first})"
    return None


def _file_problem(checkpoint: Path, name: str, recorded) -> str | None:
    path = checkpoint / name
    if not path.is_file():
        return f"{name} is missing"
    if not isinstance(recorded, dict):
        return f"its seal records only the size of {name} (an older mrpo wrote it), not its content hash"
    size = path.stat().st_size
    if size != recorded.get("size"):
        return f"{name} has {size} bytes, not the {recorded.get('size')} it was saved with"
    if file_sha256(path) != recorded.get("sha256"):
        return f"{name} does not match the sha256 it was saved with (its content changed since)"
    if path.parent == checkpoint and _TRAINER_PICKLE.match(path.name):
        return _unsafe_pickle(path)
    return None


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why `checkpoint` cannot be resumed, or None when every file matches its seal (size, then sha256) and
    the pickles Trainer loads pass `torch.load(weights_only=True)`."""
    checkpoint = Path(checkpoint)
    seal = checkpoint / SEAL_FILE
    try:
        files = json.loads(seal.read_text())["files"]
        items = list(files.items())
    except FileNotFoundError:
        return "it was never finished (no seal: the save was interrupted, or an older mrpo wrote it)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its seal {SEAL_FILE} is unreadable ({exc})"
    for name, _ in items:  # the cheap checks of every file before hashing any
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    for name, recorded in items:
        problem = _file_problem(checkpoint, name, recorded)
        if problem is not None:
            return problem
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
                "train: checkpoint %s is incomplete or damaged: %s; "
                "removing it and falling back to an earlier one",
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
