"""What a run records while its tracking server is unreachable: kept on disk, replayed when it returns.

Against a server (http/https) a Tracker sends its per-step metrics from a background thread, so a slow or dead
server never holds training up, and every other record through `Outbox.call`: a call that fails while the
server does not answer its /health page switches the outbox offline. Offline, every record is appended to
`logs/mlflow-outbox/<run_id>/records.jsonl` (artifacts copied beside it) at once, without touching the
network; one warning names the file; a prober thread replays the file into the run once the server answers.
A run that ends during an outage keeps its records (and its end) in the file: the next Tracker of that run
(`mrpo evaluate`, a resumed `mrpo train`) or `python -m mrpo.tracking.outbox` replays them. A replayed run
carries the tag `mrpo.tracking_outage` saying what happened. Local stores (sqlite, files) have no outage:
their records are written directly, as before.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mrpo.tracking.health import reachable
from mrpo.tracking.uri import is_remote, project_root, redact

log = logging.getLogger("mrpo")

OUTAGE_TAG = "mrpo.tracking_outage"
PROBE_S = 5.0  # how often an offline outbox asks the server whether it is back
FLUSH_S = 60.0  # how long the end of a run waits for the background sender


def outbox_dir(run_id: str, root: Path | None = None) -> Path:
    return (root or project_root()) / "logs" / "mlflow-outbox" / run_id


class Outbox:
    """Sends `(op, args)` records of one run through `execute`, or keeps them while the server is away."""

    def __init__(self, run_id: str, uri: str, execute: Callable[[str, dict], Any]):
        self.run_id, self.uri, self.execute = run_id, uri, execute
        self.remote = is_remote(uri)
        self.dir = outbox_dir(run_id)
        self.file = self.dir / "records.jsonl"
        self.offline = False
        self.kept = 0  # records written to the file during this process
        self._lock = threading.RLock()
        self._queue: queue.Queue = queue.Queue()
        self._threads: dict[str, threading.Thread] = {}
        if self.remote and self.file.is_file() and reachable(uri):
            self.replay()

    # ------------------------------------------------------------ sending

    def submit(self, op: str, args: dict) -> None:
        """Send in the background (remote stores; local ones at once): never waits for the server."""
        if not self.remote:
            self.execute(op, args)
            return
        if "sender" not in self._threads:
            atexit.register(self.flush)  # a reopened run has no end() to wait for its last metrics
        self._start("sender", self._send_queued)
        self._queue.put((op, args))

    def call(self, op: str, args: dict) -> Any:
        """Send now; during an outage keep it instead (returns None). Other errors propagate."""
        with self._lock:
            if self.offline:
                self._keep(op, args)
                return None
        try:
            return self.execute(op, args)
        except Exception as exc:
            if not self.is_outage(exc):
                raise
            self._keep(op, args)
            return None

    def read(self, fn: Callable[[], Any], default: Any) -> Any:
        """`fn()`, or `default` while the server is away."""
        if self.offline:
            return default
        try:
            return fn()
        except Exception as exc:
            if not self.is_outage(exc):
                raise
            return default

    def is_outage(self, exc: BaseException) -> bool:
        """Whether `exc` came from an unreachable server; if so the outbox goes offline (with one warning)."""
        if not self.remote or reachable(self.uri):
            return False
        with self._lock:
            if not self.offline:
                self.offline = True
                log.warning(
                    "mlflow: tracking server %s unreachable (%s); training goes on, records of run %s are "
                    "kept in %s and replayed when it returns",
                    redact(self.uri),
                    redact(str(exc)).splitlines()[0][:200],
                    self.run_id,
                    self.file,
                )
                self._start("prober", self._probe)
        return True

    def _send_queued(self) -> None:
        while True:
            op, args = self._queue.get()
            try:
                self.call(op, args)
            except Exception as exc:  # a record MLflow refuses must not stop the sender
                log.warning("mlflow: %s on run %s failed: %s", op, self.run_id, redact(str(exc))[:300])
            finally:
                self._queue.task_done()

    def _start(self, name: str, target: Callable[[], None]) -> None:
        thread = self._threads.get(name)
        if thread is None or not thread.is_alive():
            self._threads[name] = threading.Thread(target=target, name=f"mrpo-mlflow-{name}", daemon=True)
            self._threads[name].start()

    # ------------------------------------------------------------ keeping and replaying

    def _keep(self, op: str, args: dict) -> None:
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            if "local_path" in args:  # the file may be temporary: keep a copy
                source = Path(args["local_path"])
                target = self.dir / "artifacts" / f"{self.kept:06d}-{source.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
                args = {**args, "local_path": str(target)}
            with self.file.open("a") as f:
                f.write(json.dumps({"op": op, "args": args, "uri": redact(self.uri)}) + "\n")
            self.kept += 1

    def _probe(self) -> None:
        while self.offline:
            time.sleep(PROBE_S)
            if reachable(self.uri, timeout=2.0):
                self.replay()

    def replay(self) -> bool:
        """Send the kept records in order (a kept end last); True when none is left (the outbox goes)."""
        with self._lock:
            if not self.file.is_file():
                self.offline = False
                return True
            records = [json.loads(line) for line in self.file.read_text().splitlines() if line.strip()]
            ends = [r for r in records if r["op"] == "set_terminated"]
            pending = [r for r in records if r["op"] != "set_terminated"]
            note = {"tags": {OUTAGE_TAG: _note(len(pending), bool(ends))}}
            pending += [{"op": "set_tags", "args": note}, *ends[-1:]]
            sent = 0
            try:
                for record in pending:
                    self.execute(record["op"], record["args"])
                    sent += 1
            except Exception as exc:
                left = "".join(json.dumps(r) + "\n" for r in pending[sent:] if r["args"] is not note)
                self.file.write_text(left)
                log.warning(
                    "mlflow: replaying %s into run %s stopped (%s); the rest is kept",
                    self.file,
                    self.run_id,
                    redact(str(exc)).splitlines()[0][:200],
                )
                return False
            shutil.rmtree(self.dir, ignore_errors=True)
            self.offline = False
        log.warning("mlflow: tracking server back: %d kept records replayed into run %s", sent, self.run_id)
        return True

    # ------------------------------------------------------------ the end of the run

    def flush(self, timeout: float = FLUSH_S) -> None:
        """Wait (at most `timeout` seconds) for the background sender to send or keep what it was given."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)

    def end(self, status: str) -> None:
        """End the run with `status`; during an outage the end is kept with the rest, a warning says where."""
        self.flush()
        if self.offline and reachable(self.uri, timeout=2.0):
            self.replay()
        if self.offline or self._queue.unfinished_tasks:
            self._keep("set_terminated", {"status": status})
            log.warning(
                "mlflow: tracking server %s still unreachable: run %s (%s) is kept in %s; the next `mrpo "
                "evaluate` or resumed `mrpo train` of it, or `python -m mrpo.tracking.outbox`, replays it",
                redact(self.uri),
                self.run_id,
                status,
                self.file,
            )
            return
        self.call("set_terminated", {"status": status})


def _note(records: int, ended: bool) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    end = "; the run ended during the outage" if ended else ""
    return f"{records} records kept during a tracking server outage, replayed at {when}{end}"


def replay_all(root: Path | None = None) -> int:
    """Replay every kept outbox under `root` (default: the project) whose server answers; the number left."""
    import os

    from mrpo.tracking.store import client_for

    left = 0
    for file in sorted((root or project_root()).glob("logs/mlflow-outbox/*/records.jsonl")):
        first = json.loads(file.read_text().splitlines()[0])
        env = os.environ.get("MLFLOW_TRACKING_URI", "")
        uri = env if redact(env) == first["uri"] else first["uri"]  # credentials come from the environment
        from mrpo.tracking.tracker import execute_on

        outbox = Outbox(file.parent.name, uri, execute_on(client_for(uri), file.parent.name))
        left += outbox.file.is_file()
    return left


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(1 if replay_all() else 0)
