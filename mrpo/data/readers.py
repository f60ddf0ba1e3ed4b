"""Reading preference rows from where they live: local JSON, JSONL, parquet or CSV files (each optionally
gzipped) and Hugging Face datasets. Each reader yields plain dicts and refuses, naming the file, what it
cannot read; what a row means is mrpo.data's business.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mrpo.errors import DataError

FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


def _open_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    if not path.name.endswith(".gz"):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; zlib.error: damaged data
        raise DataError(
            f"{path}: cannot read file: damaged, truncated or not gzip data ({exc}); "
            "re-create or re-download it, "
            "or drop the .gz suffix if it is not compressed"
        ) from exc


def _file_kind(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for suffix in FILE_SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    raise DataError(
        f"{path}: unsupported file type; use .json, .jsonl, .parquet or .csv, optionally gzipped (.gz)"
    )


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc


def _parse_jsonl(path: Path, text: str) -> Iterator[dict]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path} line {number}: not valid JSON ({exc.msg}); fix or remove the line"
            ) from exc
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        yield record


def _parse_json(path: Path, text: str) -> Iterator[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved as .json (common on the Hugging Face hub)
            yield from _parse_jsonl(path, text)
            return
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(data, list):
        for i, record in enumerate(data, start=1):
            if not isinstance(record, dict):
                raise DataError(f"{path} item {i}: expected a JSON object, got {type(record).__name__}")
            yield record
    elif isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        # Column-oriented: {"prompt": [...], "chosen": [...], ...}
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise DataError(f"{path}: column lists have different lengths {sorted(lengths)}")
        for values in zip(*data.values(), strict=True):
            yield dict(zip(data.keys(), values, strict=True))
    else:
        raise DataError(f"{path}: expected a JSON list of objects or an object of column lists")


def _parse_parquet(path: Path, raw: bytes) -> Iterator[dict]:
    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    for batch in table.to_batches():
        yield from batch.to_pylist()


def _parse_csv(path: Path, text: str) -> Iterator[dict]:
    # The csv module keeps every value as the exact string (no NaN, no number parsing).
    try:
        yield from csv.DictReader(io.StringIO(text, newline=""))
    except csv.Error as exc:
        raise DataError(f"{path}: not readable as CSV ({exc})") from exc


def read_file_rows(path: str | Path) -> Iterator[dict]:
    """Rows of one local JSON / JSONL / parquet / CSV file, optionally gzipped, as dicts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: file not found (check data.paths; relative paths start at the project root)"
        )
    kind = _file_kind(path)
    raw = _open_bytes(path)
    if kind == "parquet":
        return _parse_parquet(path, raw)
    text = _decode(path, raw)
    return {"json": _parse_json, "jsonl": _parse_jsonl, "csv": _parse_csv}[kind](path, text)


def read_hub_rows(dataset_id: str, split: str) -> Iterator[dict]:
    """Rows of a Hugging Face dataset split (hub id or anything `datasets.load_dataset` accepts)."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # datasets raises many types; all mean "cannot read this source"
        first = (str(exc).strip().splitlines() or [""])[0]
        hint = ""
        if isinstance(exc, OSError):  # ConnectionError included: offline mode, no network, unknown id
            hint = (
                "; it could not be downloaded from the Hugging Face Hub and is not in the local cache "
                "(offline or no network?): download it once while online, or save it to a file and use "
                "data.source: file with data.paths: [that file]"
            )
        raise DataError(
            f"data.paths: dataset {dataset_id!r} split {split!r}: "
            f"cannot load ({type(exc).__name__}: {first}){hint}"
        ) from exc
    return iter(ds)
