"""Where the prepare stage's rows come from (``data.source``): the built-in synthetic task, local files
(JSON, JSONL, parquet, CSV, each optionally gzipped) or a Hugging Face dataset by id."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice

from mrpo.config.schema import Config
from mrpo.data.normalize import RawRow
from mrpo.data.readers import read_file_rows, read_hub_rows


def read_synthetic_rows(n_pairs: int, seed: int) -> Iterator[dict]:
    from mrpo.data.synthetic import generate_pairs

    return iter(generate_pairs(n_pairs, seed))


def source_rows(cfg: Config) -> Iterator[tuple[str, Iterator[dict]]]:
    """(origin, rows) for each input of the configured source, in order."""
    d = cfg.data
    if d.source == "synthetic":
        yield "synthetic", read_synthetic_rows(d.synthetic_pairs, cfg.seed)
    elif d.source == "hub":
        for dataset_id in d.paths:
            yield dataset_id, read_hub_rows(dataset_id, d.hub_split)
    else:  # file, gsm8k
        for path in d.paths:
            yield path, read_file_rows(path)


def raw_sources(
    cfg: Config, on_extra_fields: Callable[[str, list], None]
) -> Iterator[tuple[str, list[RawRow]]]:
    """(origin, its rows) for each input in order, `data.max_rows` rows at most in all.

    A CSV row with more fields than its header names is read without them, and `on_extra_fields(where,
    values)` is told.
    """
    budget = cfg.data.max_rows
    for origin, rows in source_rows(cfg):
        if budget is not None and budget <= 0:
            break
        raw = []
        for i, r in enumerate(islice(rows, budget), start=1):
            # csv.DictReader puts the fields of a row longer than the header under the key None
            extra = r.pop(None, None) if isinstance(r, dict) else None
            if extra:
                on_extra_fields(f"{origin} row {i}", extra)
            raw.append(RawRow(origin, i, r))
        if budget is not None:
            budget -= len(raw)
        yield origin, raw
