"""The `prepare` stage: read preference data from any source, clean it, split it, write parquet.

Sources (mrpo.data.sources), formats (mrpo.data.normalize) and cleaning (mrpo.data.cleaning) are library
code; this is the recipe. Output contract (everyone downstream relies on it, mrpo.data.prepared):
``<output_dir>/{train,val,test}.parquet`` with string columns ``pair_id``, ``prompt``, ``chosen``,
``rejected``, ``prompt_messages`` (a JSON list of role/content messages before the response), plus
``report.json``.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mrpo.config.schema import Config
from mrpo.data.cleaning import PrepareTally, deduplicate, normalize_rows, split_of
from mrpo.data.normalize import Pair
from mrpo.data.prepared import SCHEMA, SPLITS, split_path, table_digest
from mrpo.data.sources import raw_sources
from mrpo.staging import StagedOutputs, recover

log = logging.getLogger("mrpo")


def length_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "mean": 0.0, "median": 0.0, "max": 0}
    return {
        "min": min(values),
        "mean": round(statistics.fmean(values), 2),
        "median": float(statistics.median(values)),
        "max": max(values),
    }


def split_table(pairs: list[Pair]) -> pa.Table:
    columns = {
        "pair_id": [p.pair_id for p in pairs],
        "prompt": [p.prompt for p in pairs],
        "chosen": [p.chosen for p in pairs],
        "rejected": [p.rejected for p in pairs],
        "prompt_messages": [p.prompt_messages for p in pairs],
    }
    return pa.table(columns, schema=SCHEMA)


def _write_together(outputs: dict[Path, bytes | pa.Table]) -> None:
    """Every output staged beside its final path, then all swapped in together (mrpo.staging): a failure or a
    kill at any point leaves the complete previous set."""
    recover(list(outputs))
    with StagedOutputs() as staged:
        for path, content in outputs.items():
            tmp = staged.file(path)
            if isinstance(content, pa.Table):
                pq.write_table(content, tmp)
            else:
                tmp.write_bytes(content)


def prepare(cfg: Config) -> dict:
    """Run the prepare stage: read, normalise, drop bad rows, dedupe, split, write parquet + report.json.

    Returns the report (also written to `<output_dir>/report.json`).
    """
    from mrpo.config.inputs import check_declared
    from mrpo.preflight import check_stage

    check_stage(cfg, "prepare")
    check_declared(cfg, "prepare")  # under DVC: dvc.yaml lists the data files as deps
    tally = PrepareTally()
    formats: dict[str, str] = {}
    all_pairs: list[Pair] = []
    for origin, raw in raw_sources(cfg, tally.extra_fields):
        pairs, formats[origin] = normalize_rows(raw, origin, cfg, tally)
        all_pairs.extend(pairs)
    pairs = deduplicate(all_pairs, tally)
    by_split: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    for pair in pairs:
        by_split[split_of(pair.pair_id, cfg.seed, cfg.data.val_fraction, cfg.data.test_fraction)].append(pair)
    tables = {s: split_table(by_split[s]) for s in SPLITS}
    report = prepare_report(cfg, tally, formats, len(pairs), by_split, table_digest(tables))
    out = Path(cfg.data.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs: dict[Path, bytes | pa.Table] = {split_path(out, s): tables[s] for s in SPLITS}
    outputs[out / "report.json"] = (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    _write_together(outputs)
    _log_outcome(cfg, tally, formats, by_split, report)
    return report


def prepare_report(
    cfg: Config, tally: PrepareTally, formats: dict, kept: int, by_split: dict[str, list[Pair]], digest: str
) -> dict:
    """report.json: the source, what was read, kept and dropped (with examples), and each split's sizes."""
    d = cfg.data
    return {
        "source": {
            "kind": d.source,
            "paths": list(d.paths),
            "formats": formats,
            **({"hub_split": d.hub_split} if d.source == "hub" else {}),
            **({"synthetic_pairs": d.synthetic_pairs} if d.source == "synthetic" else {}),
        },
        "seed": cfg.seed,
        "rows_read": tally.rows_read,
        "rows_kept": kept,
        "dropped": tally.dropped,
        "dropped_examples": tally.examples,
        "extra_fields": {"rows": tally.extra_field_rows, "examples": tally.extra_field_examples},
        "max_rows": d.max_rows,
        "max_chars": d.max_chars,
        "val_fraction": d.val_fraction,
        "test_fraction": d.test_fraction,
        "splits": {
            s: {
                "rows": len(ps),
                "prompt_chars": length_stats([len(p.prompt) for p in ps]),
                "chosen_chars": length_stats([len(p.chosen) for p in ps]),
                "rejected_chars": length_stats([len(p.rejected) for p in ps]),
            }
            for s, ps in by_split.items()
        },
        "digest": digest,
    }


def _log_outcome(
    cfg: Config, tally: PrepareTally, formats: dict, by_split: dict[str, list[Pair]], report: dict
) -> None:
    d = cfg.data
    dropped = ", ".join(f"{k} {v}" for k, v in tally.dropped.items() if v) or "none"
    if tally.extra_field_rows:
        log.warning(
            "prepare: %d row(s) had more fields than the header names; the extra fields were ignored "
            "(see extra_fields in %s); check the file's header and quoting",
            tally.extra_field_rows,
            Path(d.output_dir) / "report.json",
        )
    log.info(
        "prepare: read %d rows from %s (%s), kept %d: train %d / val %d / test %d; "
        "dropped: %s; digest %s -> %s",
        tally.rows_read,
        d.source,
        ", ".join(sorted(set(formats.values()))),
        report["rows_kept"],
        len(by_split["train"]),
        len(by_split["val"]),
        len(by_split["test"]),
        dropped,
        report["digest"][:12],
        Path(d.output_dir),
    )
