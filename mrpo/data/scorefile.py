"""The score-file contract: what `mrpo score` writes and `train` and `evaluate` read.

`<score.output_dir>/<reference>.parquet` holds one row per prepared pair (SCHEMA) and, under the
b"mrpo" schema metadata, how it was made: the reference, its model fingerprint, tokenizer, precision,
max_length and the digest of the prepared data it scored; only what decides the content, so scoring the same
pairs again writes the same bytes (timings go to `score_metrics_path`). Rows flagged fits=False were not
scored (NaN log-probs); every other row holds finite log-probs <= 0. Each row also carries a digest of its
contract values (ROW_DIGEST), checked on every read: a file edited by hand is refused, not trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mrpo.errors import ScoreDataError
from mrpo.io import file_sha256

METADATA_KEY = b"mrpo"
SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("split", pa.string()),
        ("chosen_logp", pa.float64()),
        ("rejected_logp", pa.float64()),
        ("chosen_tokens", pa.int64()),
        ("rejected_tokens", pa.int64()),
        ("fits", pa.bool_()),
    ]
)


# Each row's sha256 (first 16 hex digits) over its contract values; the metadata names the column when the
# file has one. Rows flagged fits=False are never trained on, so only the others are checked.
ROW_DIGEST = "row_sha256"


def row_digests(table: pa.Table) -> list[str]:
    """The digest of each row of `table` over the SCHEMA columns (values as Python reprs: NaN is stable)."""
    columns = [table.column(name).to_pylist() for name in SCHEMA.names]
    rows = zip(*columns, strict=True)
    return [hashlib.sha256("\0".join(map(repr, row)).encode()).hexdigest()[:16] for row in rows]


def with_row_digests(table: pa.Table) -> pa.Table:
    """`table`'s SCHEMA columns with the ROW_DIGEST column appended (what score files and shards store)."""
    table = table.select(SCHEMA.names).cast(SCHEMA)
    return table.append_column(ROW_DIGEST, pa.array(row_digests(table), pa.string()))


def edited_rows(table: pa.Table) -> list[int]:
    """The rows (that fit) whose ROW_DIGEST does not match their values; every row when the column is gone."""
    if ROW_DIGEST not in table.column_names:
        return list(range(table.num_rows))
    recorded = table.column(ROW_DIGEST).to_pylist()
    content = table.select(SCHEMA.names).cast(SCHEMA)
    fits = content.column("fits").to_pylist()
    actual = row_digests(content)
    return [
        i for i, (r, a, f) in enumerate(zip(recorded, actual, fits, strict=True)) if r != a and f is not False
    ]


def score_path(score_dir: str | Path, reference: str) -> Path:
    return Path(score_dir) / f"{reference}.parquet"


def score_metrics_path(metrics_dir: str | Path, reference: str) -> Path:
    """The timings of the run that wrote `reference`'s score file (seconds, pairs/s, tokens/s): no DVC output,
    apart from the score file so that re-scoring the same content leaves the file byte-identical."""
    return Path(metrics_dir) / f"{reference}.json"


def read_scores(path: str | Path, reference: str | None = None) -> tuple[pd.DataFrame, dict]:
    """A score file as (DataFrame with the contract columns, the b"mrpo" metadata dict), checked.

    Raises ScoreDataError naming the file, the reference (default: the file's stem) and
    the command that rewrites it when the file is missing, unreadable (empty,
    truncated), without its metadata or columns, or when a pair that fits has a
    non-finite or positive log-prob (see :func:`check_score_values`).
    """
    path = Path(path)
    name = reference or path.stem
    rerun = f"re-run `mrpo score --reference {name}`"
    if not path.is_file():
        raise ScoreDataError(
            f"{path}: score file of reference {name!r} not found; run `mrpo score --reference {name}`"
        )
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ScoreDataError(
            f"{path}: score file of reference {name!r} is not readable parquet (empty, truncated or damaged: "
            f"{first}); {rerun}"
        ) from exc
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ScoreDataError(
            f"{path}: no b'mrpo' metadata, so it is not a score file as `mrpo score` writes it "
            f"(its provenance is unknown); {rerun}"
        )
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise ScoreDataError(f"{path}: its b'mrpo' metadata is not valid JSON ({exc}); {rerun}") from exc
    if not isinstance(meta, dict):
        raise ScoreDataError(f"{path}: its b'mrpo' metadata is {type(meta).__name__}, not a mapping; {rerun}")
    if meta.get("reference") not in (None, name):
        raise ScoreDataError(
            f"{path}: holds the scores of reference {meta['reference']!r}, not {name!r}; {rerun}"
        )
    missing = set(SCHEMA.names) - set(table.column_names)
    if missing:
        raise ScoreDataError(f"{path}: missing column(s) {sorted(missing)}; {rerun}")
    try:
        content = table.select(SCHEMA.names).cast(SCHEMA)
    except (pa.ArrowException, ValueError) as exc:
        raise ScoreDataError(f"{path}: columns of the wrong type ({exc}); {rerun}") from exc
    frame = content.to_pandas()
    check_score_values(frame, path, name)
    if meta.get("row_digests") == ROW_DIGEST:
        check_row_digests(table, path, name)
    return frame, meta


def check_row_digests(table: pa.Table, path: str | Path, reference: str) -> None:
    """Refuse a score file whose rows differ from what `mrpo score` wrote (e.g. chosen and rejected swapped by
    hand): each row's values must match the digest recorded beside them."""
    bad = edited_rows(table)
    if bad:
        what = (
            f"its {ROW_DIGEST} column is gone"
            if ROW_DIGEST not in table.column_names
            else f"pair_id {table.column('pair_id')[bad[0]].as_py()!r} (and {len(bad) - 1} more row(s)) no "
            "longer matches the digest recorded when it was scored"
        )
        raise ScoreDataError(
            f"{path}: edited after scoring ({what}), so its scores of reference {reference!r} cannot be "
            "trusted; "
            f"re-score it: `dvc repro score@{reference}` or `mrpo score --reference {reference}`"
        )


def check_score_values(frame: pd.DataFrame, path: str | Path, reference: str) -> None:
    """Refuse a score table whose rows used for training hold impossible values,
    naming the file, reference, pair.

    Rows flagged fits=False carry NaN by design (they were not scored) and are
    never trained on; every row with fits=True must have finite log-probs <= 0
    (a sequence log-probability cannot be positive).
    """
    rerun = f"re-run `mrpo score --reference {reference}`"
    if frame["pair_id"].isna().any():
        raise ScoreDataError(
            f"{path}: row {int(np.flatnonzero(frame['pair_id'].isna())[0])} has no pair_id; {rerun}"
        )
    if frame["fits"].isna().any():
        pid = frame.loc[frame["fits"].isna(), "pair_id"].iloc[0]
        raise ScoreDataError(f"{path}: pair_id {pid!r} has no `fits` flag; {rerun}")
    fits = frame["fits"].to_numpy(bool)
    for column in ("chosen_logp", "rejected_logp"):
        values = frame[column].to_numpy(np.float64)
        for what, bad in (("non-finite", fits & ~np.isfinite(values)), ("positive", fits & (values > 0))):
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ScoreDataError(
                    f"{path}: reference {reference!r} has a {what} {column} ({values[i]}) for pair_id "
                    f"{frame['pair_id'].iloc[i]!r} ({int(bad.sum())} such pair(s) among those that fit); "
                    "log-probs must be finite and <= 0, "
                    "so the file is damaged or the model's scores are broken: "
                    f"{rerun} (with score.dtype: float32 if the model overflows)"
                )


# ---------------------------------------------------------------- the K files of one training run


@dataclass(frozen=True)
class ReferenceScores:
    """One reference's stored scores, indexed by pair_id, with the file's metadata and sha256."""

    name: str
    path: Path
    frame: pd.DataFrame  # index pair_id; columns split, chosen_logp, rejected_logp, *_tokens, fits
    metadata: dict
    sha256: str


def load_reference_scores(
    score_dir: str | Path, names: Sequence[str], prepared_digest: str
) -> list[ReferenceScores]:
    """Read `<score_dir>/<name>.parquet` for each reference
    and check they were all made from this prepared data.

    Raises ScoreDataError naming the file when one is missing, unreadable, without its
    metadata, holds a non-finite or positive log-prob for a pair that fits (see
    `read_scores`), or when its recorded `prepared_digest` differs from the
    others' or from `prepared_digest`.
    """
    out = []
    for name in names:
        path = score_path(score_dir, name)
        if not path.is_file():
            raise ScoreDataError(
                f"{path}: no scores for reference {name!r}; run `mrpo score --reference {name}` first"
            )
        frame, meta = read_scores(path, reference=name)
        if frame["pair_id"].duplicated().any():
            dup = frame.loc[frame["pair_id"].duplicated(), "pair_id"].iloc[0]
            raise ScoreDataError(
                f"{path}: pair_id {dup!r} appears more than once; re-run `mrpo score --reference {name}`"
            )
        out.append(ReferenceScores(name, path, frame.set_index("pair_id"), dict(meta), file_sha256(path)))
    check_score_digests(out, prepared_digest)
    return out


def check_score_digests(scores: Sequence[ReferenceScores], prepared_digest: str) -> None:
    """Refuse score files made from different prepared data (each other's digest or the prepared data's)."""
    recorded = {s.name: s.metadata.get("prepared_digest") for s in scores}
    if len(set(recorded.values())) > 1:
        listing = ", ".join(
            f"{n} ({s.path}): {str(d)[:12]}" for (n, d), s in zip(recorded.items(), scores, strict=True)
        )
        raise ScoreDataError(
            "score files were made from different prepared data (prepared_digest differs between them: "
            f"{listing}); re-run `mrpo score --reference <name>` for the stale ones"
        )
    for s in scores:
        if recorded[s.name] != prepared_digest:
            raise ScoreDataError(
                f"{s.path}: scores for {s.name!r} were made from prepared data with digest "
                f"{str(recorded[s.name])[:12]}, but the prepared data now has digest {prepared_digest[:12]}; "
                f"re-run `mrpo score --reference {s.name}`"
            )
