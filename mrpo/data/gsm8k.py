"""GSM8K solutions turned into preference pairs: the reference solution against the same solution with a
near-miss final answer, consistent up to its last step.
Pure text functions; `data.source: gsm8k` uses them."""

from __future__ import annotations

import random
import re
from decimal import Decimal, InvalidOperation

NEAR_MISS_OFFSETS = (-10, -2, -1, 1, 2, 10)  # how far a near miss is from the right answer
_NUM = r"-?\d[\d,]*(?:\.\d+)?"
_FINAL = re.compile(r"####\s*(" + _NUM + r")\s*$")


def _wrong_value(value: Decimal, rng: random.Random) -> Decimal:
    """A near miss: off by 1, 2 or 10, never negative when the answer is not."""
    offsets = [o for o in NEAR_MISS_OFFSETS if value < 0 or value + o >= 0]
    return value + rng.choice(offsets)


def _format_number(value: Decimal, places: int, commas: bool) -> str:
    return f"{value:,.{places}f}" if commas else f"{value:.{places}f}"


def corrupt_final_answer(solution: str, rng: random.Random) -> str | None:
    """The same solution with a wrong final answer, or None when it has no "#### N" line.

    Changes the number after "####" and that number where it is a result
    (after "=" or ">>", else its last mention) in the last line before it,
    so the worked solution stays consistent up to its final step.
    """
    body, sep, tail = solution.rpartition("####")
    m = _FINAL.match(sep + tail)
    if not sep or m is None:
        return None
    final = m.group(1)
    try:
        value = Decimal(final.replace(",", ""))
    except InvalidOperation:
        return None
    wrong = _wrong_value(value, rng)
    places = len(final.split(".")[1]) if "." in final else 0
    # The solution may write the number with thousands separators or as money ("990.00"),
    # whatever "####" uses.
    forms = {
        _format_number(value, p, c): _format_number(wrong, p, c) for c in (False, True) for p in {places, 2}
    }
    forms[final] = _format_number(wrong, places, "," in final)

    lines = body.split("\n")
    idx = max((i for i, line in enumerate(lines) if line.strip()), default=None)
    if idx is not None:
        lines[idx] = _replace_result(lines[idx], forms)
    new_tail = tail.replace(final, forms[final], 1)
    return "\n".join(lines) + sep + new_tail


def _number_pattern(number: str) -> str:
    """`number` as a whole number: not part of a longer number."""
    return r"(?<![\d.,])" + re.escape(number) + r"(?![\d]|[.,]\d)"


def _replace_result(line: str, forms: dict[str, str]) -> str:
    """Replace the final answer (in any of its written forms) where the line states it as a result."""
    alternatives = "|".join(_number_pattern(old) for old in sorted(forms, key=len, reverse=True))
    results = re.compile(r"((?:=|>>)\s*\$?)(" + alternatives + ")")
    if results.search(line):
        return results.sub(lambda m: m.group(1) + forms[m.group(2)], line)
    mentions = list(re.finditer(alternatives, line))
    if not mentions:
        return line
    last = mentions[-1]
    return line[: last.start()] + forms[last.group(0)] + line[last.end() :]
