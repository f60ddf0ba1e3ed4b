"""Checks a stage makes before it reads any data or loads any model:
can it write its outputs, is its device there, does its tracking store answer.

Each failure is a :class:`ConfigError` naming the params key, the value and the fix,
so a stage fails in its first second rather than after an hour of work (or with a
library traceback). Every stage entry point calls :func:`check_stage` first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mrpo.errors import ConfigError
from mrpo.pipeline import config_value
from mrpo.pipeline import stage as pipeline_stage


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(path.anchor or ".")


def _probe(directory: Path) -> str | None:
    """Why a file cannot be created in `directory`,
    or None when it can (tried for real: root ignores modes)."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".mrpo-write-test-")
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(name)
    return None


def check_writable(path: str | os.PathLike, key: str, kind: str = "dir") -> None:
    """Raise ConfigError naming `key` unless `path` (a directory, or a file when kind="file") can be written.

    Nothing is created: the nearest existing directory on the way is probed with a
    temporary file that is removed again. Outputs are replaced by renaming a sibling
    into place, so the directory holding `path` must be writable too.
    """
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    path = Path(path)
    shown = str(path)

    def fail(reason: str) -> ConfigError:
        return ConfigError(
            f"{key}: cannot write {shown!r}: {reason}; choose a writable location for {key} "
            "or fix the permissions"
        )

    if path.exists():
        if kind == "dir" and not path.is_dir():
            raise fail("it exists and is a file, not a directory")
        if kind == "file" and path.is_dir():
            raise fail("it exists and is a directory, not a file")
    existing = _nearest_existing(path if kind == "dir" else path.parent)
    if not existing.is_dir():
        raise fail(f"{str(existing)!r} is a file, not a directory")
    targets = [existing]
    if existing == path and path.parent != path:
        targets.append(path.parent)  # outputs are swapped in by renaming inside the parent
    for directory in targets:
        reason = _probe(directory)
        if reason is not None:
            raise fail(f"{str(directory)!r} is not writable ({reason})")


def check_device(name: str, key: str) -> None:
    """Raise ConfigError naming `key` when it asks for CUDA and no CUDA device is visible."""
    if name != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        raise ConfigError(
            f"{key}: got 'cuda', but this machine has no usable CUDA device "
            f"(torch.cuda.is_available() is false{hint}); set {key}: auto or cpu"
        )


def check_stage(cfg, stage: str) -> None:
    """Everything a stage can check before it starts: its outputs are writable, its device exists, the MLflow
    store it records into answers (mrpo.tracking.health: seconds, not a training run, for a dead server)."""
    from mrpo.tracking.health import check_tracking

    entry = pipeline_stage(stage)
    if entry.device is not None:
        check_device(config_value(cfg, entry.device), entry.device)
    for key, kind in entry.outputs:
        check_writable(config_value(cfg, key), key, kind)
    check_tracking(cfg, stage)
