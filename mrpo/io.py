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
import re
import shutil
import sys
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
    recover_leftovers(path)
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
    """Replace `final` by the finished directory `tmp`. Where the file system can, the two are exchanged in
    one atomic rename, so `final` always exists; elsewhere with two renames, and a kill between them leaves
    `.<name>.old-<pid>`, which `recover_leftovers` (called by the next swap) restores."""
    tmp, final = Path(tmp), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir() and not final.is_symlink() and _exchange(tmp, final):
        remove_path(tmp)  # now the previous version
        return
    old = _temp_sibling(final, "old")
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old.exists():
            os.replace(old, final)
        raise
    remove_path(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def remove_path(path: str | Path) -> None:
    """Delete a file, link or directory tree; nothing when it is not there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|trash|scratch)-(?P<pid>\d+)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_leftovers(final: str | Path, *, own: bool = False) -> list[tuple[str, Path]]:
    """(kind, path) of the temporary siblings of `final` (`.<name>.tmp-<pid>`, `.old-`, `.trash-`,
    `.scratch-`) that a process which has ended left behind; with `own`, this process's too (a previous
    holder of its pid)."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    found = []
    for entry in final.parent.iterdir():
        m = _LEFTOVER.fullmatch(entry.name)
        if m is None or m["name"] != final.name:
            continue
        pid = int(m["pid"])
        if (own and pid == os.getpid()) or (pid != os.getpid() and not _pid_alive(pid)):
            found.append((m["kind"], entry))
    return sorted(found, key=lambda kind_path: kind_path[0] != "old")


def recover_leftovers(final: str | Path, *, own: bool = False) -> None:
    """Undo what an interrupted swap of `final` left: the previous version (`.old-`) goes back when `final`
    is missing, every other leftover is deleted."""
    final = Path(final)
    for kind, path in stale_leftovers(final, own=own):
        if kind == "old" and not (final.exists() or final.is_symlink()):
            os.replace(path, final)
        else:
            remove_path(path)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
