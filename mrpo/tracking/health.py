"""Is the tracking store usable? Checked before a stage loads any model, so an unreachable server, a
server that accepts connections and never answers, or a damaged `mlflow.db` costs a few seconds and one line
(exit 2), not a training run. `reachable` is also how the outbox (mrpo.tracking.outbox) sees the
server is back."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path

from mrpo.errors import ConfigError
from mrpo.tracking.uri import SQLITE, is_remote, redact, server_base

CHECK_TIMEOUT_S = 3.0


def unreachable(uri: str, timeout: float = CHECK_TIMEOUT_S) -> str | None:
    """Why the MLflow server at `uri` does not answer its /health page within `timeout` seconds, or None when
    it answers (any HTTP status counts: an auth wall in front of it is still a server)."""
    url = redact(server_base(uri)) + "/health"
    try:
        urllib.request.urlopen(url, timeout=timeout).close()  # noqa: S310 (an http(s) URL: is_remote)
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError | socket.timeout):
            return f"no answer within {timeout:g}s"
        return getattr(reason, "strerror", None) or str(reason)
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def reachable(uri: str, timeout: float = CHECK_TIMEOUT_S) -> bool:
    """True for a local store, or a server that answers."""
    return not is_remote(uri) or unreachable(uri, timeout) is None


def uri_key() -> str:
    """Where the tracking URI came from, as the setting to fix."""
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.tracking_uri"


def sqlite_problem(path: Path) -> str | None:
    """Why the sqlite file at `path` is not a readable database, or None (also when it does not exist yet)."""
    if not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            db.execute("select count(*) from sqlite_master").fetchone()
    except sqlite3.Error as exc:
        return str(exc)
    return None


def check_store(uri: str, key: str | None = None) -> None:
    """Raise ConfigError, one line naming the setting and the fix, unless the store at `uri` can be used."""
    key = key or uri_key()
    if is_remote(uri):
        reason = unreachable(uri)
        if reason is not None:
            raise ConfigError(
                f"{key}: the MLflow tracking server {redact(uri)} is unreachable ({reason}); start it, "
                f"point {key} at a running server, or unset MLFLOW_TRACKING_URI and tracking.tracking_uri "
                "to record into mlflow.db in the project"
            )
    elif uri.startswith(SQLITE):
        path = Path(uri[len(SQLITE) :])
        reason = sqlite_problem(path)
        if reason is not None:
            raise ConfigError(
                f"{key}: {path} is not a readable MLflow database ({reason}); move it aside "
                f"(`mv {path} {path}.broken`) to start a new store, or restore it from a backup"
            )


TRACKED_STAGES = ("train", "evaluate", "diagnose", "compare")


def check_tracking(cfg, stage: str) -> None:
    """The store `stage` records into is usable: the configured one; for evaluate, the one its run is in."""
    from mrpo.tracking.store import read_run_record, run_record_path, tracking_uri

    if stage not in TRACKED_STAGES:
        return
    if stage == "evaluate":
        try:
            record = read_run_record(cfg.train.output_dir)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if record is not None:
            check_store(record.tracking_uri, f"{run_record_path(cfg.train.output_dir)} (the run's store)")
        return
    check_store(tracking_uri(cfg))
