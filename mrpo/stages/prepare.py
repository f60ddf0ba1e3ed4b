"""The `prepare` stage: read preference data from any source, clean it, split it, write parquet.

Sources (``data.source``): the built-in synthetic task, local files (JSON, JSONL,
parquet, CSV, each optionally gzipped), a Hugging Face dataset by id, and a
GSM8K-style question/answer builder. Formats (``data.format``): explicit
prompt/chosen/rejected strings, conversational (TRL-style role/content message
lists) and implicit prompt (HH-RLHF transcripts sharing a prefix); ``auto``
detects which per file.

Output contract (everyone downstream relies on it): ``<output_dir>/{train,val,test}.parquet``
with string columns ``pair_id``, ``prompt``, ``chosen``, ``rejected``, ``prompt_messages``
(a JSON list of role/content messages before the response), plus ``report.json``.
:func:`prepared_digest` is THE digest of the prepared data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import re
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from mrpo.config.schema import Config, DataConfig
from mrpo.data import gsm8k
from mrpo.data.prepared import SCHEMA, SPLITS, split_path, table_digest
from mrpo.data.readers import read_file_rows, read_hub_rows
from mrpo.errors import DataError
from mrpo.io import atomic_file

log = logging.getLogger("mrpo")

DROP_REASONS = ("missing_field", "not_string", "malformed", "identical", "too_long", "duplicate")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE_OF_SPEAKER = {"Human": "user", "Assistant": "assistant"}
_SPEAKER_OF_ROLE = {"user": "Human", "assistant": "Assistant", "system": "System"}
_EXAMPLES_PER_REASON = 5


class RowDropped(Exception):
    """One row is unusable; it is dropped and counted under `reason` (one of DROP_REASONS)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Pair:
    """One cleaned preference pair, as written to the prepared parquet files."""

    prompt: str
    chosen: str
    rejected: str
    prompt_messages: str  # JSON list of {role, content}: the conversation before the response

    @property
    def pair_id(self) -> str:
        return pair_id(self.prompt, self.chosen, self.rejected)


@dataclass(frozen=True)
class RawRow:
    """A row as read, with where it came from (for messages naming the file and row)."""

    origin: str  # file path, dataset id or "synthetic"
    number: int  # 1-based row number within its origin
    data: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.origin} row {self.number}"


# ---------------------------------------------------------------- small pure helpers


def pair_id(prompt: str, chosen: str, rejected: str) -> str:
    """A stable content hash of the pair (16 hex digits of SHA-256);
    the same text gives the same id anywhere."""
    payload = json.dumps([prompt, chosen, rejected], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


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


def user_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def messages_to_text(messages: list[dict[str, str]]) -> str:
    """Prompt text for models without a chat template: one user message is its own text,
    a longer history becomes a Human/Assistant transcript ending with the assistant cue."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    turns = [f"{_SPEAKER_OF_ROLE.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


def transcript_to_messages(transcript: str) -> list[dict[str, str]]:
    """Parse "\\n\\nHuman: ... \\n\\nAssistant: ..." into role/content messages
    (text before the first turn is dropped)."""
    parts = _TURN.split(transcript)
    # parts = [preamble, speaker, text, speaker, text, ...]
    return [
        {"role": _ROLE_OF_SPEAKER[speaker], "content": text.strip()}
        for speaker, text in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _field(row: RawRow, column: str) -> Any:
    if column not in row.data or row.data[column] is None:
        raise RowDropped("missing_field", f"{row.where}: field {column!r} is missing")
    return row.data[column]


def _string_field(row: RawRow, column: str) -> str:
    value = _field(row, column)
    if not isinstance(value, str):
        raise RowDropped(
            "not_string", f"{row.where}: field {column!r} is {type(value).__name__}, not a string"
        )
    if not value.strip():
        raise RowDropped("missing_field", f"{row.where}: field {column!r} is empty")
    return value


# ---------------------------------------------------------------- format normalisers


def normalize_explicit(row: RawRow, cfg: DataConfig) -> Pair:
    """Explicit format: prompt, chosen and rejected are strings in their own columns."""
    prompt = _string_field(row, cfg.prompt_column)
    chosen = _string_field(row, cfg.chosen_column)
    rejected = _string_field(row, cfg.rejected_column)
    return Pair(prompt, chosen, rejected, json.dumps(user_messages(prompt), ensure_ascii=False))


def _messages(row: RawRow, column: str, value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RowDropped(
            "malformed", f"{row.where}: field {column!r} is {type(value).__name__}, not a message list"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowDropped("malformed", f"{row.where}: {column}[{i}] is not a {{role, content}} message")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise RowDropped("not_string", f"{row.where}: {column}[{i}] role/content is not a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _split_conversation(
    row: RawRow, column: str, history: list[dict], messages: list[dict]
) -> tuple[list, str]:
    """(history before the response, response text): the response is the last message, an assistant turn."""
    if not messages:
        raise RowDropped("missing_field", f"{row.where}: field {column!r} is an empty message list")
    last = messages[-1]
    if last["role"] != "assistant":
        raise RowDropped(
            "malformed", f"{row.where}: the last message of {column!r} is {last['role']!r}, not assistant"
        )
    if not last["content"].strip():
        raise RowDropped("missing_field", f"{row.where}: the response in {column!r} is empty")
    return history + messages[:-1], last["content"]


def normalize_conversational(row: RawRow, cfg: DataConfig) -> Pair:
    """Conversational format (TRL): chosen/rejected are message lists, with an optional prompt list.

    The prompt is the shared history (prompt messages plus any earlier turns in
    chosen/rejected); the response is the last assistant message.
    """
    history: list[dict[str, str]] = []
    prompt_value = row.data.get(cfg.prompt_column)
    if isinstance(prompt_value, str):
        history = user_messages(_string_field(row, cfg.prompt_column))
    elif prompt_value is not None:
        history = _messages(row, cfg.prompt_column, prompt_value)
    chosen_hist, chosen = _split_conversation(
        row, cfg.chosen_column, history, _messages(row, cfg.chosen_column, _field(row, cfg.chosen_column))
    )
    rejected_hist, rejected = _split_conversation(
        row,
        cfg.rejected_column,
        history,
        _messages(row, cfg.rejected_column, _field(row, cfg.rejected_column)),
    )
    if chosen_hist != rejected_hist:
        raise RowDropped(
            "malformed", f"{row.where}: chosen and rejected have different conversation histories"
        )
    if not chosen_hist or not any(m["content"].strip() for m in chosen_hist):
        raise RowDropped(
            "missing_field", f"{row.where}: no prompt (the conversation has no turn before the response)"
        )
    return Pair(messages_to_text(chosen_hist), chosen, rejected, json.dumps(chosen_hist, ensure_ascii=False))


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split two HH-style transcripts at their last shared "\\n\\nAssistant:" turn.

    Returns (prompt transcript ending with "\\n\\nAssistant:", chosen response,
    rejected response), or None when they share no assistant turn.
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(ASSISTANT, 0, n)  # the marker must lie wholly inside the shared prefix
    if cut < 0:
        return None
    end = cut + len(ASSISTANT)
    return chosen[:end], chosen[end:].strip(), rejected[end:].strip()


def normalize_implicit(row: RawRow, cfg: DataConfig) -> Pair:
    """Implicit prompt (HH-RLHF): chosen/rejected are whole transcripts sharing the conversation so far."""
    chosen_text = _string_field(row, cfg.chosen_column)
    rejected_text = _string_field(row, cfg.rejected_column)
    if chosen_text == rejected_text:
        raise RowDropped("identical", f"{row.where}: chosen and rejected transcripts are identical")
    parts = split_transcripts(chosen_text, rejected_text)
    if parts is None:
        raise RowDropped("malformed", f"{row.where}: chosen and rejected share no '\\n\\nAssistant:' turn")
    prompt_transcript, chosen, rejected = parts
    messages = transcript_to_messages(prompt_transcript)[:-1]  # the last one is the empty assistant cue
    if not chosen or not rejected:
        raise RowDropped("missing_field", f"{row.where}: empty response after the last shared assistant turn")
    if not messages:
        raise RowDropped("malformed", f"{row.where}: no Human turn before the last shared assistant turn")
    # Keep the original transcript as prompt text (minus leading blank lines): multi-turn history intact.
    return Pair(prompt_transcript.lstrip(), chosen, rejected, json.dumps(messages, ensure_ascii=False))


NORMALIZERS = {
    "explicit": normalize_explicit,
    "conversational": normalize_conversational,
    "implicit": normalize_implicit,
}


def detect_format(rows: list[RawRow], cfg: DataConfig, origin: str) -> str:
    """Which format a source is in, from its columns and its first usable chosen value."""
    columns = {key for row in rows for key in row.data}
    for column, key in ((cfg.chosen_column, "chosen_column"), (cfg.rejected_column, "rejected_column")):
        if column not in columns:
            raise DataError(f"{origin}: no column {column!r} (data.{key}); columns found: {sorted(columns)}")
    sample = next(
        (r.data[cfg.chosen_column] for r in rows if isinstance(r.data.get(cfg.chosen_column), str | list)),
        None,
    )
    if isinstance(sample, list):
        return "conversational"
    if cfg.prompt_column in columns:
        return "explicit"
    if isinstance(sample, str) and ASSISTANT in sample:
        return "implicit"
    raise DataError(
        f"{origin}: no column {cfg.prompt_column!r} (data.prompt_column) "
        f"and the {cfg.chosen_column!r} values are "
        f"neither message lists nor Human/Assistant transcripts; columns found: {sorted(columns)}. "
        "Set data.prompt_column to the prompt's column or data.format explicitly."
    )


def check_columns(rows: list[RawRow], columns: dict[str, str], origin: str) -> None:
    """Raise DataError when a required column (name -> params key) is absent from every row."""
    found = {key for row in rows for key in row.data}
    for column, key in columns.items():
        if column not in found:
            raise DataError(f"{origin}: no column {column!r} (data.{key}); columns found: {sorted(found)}")


def check_pair(pair: Pair, max_chars: int, where: str) -> None:
    """Drop pairs whose responses are the same or that are longer than max_chars.

    Length counts the prompt plus the longer response: what one sequence holds.
    """
    if pair.chosen == pair.rejected:
        raise RowDropped("identical", f"{where}: chosen and rejected are identical")
    length = len(pair.prompt) + max(len(pair.chosen), len(pair.rejected))
    if length > max_chars:
        raise RowDropped("too_long", f"{where}: {length} characters > data.max_chars {max_chars}")


# ---------------------------------------------------------------- GSM8K builder


def normalize_gsm8k(row: RawRow, cfg: DataConfig, seed: int) -> Pair:
    """Question/answer row -> pair:
    chosen = the reference solution, rejected = it with a wrong final answer."""
    question = _string_field(row, cfg.question_column)
    answer = _string_field(row, cfg.answer_column)
    # Per-row RNG from the seed and the content: the same row gets the same wrong answer in any order.
    rng = random.Random(hashlib.sha256(f"{seed}:{question}:{answer}".encode()).digest())
    rejected = gsm8k.corrupt_final_answer(answer, rng)
    if rejected is None:
        raise RowDropped("malformed", f"{row.where}: answer has no final '#### <number>' line")
    return Pair(question, answer, rejected, json.dumps(user_messages(question), ensure_ascii=False))


# ---------------------------------------------------------------- sources


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


# ---------------------------------------------------------------- the stage


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


def _write_atomically(outputs: dict[Path, bytes | pa.Table]) -> None:
    """Write every output to a temp file first, then rename them all,
    so a failure leaves old outputs intact."""
    with contextlib.ExitStack() as stack:
        for path, content in outputs.items():
            tmp = stack.enter_context(atomic_file(path))
            if isinstance(content, pa.Table):
                pq.write_table(content, tmp)
            else:
                tmp.write_bytes(content)


def prepare(cfg: Config) -> dict:
    """Run the prepare stage: read, normalise, drop bad rows, dedupe, split, write parquet + report.json.

    Returns the report (also written to `<output_dir>/report.json`).
    """
    from mrpo.preflight import check_stage

    check_stage(cfg, "prepare")
    d = cfg.data
    tally = PrepareTally()
    all_pairs: list[Pair] = []
    formats: dict[str, str] = {}
    budget = d.max_rows
    for origin, rows in source_rows(cfg):
        if budget is not None and budget <= 0:
            break
        raw = []
        for i, r in enumerate(islice(rows, budget), start=1):
            # csv.DictReader puts the fields of a row longer than the header under the key None
            extra = r.pop(None, None) if isinstance(r, dict) else None
            if extra:
                tally.extra_fields(f"{origin} row {i}", extra)
            raw.append(RawRow(origin, i, r))
        if budget is not None:
            budget -= len(raw)
        pairs, formats[origin] = normalize_rows(raw, origin, cfg, tally)
        all_pairs.extend(pairs)
    pairs = deduplicate(all_pairs, tally)

    by_split: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    for pair in pairs:
        by_split[split_of(pair.pair_id, cfg.seed, d.val_fraction, d.test_fraction)].append(pair)
    tables = {s: split_table(by_split[s]) for s in SPLITS}
    digest = table_digest(tables)

    report = {
        "source": {
            "kind": d.source,
            "paths": list(d.paths),
            "formats": formats,
            **({"hub_split": d.hub_split} if d.source == "hub" else {}),
            **({"synthetic_pairs": d.synthetic_pairs} if d.source == "synthetic" else {}),
        },
        "seed": cfg.seed,
        "rows_read": tally.rows_read,
        "rows_kept": len(pairs),
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
    out = Path(d.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs: dict[Path, bytes | pa.Table] = {split_path(out, s): tables[s] for s in SPLITS}
    outputs[out / "report.json"] = (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    _write_atomically(outputs)

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
        len(pairs),
        len(by_split["train"]),
        len(by_split["val"]),
        len(by_split["test"]),
        dropped,
        digest[:12],
        out,
    )
    return report
