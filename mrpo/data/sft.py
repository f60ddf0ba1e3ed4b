"""The (prompt, response) rows supervised fine-tuning learns from (`sft.data`): the chosen responses of the
prepared train split, GSM8K question/answer rows formatted as `data.source: gsm8k` formats a pair's prompt and
chosen response, or rows of local files with a prompt and a response column. Each row keeps where it came
from, so an error names the file and row."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from mrpo.config.schema import Config
from mrpo.data.normalize import user_messages
from mrpo.data.readers import read_file_rows
from mrpo.errors import DataError


@dataclass(frozen=True)
class SftRow:
    prompt: str
    prompt_messages: str  # JSON list of {role, content}: what a chat template renders
    response: str
    where: str  # "<file> row <n>"


def _string(record: dict, column: str, key: str, where: str) -> str:
    if column not in record:
        raise DataError(f"{where}: no column {column!r} ({key}); columns found: {sorted(record)}")
    value = record[column]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: column {column!r} ({key}) is {value!r}, not a non-empty string")
    return value


def _columns(cfg: Config) -> tuple[str, str, str, str]:
    """(prompt column, its params key, response column, its params key) of the configured source."""
    d = cfg.sft.data
    if d.source == "gsm8k":
        return cfg.data.question_column, "data.question_column", cfg.data.answer_column, "data.answer_column"
    if d.source == "prepared":
        return "prompt", "the prepared split", "chosen", "the prepared split"
    return d.prompt_column, "sft.data.prompt_column", d.response_column, "sft.data.response_column"


def _records(cfg: Config) -> Iterator[tuple[str, Iterator[dict]]]:
    """(origin, its records) per input: the prepared train split or each file of sft.data.paths."""
    d = cfg.sft.data
    if d.source == "prepared":
        from mrpo.data.prepared import read_split

        origin = str(Path(cfg.data.output_dir) / "train.parquet")
        yield origin, iter(read_split(cfg.data.output_dir, "train").to_dict("records"))
        return
    for path in d.paths:
        if not Path(path).is_file():
            raise DataError(
                f"{path}: file not found (sft.data.paths; relative paths start at the project root)"
            )
        yield path, read_file_rows(path)


def _row(cfg: Config, record: dict, where: str) -> SftRow:
    prompt_col, prompt_key, response_col, response_key = _columns(cfg)
    prompt = _string(record, prompt_col, prompt_key, where)
    response = _string(record, response_col, response_key, where)
    messages = record.get("prompt_messages") if cfg.sft.data.source == "prepared" else None
    if not messages:  # gsm8k formats its prompt as one user message, as normalize_gsm8k does
        messages = json.dumps(user_messages(prompt), ensure_ascii=False)
    return SftRow(prompt, messages, response, where)


def sft_rows(cfg: Config) -> list[SftRow]:
    """Every row of the configured source, `sft.data.skip_rows` skipped at the start of each input and at most
    `sft.data.max_rows` in all; DataError naming the key when none is left."""
    d = cfg.sft.data
    budget = d.max_rows
    rows: list[SftRow] = []
    for origin, records in _records(cfg):
        if budget is not None and budget <= 0:
            break
        start = d.skip_rows + 1
        for number, record in enumerate(islice(records, d.skip_rows, None), start=start):
            if budget is not None and budget <= 0:
                break
            rows.append(_row(cfg, record, f"{origin} row {number}"))
            budget = None if budget is None else budget - 1
    if not rows:
        inputs = ", ".join(p for p in d.paths) or f"{cfg.data.output_dir}/train.parquet"
        raise DataError(
            f"sft.data.skip_rows: no rows left in {inputs} after skipping {d.skip_rows} per file; "
            "lower sft.data.skip_rows or add rows"
        )
    return rows
