"""From a source's raw rows to unique, valid pairs and their splits, counting what was dropped and why."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from mrpo.config.schema import Config
from mrpo.data.normalize import (
    DROP_REASONS,
    NORMALIZERS,
    Pair,
    RawRow,
    RowDropped,
    check_columns,
    check_pair,
    detect_format,
    normalize_gsm8k,
)
from mrpo.errors import DataError

log = logging.getLogger("mrpo")

_EXAMPLES_PER_REASON = 5


def split_of(pid: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split a pair belongs to: a uniform draw from the hash of (seed, pair_id).

    Each pair's split depends only on its own content and the seed, so adding or
    removing other rows never moves a pair between splits.
    """
    digest = hashlib.sha256(f"{seed}:{pid}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


@dataclass
class PrepareTally:
    """What happened to every row read: kept or dropped, and why."""

    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    examples: dict[str, list[str]] = field(default_factory=dict)
    extra_field_rows: int = 0  # CSV rows with more fields than the header names: the extra ones are not read
    extra_field_examples: list[str] = field(default_factory=list)

    def extra_fields(self, where: str, values: list) -> None:
        self.extra_field_rows += 1
        if len(self.extra_field_examples) < _EXAMPLES_PER_REASON:
            detail = (
                f"{where}: {len(values)} field(s) beyond the header's columns ignored: "
                f"{json.dumps(values, ensure_ascii=False)[:200]}"
            )
            self.extra_field_examples.append(detail)
            log.warning("extra fields: %s", detail)

    def drop(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _EXAMPLES_PER_REASON:
            shown.append(detail)
            log.warning("dropped (%s): %s", reason, detail)


def normalize_rows(
    rows: Iterable[RawRow], origin: str, cfg: Config, tally: PrepareTally
) -> tuple[list[Pair], str]:
    """Clean one source's rows into pairs; returns (valid pairs, format used). Duplicates are left in."""
    rows = list(rows)
    if not rows:
        raise DataError(f"{origin}: no rows (empty file or split)")
    d = cfg.data
    if d.source == "synthetic":
        # The built-in task always has these columns, whatever data.*_column says for files.
        d = dataclasses.replace(d, prompt_column="prompt", chosen_column="chosen", rejected_column="rejected")
    if d.source == "gsm8k":
        check_columns(rows, {d.question_column: "question_column", d.answer_column: "answer_column"}, origin)
        fmt = "gsm8k"

        def normalize(row: RawRow) -> Pair:
            return normalize_gsm8k(row, d, cfg.seed)
    else:
        fmt = detect_format(rows, d, origin) if d.format == "auto" else d.format
        required = {d.chosen_column: "chosen_column", d.rejected_column: "rejected_column"}
        if fmt == "explicit":
            required = {d.prompt_column: "prompt_column", **required}
        check_columns(rows, required, origin)

        def normalize(row: RawRow) -> Pair:
            return NORMALIZERS[fmt](row, d)

    pairs = []
    problems: dict[str, int] = {}
    first_problems: list[str] = []
    for row in tqdm(rows, desc=f"prepare {Path(origin).name}", unit="row", disable=None, leave=False):
        tally.rows_read += 1
        try:
            pair = normalize(row)
            check_pair(pair, d.max_chars, row.where)
        except RowDropped as dropped:
            tally.drop(dropped.reason, dropped.detail)
            problems[dropped.reason] = problems.get(dropped.reason, 0) + 1
            if len(first_problems) < 3:
                first_problems.append(dropped.detail)
            continue
        pairs.append(pair)
    if not pairs:
        raise DataError(
            f"{origin}: no valid row among {len(rows)} (format {fmt}; dropped {problems}); "
            f"first problems: {'; '.join(first_problems)}"
        )
    return pairs, fmt


def deduplicate(pairs: Iterable[Pair], tally: PrepareTally) -> list[Pair]:
    """Keep the first of each pair_id."""
    seen: set[str] = set()
    out = []
    for pair in pairs:
        pid = pair.pair_id
        if pid in seen:
            tally.drop("duplicate", f"pair {pid} repeats an earlier row")
            continue
        seen.add(pid)
        out.append(pair)
    return out
