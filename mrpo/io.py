"""File contracts every stage shares: atomic writes and digests (the lock on a stage's outputs: mrpo.locks).

A reader (DVC, the next stage, a user) sees either the previous version of an output or the
new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _temp_sibling(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; it replaces `path` when the block completes, and is removed if
    anything escapes the block, so `path` is either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """`atomic_file` for a directory: fill the yielded one;
    it is swapped in whole (see `replace_directory`)."""
    path = Path(path)
    tmp = _temp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomically(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomically(path: str | Path, text: str) -> None:
    write_bytes_atomically(path, text.encode("utf-8"))


def jsonable(value: Any) -> Any:
    """Tensors, numpy values and tuples as JSON types; NaN and infinities as null (JSON has no NaN)."""
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and numpy scalars
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomically(path: str | Path, payload: Any) -> None:
    """Pretty, key-sorted, valid JSON (non-finite numbers become null), written atomically."""
    write_text_atomically(
        path, json.dumps(jsonable(payload), indent=2, sort_keys=True, allow_nan=False) + "\n"
    )


def replace_directory(tmp: str | Path, final: str | Path) -> None:
    """Replace `final` by the finished directory `tmp` with two renames; on failure `final` is restored."""
    tmp, final = Path(tmp), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = _temp_sibling(final, "old")
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
