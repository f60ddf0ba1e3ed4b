"""The lock on a stage's outputs: two processes never write the same outputs at once.

A lock file lives inside the project that holds the output (`.dvc/tmp/mrpo-locks`, which DVC and git both
ignore), or, for an output outside any DVC project, in a per-user directory whose owner and mode are checked.
Lock files are opened without following symlinks and must be plain files with one link, so nobody who can
write to a shared directory can make a stage truncate another file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mrpo.errors import LockRefused, OutputLocked

LOCK_DIR_ENV = "MRPO_LOCK_DIR"  # a per-user lock directory of one's choosing; checked like the default one
PROJECT_LOCK_DIR = Path(".dvc") / "tmp" / "mrpo-locks"


def _project_root(output: Path) -> Path | None:
    for parent in output.parents:
        with contextlib.suppress(OSError):  # a directory this user may not enter holds no project of theirs
            if (parent / ".dvc").is_dir():
                return parent
    return None


def _user_lock_dir() -> Path:
    """The per-user lock directory, created 0700; refused unless it is a directory (not a symlink) that this
    user owns and nobody else can write to."""
    path = Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"mrpo-locks-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        owner = f"uid {st.st_uid}" if st.st_uid != os.getuid() else "you"
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory (a symlink or file)"
        raise LockRefused(
            f"lock directory {path} is {kind}, owned by {owner}, mode {stat.S_IMODE(st.st_mode):o}; "
            f"it must be your own directory that nobody else can write to: remove it, or set {LOCK_DIR_ENV}"
        )
    return path


def lock_path(output: str | Path) -> Path:
    """Where the lock of `output` lives: one file per output path, named by a hash of the absolute path."""
    output = Path(output).resolve()
    key = hashlib.sha256(str(output).encode()).hexdigest()[:24]
    root = _project_root(output)
    if root is not None and not os.environ.get(LOCK_DIR_ENV):
        directory = root / PROJECT_LOCK_DIR
        directory.mkdir(parents=True, exist_ok=True)
        if directory.is_symlink():
            raise LockRefused(f"lock directory {directory} is a symlink; remove it and re-run")
    else:
        directory = _user_lock_dir()
    return directory / f"{key}.lock"


def _open_lock(path: Path, output: Path) -> int:
    """The lock file's descriptor: never through a symlink, only a plain file with a single link."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise LockRefused(
            f"lock file {path} for {output} cannot be opened safely ({exc.strerror}; a symlink is refused): "
            "remove it and re-run"
        ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise LockRefused(
            f"lock file {path} for {output} is not a plain file with one link; remove it and re-run"
        )
    return fd


@contextlib.contextmanager
def output_lock(output: str | Path, stage: str) -> Iterator[None]:
    """Hold an exclusive lock on `output` for the `with` block; raise OutputLocked at once when another
    process holds it. The kernel drops the lock when its holder dies,
    so a killed run never leaves it stale."""
    output = Path(output)
    fd = _open_lock(lock_path(output), output)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise OutputLocked(
                f"{output} is being written by {holder}; "
                f"wait for it to finish or stop it, then re-run `mrpo {stage}`"
            ) from None
        holder = (
            f"`mrpo {stage}` (pid {os.getpid()} on {socket.gethostname()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}, command: {' '.join(sys.argv)[:300]})"
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
