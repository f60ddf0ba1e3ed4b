"""Interrupts: SIGTERM ends a command as Ctrl-C does, and neither lands in the middle of a tracking write."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_deferring = 0  # depth of deferred_interrupts blocks on the main thread
_pending = False  # an interrupt arrived inside one and is raised when the outermost ends


def _interrupt(signum, frame):
    global _pending
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, lambda *_: None)
    if _deferring:
        _pending = True
        return
    raise KeyboardInterrupt


@contextmanager
def interrupt_on_sigterm():
    """For the block, SIGTERM (`kill`, a scheduler, a dying parent) ends a command the way Ctrl-C does:
    KeyboardInterrupt, so the stage keeps its finished work, marks its MLflow run KILLED and exits with the
    interrupted line. Later SIGTERMs are ignored while that cleanup runs; SIGKILL still ends it at once. Both
    wait for the end of a `deferred_interrupts` block. Signal handlers belong to the main thread: elsewhere
    the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


@contextmanager
def deferred_interrupts():
    """An interrupt (under `interrupt_on_sigterm`) arriving in the block is raised when the block ends.
    For writes to the MLflow store: one cut half-way leaves its sqlite transaction open, and the database
    stays locked for the write that marks the run KILLED."""
    global _deferring, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            _pending = False
            raise KeyboardInterrupt
