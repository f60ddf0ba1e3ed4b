"""A stage's outputs swapped in together: all of the new set, or all of the previous one.

A stage writes every output (directories and files) beside its final path first (`.<name>.tmp-<pid>`). On
`commit` the list of swaps is written to a journal (`.<first output>.commit-<pid>.json`) before the first
rename; each final path is then moved aside (`.<name>.old-<pid>`) and its new version moved in. The previous
versions are kept until the block ends: whatever the stage does after the commit (the MLflow record, the
upload) can still fail, and then every output is put back as it was. Deleting the journal is the point after
which the new set stands. A process killed at any point leaves a journal or temporaries that the next run of
the stage (`recover`) rolls back, so the outputs are the complete previous set again.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from mrpo.errors import ConfigError, MRPOError
from mrpo.io import _pid_alive, _temp_sibling, recover_leftovers, remove_path


@dataclass(frozen=True)
class _Swap:
    final: str
    staged: str
    backup: str
    had_old: bool


def _exists(path: str | Path) -> bool:
    return os.path.lexists(path)


def _fsync(path: Path) -> None:
    """Flush a file, or every file and directory of a tree, to the disk."""
    paths = [path] if not path.is_dir() else [path, *path.rglob("*")]
    for p in paths:
        if p.is_symlink():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _undo(swap: _Swap) -> None:
    """Put the previous version of one output back; safe to repeat after an interruption."""
    final, staged, backup = Path(swap.final), Path(swap.staged), Path(swap.backup)
    if _exists(staged):  # never moved in
        if not _exists(final) and _exists(backup):
            os.replace(backup, final)
        remove_path(staged)
        return
    trash = _temp_sibling(final, "trash")
    if _exists(backup):
        if _exists(final):
            os.replace(final, trash)
        os.replace(backup, final)
    elif not swap.had_old and _exists(final):
        os.replace(final, trash)
    remove_path(trash)


def _roll_back(journal: Path) -> None:
    try:
        swaps = [_Swap(**s) for s in json.loads(journal.read_text())["swaps"]]
    except (ValueError, KeyError, TypeError):  # killed while writing it: no output had moved yet
        journal.unlink(missing_ok=True)
        return
    for swap in reversed(swaps):
        _undo(swap)
    journal.unlink(missing_ok=True)


def _journals(final: Path) -> list[Path]:
    """Commit journals beside `final` whose process has ended (or had this process's pid before it)."""
    if not final.parent.is_dir():
        return []
    found = []
    for entry in final.parent.glob(f".{glob.escape(final.name)}.commit-*.json"):
        pid = entry.name.removesuffix(".json").rpartition("-")[2]
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            found.append(entry)
    return found


def recover(finals) -> None:
    """Before a stage writes: roll back a commit a killed run left half done, then restore or delete the
    leftovers of interrupted swaps of these outputs."""
    finals = [Path(f) for f in finals]
    for final in finals:
        for journal in _journals(final):
            _roll_back(journal)
    for final in finals:
        recover_leftovers(final, own=True)


class StagedOutputs:
    """`with StagedOutputs() as staged:` write each output at `staged.directory(final)` or
    `staged.file(final)`, then `staged.commit()` (or let the block end); anything raised in the block, before
    or after the commit, puts every previous output back."""

    def __init__(self) -> None:
        self._swaps: list[_Swap] = []
        self._journal: Path | None = None
        self._scratch: list[Path] = []

    def _add(self, final: str | Path) -> Path:
        final = Path(final)
        if any(Path(s.final) == final.absolute() for s in self._swaps):
            raise ValueError(f"{final} is staged twice")
        staged = _temp_sibling(final)
        remove_path(staged)
        final.parent.mkdir(parents=True, exist_ok=True)
        backup = _temp_sibling(final, "old")
        self._swaps.append(
            _Swap(str(final.absolute()), str(staged.absolute()), str(backup.absolute()), False)
        )
        return staged

    def directory(self, final: str | Path) -> Path:
        """An empty directory to fill: the new version of the directory `final`."""
        staged = self._add(final)
        staged.mkdir()
        return staged

    def file(self, final: str | Path) -> Path:
        """Where to write the new version of the file `final`."""
        return self._add(final)

    def scratch(self, near: str | Path) -> Path:
        """A working directory beside `near` (`.<name>.scratch-<pid>`), removed when the block ends."""
        path = _temp_sibling(Path(near), "scratch")
        remove_path(path)
        path.mkdir(parents=True)
        self._scratch.append(path)
        return path

    def adopt(self, written: str | Path, final: str | Path) -> None:
        """Stage the finished file `written` as the new version of `final`."""
        shutil.move(str(written), self._add(final))

    def commit(self) -> None:
        """Swap every staged output in, the previous versions kept aside until the block ends."""
        if self._journal is not None:
            return
        missing = [s.staged for s in self._swaps if not _exists(s.staged)]
        if missing:
            raise FileNotFoundError(f"staged output {missing[0]} was not written")
        for s in self._swaps:
            if _exists(s.final) and Path(s.final).is_dir() != Path(s.staged).is_dir():
                kinds = ("a directory", "a file") if Path(s.final).is_dir() else ("a file", "a directory")
                raise MRPOError(f"{s.final} is {kinds[0]}, but the new output is {kinds[1]}; move it away")
            _fsync(Path(s.staged))
        self._swaps = [_Swap(s.final, s.staged, s.backup, _exists(s.final)) for s in self._swaps]
        first = Path(self._swaps[0].final)
        journal = first.with_name(f".{first.name}.commit-{os.getpid()}.json")
        journal.write_text(json.dumps({"swaps": [asdict(s) for s in self._swaps]}, indent=1))
        _fsync(journal)
        self._journal = journal
        for s in self._swaps:
            if s.had_old:
                os.replace(s.final, s.backup)
            os.replace(s.staged, s.final)
        for parent in {Path(s.final).parent for s in self._swaps}:
            _fsync(parent)

    def _finish(self) -> None:
        """The new set stands: forget the journal, then delete the previous versions."""
        if self._journal is not None:
            self._journal.unlink()
            _fsync(self._journal.parent)
        for s in self._swaps:
            remove_path(s.backup)

    def rollback(self) -> None:
        if self._journal is not None:
            _roll_back(self._journal)
        for s in self._swaps:
            remove_path(s.staged)

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self.rollback()
                return
            try:
                self.commit()
            except BaseException:
                self.rollback()
                raise
            self._finish()
        finally:
            for path in self._scratch:
                remove_path(path)


def refuse_directories(files: dict[Path, str]) -> None:
    """ConfigError naming the key when a path a stage writes a file to is a directory (checked before any
    work: the swap would otherwise fail, or delete the directory, at the end)."""
    for path, key in files.items():
        if path.is_dir():
            raise ConfigError(
                f"{key}: {str(path)!r} is a directory, but a file is written there; "
                f"move it away or choose another {key}"
            )
