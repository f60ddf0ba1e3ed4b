"""Where and in what precision a stage runs (bf16 on CUDA, fp32 on CPU unless params.yaml says otherwise), and
how it logs and shows progress (a bar on a terminal, a few log lines off one)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from mrpo.errors import ConfigError

log = logging.getLogger("mrpo")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is visible; use device: auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(verbose: bool = False) -> None:
    if not sys.stderr.isatty():
        # Off a terminal (DVC, CI, Prefect) a progress bar is a line per update: keep the Hugging Face ones
        # (loading and writing weights at every checkpoint; `datasets` building lm-eval's task splits) out of
        # the logs. Read when transformers and datasets are imported.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


SHELLS = frozenset({"sh", "dash", "bash", "zsh", "fish", "ksh", "mksh"})
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _proc_parent(pid: int) -> tuple[str, int] | None:
    """(command name, parent pid) of a process from /proc, None where there is no /proc or no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
    return name, int(rest[1])


def _supervisor() -> int:
    """The process a stage must not outlive: its parent, or the parent's parent when the parent is the shell
    DVC runs each command in (`$SHELL -c 'mrpo train'`: dash does not exec it, so the shell stays)."""
    parent = os.getppid()
    info = _proc_parent(parent)
    if info and info[0] in SHELLS and info[1] > 1:
        return info[1]
    return parent


def _watch(pid: int, parent: int) -> None:
    """Send this process SIGTERM when `pid` exits or this process is re-parented."""
    pidfd = None
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(pid)
    while os.getppid() == parent:
        if pidfd is not None:
            if select.select([pidfd], [], [], 1.0)[0]:
                break
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent() -> None:
    """Under DVC (which sets DVC_STAGE for every command), end this stage when DVC ends: a killed `dvc repro`
    must not leave an orphan still writing outputs. The kernel sends SIGTERM when the parent dies
    (PR_SET_PDEATHSIG, Linux); a watcher thread covers a shell between DVC and the stage, and other systems.
    Not armed outside DVC: `nohup mrpo train &` must outlive its terminal."""
    if "DVC_STAGE" not in os.environ:
        return
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if parent == 1:  # DVC is never init: the parent died before the line above armed the kernel
        os.kill(os.getpid(), signal.SIGTERM)
        return
    threading.Thread(target=_watch, args=(_supervisor(), parent), name="die-with-parent", daemon=True).start()


def on_terminal() -> bool:
    return sys.stderr.isatty()


class LogProgress:
    """tqdm's counting interface (`update`, `set_postfix_str`, iteration, `with`) as log lines, one per
    `1 / lines` of the total and one at the end: off a terminal, a bar is one very long line."""

    def __init__(self, iterable=None, *, total: int | None = None, desc: str, unit: str, lines: int = 4):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if iterable is not None else 0)
        self.desc, self.unit, self.lines = desc, unit, max(1, lines)
        self.n, self.postfix, self.closed = 0, "", False
        self.start = time.perf_counter()
        self.next_report = self._step()

    def _step(self) -> float:
        return self.total / self.lines if self.total else float("inf")

    def _report(self) -> None:
        seconds = time.perf_counter() - self.start
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        n, total = self.n, self.total
        log.info("%s: %d/%d %s%s in %.1fs%s", self.desc, n, total, self.unit, share, seconds, postfix)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self.next_report and self.n < self.total:
            self._report()
            while self.next_report <= self.n:
                self.next_report += self._step()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._report()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()


def progress(iterable=None, *, total: int | None = None, desc: str, unit: str, tty: bool | None = None):
    """The progress of a stage's loop: a tqdm bar on a terminal; off one (DVC, CI, Prefect logs) a few log
    lines (LogProgress). Used by every stage that shows progress, so they all read alike."""
    if tty if tty is not None else on_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
    return LogProgress(iterable, total=total, desc=desc, unit=unit)


@contextmanager
def library_bars_off(*modules):
    """Off a terminal, the `tqdm` bars of these library modules (lm-eval's) disabled for the block: each
    would be one long line of carriage returns in the logs. On a terminal nothing changes."""
    if on_terminal():
        yield
        return
    saved = [(m, m.tqdm) for m in modules if hasattr(m, "tqdm")]

    def quiet(bar):
        return lambda *args, **kwargs: bar(*args, **{**kwargs, "disable": True})

    for module, bar in saved:
        module.tqdm = quiet(bar)
    try:
        yield
    finally:
        for module, bar in saved:
            module.tqdm = bar
