"""The prepared-data contract every stage downstream of `prepare` relies on.

``<output_dir>/{train,val,test}.parquet`` with string columns ``pair_id``, ``prompt``, ``chosen``,
``rejected``, ``prompt_messages`` (a JSON list of role/content messages before the response), plus
``report.json``. :func:`prepared_digest` is THE digest of the prepared data. Kept apart from the
prepare stage so that reading prepared data does not make a stage depend on how it was made.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mrpo.errors import DataError

SPLITS = ("train", "val", "test")
COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "prompt_messages")
SCHEMA = pa.schema([(name, pa.string()) for name in COLUMNS])


def table_digest(tables: dict[str, pa.Table]) -> str:
    """SHA-256 over the split names and every cell, in order: independent of parquet encoding details."""
    h = hashlib.sha256()
    for split in SPLITS:
        table = tables[split]
        h.update(f"{split}\0{table.num_rows}\0".encode())
        for row in table.select(list(COLUMNS)).to_pylist():
            h.update(json.dumps([row[c] for c in COLUMNS], ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
    return h.hexdigest()


def split_path(output_dir: str | Path, split: str) -> Path:
    """Where the prepare stage writes `split` (one of SPLITS)."""
    return Path(output_dir) / f"{split}.parquet"


def existing_split(output_dir: str | Path, split: str) -> Path:
    """`split_path`, refused with the fix when the prepare stage has not written it."""
    path = split_path(output_dir, split)
    if not path.is_file():
        raise DataError(f"{path}: prepared data not found; run `mrpo prepare` first")
    return path


def read_split(output_dir: str | Path, split: str):
    """One prepared split as a pandas DataFrame (the output contract's columns)."""
    import pandas as pd

    return pd.read_parquet(existing_split(output_dir, split))


def prepared_digest(output_dir: str | Path) -> str:
    """THE digest of the prepared data in `output_dir` (hex): scoring records it, training compares it."""
    return table_digest({split: pq.read_table(existing_split(output_dir, split)) for split in SPLITS})
