"""The one family of user-fixable errors.

Anything a user can fix (a params value, a data or score file, a busy output directory)
raises an :class:`MRPOError`; the CLI prints its message as one line and exits with
:data:`USER_ERROR_EXIT`, and the flows never retry that exit code. Every other failure
(a killed process, a lost connection, a bug) keeps its traceback and stays retryable.
"""

from __future__ import annotations

import errno
import os
import reprlib

USER_ERROR_EXIT = 2
QUOTE_LIMIT = 200  # characters of a value an error message quotes: a huge value must not make a huge line

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple = 3, 8, 8, 8
_repr.maxstring, _repr.maxother = QUOTE_LIMIT, QUOTE_LIMIT


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` for an error message, at most `limit` characters; built without expanding the whole
    value, so a value with a billion nested items costs no more than a small one."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MRPOError(Exception):
    """Bad input a user can fix: the CLI prints its message, without a traceback, and exits with 2."""


class ConfigError(MRPOError, ValueError):
    """A value in params.yaml is missing, malformed or out of range."""


class DataError(MRPOError, ValueError):
    """A data file cannot be read or a row in it is invalid; the message names the file and row."""


class ScoreDataError(MRPOError, ValueError):
    """A score file is missing, damaged, non-finite or does not match the prepared data."""


class TrainingError(MRPOError, RuntimeError):
    """Training cannot go on: a non-finite loss or gradient, or nothing to train on."""


class OutputLocked(MRPOError, RuntimeError):
    """Another process is writing the same stage outputs."""


class LockRefused(MRPOError, RuntimeError):
    """A lock file or lock directory is not safe to use (a symlink, another user's, writable by others)."""


class DiskFull(MRPOError, RuntimeError):
    """No space left (or the quota reached) while saving; the message names the directory and the space."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_WORDS = tuple(os.strerror(code) for code in DISK_FULL_ERRNOS) + tuple(
    f"(os error {code})" for code in DISK_FULL_ERRNOS
)


def disk_full_cause(exc: BaseException) -> BaseException | None:
    """The ENOSPC or EDQUOT in `exc`'s chain, as an OSError or in the words of a library that wraps it
    (safetensors' Rust writer raises SafetensorError "... No space left on device (os error 28)")."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        if any(words in str(exc) for words in DISK_FULL_WORDS):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
