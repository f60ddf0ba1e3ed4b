"""The one family of user-fixable errors.

Anything a user can fix (a params value, a data or score file, a busy output directory)
raises an :class:`MRPOError`; the CLI prints its message as one line and exits with
:data:`USER_ERROR_EXIT`, and the flows never retry that exit code. Every other failure
(a killed process, a lost connection, a bug) keeps its traceback and stays retryable.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2


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


class DiskFull(MRPOError, RuntimeError):
    """No space left (or the quota reached) while saving; the message names the directory and the space."""
