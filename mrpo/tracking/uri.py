"""Tracking URIs as they are used and as they are recorded.

A URI is used as given (credentials included: MLflow needs them) but recorded (run record, params, tags,
summary, log lines) only through `redact`, which removes user info. A relative store location (`sqlite:///mlflow.db`,
`mlruns`) means the project's main workspace (`project_root`), also inside a `dvc exp run --temp` workspace,
which DVC deletes after the run; a run record names a store inside the project relative to it (`portable`),
so a copied checkout logs into its own store.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

SQLITE = "sqlite:///"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def redact(text: str) -> str:
    """`text` with the user info of every URI in it removed (`http://user:secret@host` -> `http://host`)."""
    return _USERINFO.sub(r"\g<scheme>", text) if isinstance(text, str) else text


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def project_root() -> Path:
    """The main workspace: DVC_ROOT, which DVC points at the main repository also for `dvc exp run --temp`
    (whose own workspace is deleted after the run), else the current directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def _local_path(uri: str) -> str | None:
    """The path of a local store (sqlite file or plain directory), None for a server or another scheme."""
    if uri.startswith(SQLITE):
        return uri[len(SQLITE) :]
    if uri.startswith("file:"):
        return urlsplit(uri).path or None
    if "://" in uri or ":" in uri.split("/")[0] or uri.startswith("databricks"):
        return None
    return uri


def resolve(uri: str, root: str | Path | None = None) -> str:
    """`uri` with a relative local store made absolute against `root` (default: `project_root()`)."""
    path = _local_path(uri)
    if path is None or Path(path).is_absolute():
        return uri
    absolute = (Path(root) if root else project_root()).resolve() / path
    if uri.startswith(SQLITE):
        return f"{SQLITE}{absolute}"
    if uri.startswith("file:"):
        return absolute.as_uri()
    return str(absolute)


def portable(uri: str, root: str | Path | None = None) -> str:
    """`uri` as recorded: user info removed, a local store inside `root` (default: `project_root()`) relative
    to it (`sqlite:///mlflow.db`), so a copy of the project reads its own store."""
    path = _local_path(uri)
    if path is None or not Path(path).is_absolute():
        return redact(uri)
    try:
        relative = Path(path).resolve().relative_to((Path(root) if root else project_root()).resolve())
    except ValueError:
        return uri
    if uri.startswith(SQLITE):
        return f"{SQLITE}{relative}"
    return str(relative)


def server_base(uri: str) -> str:
    """A server URI without path, query or fragment parts beyond its base path (for /health)."""
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
