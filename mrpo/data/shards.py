"""The shard store of an unfinished score file: `<score.output_dir>/.shards/<reference>/`.

Scoring writes the pairs' log-probs in shards of `score.shard_size` pairs as they finish, so a killed run
resumes where it stopped. A manifest (prepared-data digest, model fingerprint, settings) decides whether
the shards there may be reused: shards of other data or another model are discarded, shards computed in
other numerics are refused. Shard boundaries do not depend on the number of ranks, so a re-run with any
number of ranks reuses every finished shard.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mrpo.data.scorefile import SCHEMA, edited_rows, with_row_digests
from mrpo.errors import MRPOError
from mrpo.io import atomic_file

log = logging.getLogger("mrpo")

# bump when the shard layout or the scoring computation changes (2: fp32 weights + autocast; 3: row digests)
SHARD_FORMAT = 3
# The settings that change a score's numerics but not what is scored: shards made under other values are
# refused rather than mixed into one file (see open_shard_dir).
NUMERICS_KEYS = ("device", "dtype", "batch_tokens", "padding_side")
_STATS_KEY = b"mrpo_shard"


class ScoringError(MRPOError, RuntimeError):
    """Scoring cannot go on: missing prepared data, or a reference produced a non-finite score."""


@dataclass
class ShardStats:
    """What one shard cost: real tokens, padded tokens, seconds, sequences, prompts cut from the left."""

    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    sequences: int = 0
    prompts_truncated: int = 0

    def add(self, other: ShardStats) -> None:
        for key in ("tokens", "padded_tokens", "seconds", "sequences", "prompts_truncated"):
            setattr(self, key, getattr(self, key) + getattr(other, key))


def shard_bounds(n_pairs: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, n_pairs)) for start in range(0, n_pairs, shard_size)]


def shard_table(pairs, chosen, rejected, enc_chosen, enc_rejected) -> pa.Table:
    """One shard's rows in the score file's schema; `pairs` need `pair_id` and `split`."""
    return pa.table(
        {
            "pair_id": [p.pair_id for p in pairs],
            "split": [p.split for p in pairs],
            "chosen_logp": chosen,
            "rejected_logp": rejected,
            "chosen_tokens": [e.response_length for e in enc_chosen],
            "rejected_tokens": [e.response_length for e in enc_rejected],
            "fits": [c.fits and r.fits for c, r in zip(enc_chosen, enc_rejected, strict=True)],
        },
        schema=SCHEMA,
    )


def write_parquet_atomically(table: pa.Table, path: Path) -> None:
    with atomic_file(path) as tmp:  # readers see the old file or the new one, never half of one
        pq.write_table(table, tmp)


def numerics_mismatch(old: dict, new: dict) -> dict[str, tuple]:
    """{key: (old, new)} for the NUMERICS_KEYS whose values differ between two shard manifests."""
    return {k: (old.get(k), new.get(k)) for k in NUMERICS_KEYS if old.get(k) != new.get(k)}


def open_shard_dir(shard_dir: Path, key: dict) -> None:
    """Keep the shards only when they were made with exactly this key (data, model, settings).

    Shards of other data or another model are stale and discarded. Shards of the same data and model
    computed in other numerics (device, dtype, batch packing, padding side) are refused: finishing
    them here would mix numerics within one score file, and discarding them may throw away hours of
    accelerator time, so the user decides.
    """
    manifest = shard_dir / "manifest.json"
    if shard_dir.exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = None
        same_work = old is not None and all(old.get(k) == v for k, v in key.items() if k not in NUMERICS_KEYS)
        differs = numerics_mismatch(old, key) if same_work else {}
        if differs:
            listing = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in differs.items())
            raise ScoringError(
                f"{shard_dir}: an interrupted run left shards scored in other numerics ({listing}); "
                "resuming would mix them into one score file. "
                "Resume with the same score.device, score.dtype and score.batch_tokens, "
                f"or delete {shard_dir} to score from scratch"
            )
        if old != key:
            log.info(
                "score: discarding stale shards in %s (prepared data, model or settings changed)", shard_dir
            )
            shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    if not manifest.is_file():
        manifest.write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")


def load_shard(path: Path, pairs: Sequence) -> tuple[pa.Table, ShardStats] | None:
    """A finished shard, or None when it is missing, unreadable, for other pairs or edited since it was
    written (its rows' digests differ): then it is recomputed."""
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        stats = ShardStats(**json.loads(table.schema.metadata[_STATS_KEY]))
    except Exception as exc:  # a half-written or foreign file: recompute rather than trust it
        log.warning("score: ignoring unreadable shard %s (%s)", path, exc)
        return None
    if table.column("pair_id").to_pylist() != [p.pair_id for p in pairs]:
        log.warning("score: shard %s holds other pairs; recomputing it", path)
        return None
    edited = edited_rows(table)
    if edited:  # changed since it was scored (by hand, or damaged): never reused as it is
        log.warning(
            "score: shard %s: %d row(s) no longer match the digests written with them; recomputing it",
            path,
            len(edited),
        )
        return None
    return table.select(SCHEMA.names).replace_schema_metadata(None), stats


@dataclass(frozen=True)
class ShardDir:
    """One reference's shards: shard i holds the pairs `bounds[i]` = [lo, hi) of the prepared pairs."""

    path: Path
    bounds: list[tuple[int, int]]

    @classmethod
    def of(cls, score_dir: str | Path, reference: str, n_pairs: int, shard_size: int) -> ShardDir:
        return cls(Path(score_dir) / ".shards" / reference, shard_bounds(n_pairs, shard_size))

    def __len__(self) -> int:
        return len(self.bounds)

    def shard_path(self, i: int) -> Path:
        return self.path / f"shard-{i:05d}.parquet"

    def open(self, key: dict) -> None:
        open_shard_dir(self.path, key)

    def load(self, i: int, pairs: Sequence) -> tuple[pa.Table, ShardStats] | None:
        lo, hi = self.bounds[i]
        return load_shard(self.shard_path(i), pairs[lo:hi])

    def write(self, i: int, table: pa.Table, stats: ShardStats) -> None:
        meta = {_STATS_KEY: json.dumps(stats.__dict__).encode()}
        write_parquet_atomically(with_row_digests(table).replace_schema_metadata(meta), self.shard_path(i))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
