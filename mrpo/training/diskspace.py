"""A full disk while saving a checkpoint or the policy: one line naming the directory, about how much space
the save needs and how much is free, and nothing half-written left behind (earlier checkpoints and the
previous policy are never touched by a save, so nothing older is lost)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from mrpo.errors import DiskFull, disk_full_cause


def free_bytes(path: str | Path) -> int | None:
    """Free space on the filesystem that holds `path` (or its nearest existing parent)."""
    for candidate in (Path(path), *Path(path).parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def is_disk_full(exc: BaseException, directory: str | Path, needed: int) -> bool:
    if disk_full_cause(exc) is not None:
        return True
    # torch.save reports a failed write as a RuntimeError without its errno ("unexpected pos ..."):
    # judge that one by the space left.
    free = free_bytes(directory)
    return isinstance(exc, RuntimeError) and free is not None and free < needed


def human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def tensor_bytes(model, optimizer=None) -> int:
    """About what saving `model` (and `optimizer`'s state) writes: every parameter and state tensor."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    state = getattr(optimizer, "state", None) or {}
    for per_param in state.values():
        values = per_param.values() if isinstance(per_param, dict) else ()
        total += sum(t.numel() * t.element_size() for t in values if torch.is_tensor(t))
    return total


def directory_bytes(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


@contextlib.contextmanager
def disk_full_guard(target: str | Path, needed: int, *, key: str, remove: bool = False) -> Iterator[None]:
    """Turn a full disk while writing `target` into a one-line DiskFull naming `key` (the setting that places
    it); with `remove`, the half-written `target` is deleted first (a partial checkpoint)."""
    target = Path(target)
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc, target, needed):
            raise
        if remove:
            shutil.rmtree(target, ignore_errors=True)
        what = "removed the partial save; " if remove else ""
        raise DiskFull(
            f"no space left on the disk holding {target} ({key}): the save needs about "
            f"{human_bytes(needed)}, {human_bytes(free_bytes(target))} is free; {what}earlier checkpoints "
            f"and the previous policy are kept. Free some space or set {key} to a larger disk, then run "
            "`mrpo train` again (it resumes from the last complete checkpoint)"
        ) from exc
