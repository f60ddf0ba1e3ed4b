"""From one raw row of any supported format to a clean preference pair, or the reason it is dropped.

Formats (``data.format``): explicit prompt/chosen/rejected strings, conversational (TRL-style role/content
message lists) and implicit prompt (HH-RLHF transcripts sharing a prefix); ``auto`` detects which per
source. The GSM8K builder makes a question/answer row a pair whose rejected answer has a wrong final number.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any

from mrpo.config.schema import DataConfig
from mrpo.data import gsm8k
from mrpo.errors import DataError

DROP_REASONS = ("missing_field", "not_string", "malformed", "identical", "too_long", "duplicate")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE_OF_SPEAKER = {"Human": "user", "Assistant": "assistant"}
_SPEAKER_OF_ROLE = {"user": "Human", "assistant": "Assistant", "system": "System"}


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
