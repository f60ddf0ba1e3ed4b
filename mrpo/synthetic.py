"""The built-in synthetic preference task: small arithmetic, checkable by a program.

The chosen answer is right, the rejected one a near miss, worded the same way, so
a model can only prefer the chosen one by knowing the arithmetic. Deterministic
under a seed. Several wordings of prompts and answers keep it from being a
single template.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

OPERATIONS = ("+", "-", "*")
PROMPT_TEMPLATES = (
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "Calculate: {a} {op} {b}",
    "Q: {a} {op} {b} = ?",
)
ANSWER_TEMPLATES = (
    "{a} {op} {b} = {c}",
    "The answer is {c}.",
    "It is {c}.",
)
_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class ArithmeticItem:
    prompt: str
    chosen: str
    rejected: str
    answer: int
    wrong: int
    operation: str


def apply(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def near_miss(rng: random.Random, answer: int) -> int:
    """A plausible wrong answer: off by one, two or ten."""
    return answer + rng.choice((-10, -2, -1, 1, 2, 10))


def make_item(rng: random.Random, operations: tuple[str, ...] = OPERATIONS) -> ArithmeticItem:
    op = rng.choice(operations)
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        if op == "-" and b > a:
            a, b = b, a
    answer = apply(op, a, b)
    wrong = near_miss(rng, answer)
    prompt = rng.choice(PROMPT_TEMPLATES).format(a=a, op=op, b=b)
    template = rng.choice(ANSWER_TEMPLATES)
    return ArithmeticItem(
        prompt=prompt,
        chosen=template.format(a=a, op=op, b=b, c=answer),
        rejected=template.format(a=a, op=op, b=b, c=wrong),
        answer=answer,
        wrong=wrong,
        operation=op,
    )


def generate_pairs(n_pairs: int, seed: int, operations: tuple[str, ...] = OPERATIONS) -> list[dict]:
    """`n_pairs` distinct arithmetic preference pairs (dicts with prompt/chosen/rejected and the truth)."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    items: list[dict] = []
    attempts = 0
    while len(items) < n_pairs:
        attempts += 1
        if attempts > 50 * n_pairs:
            raise ValueError(f"cannot draw {n_pairs} distinct pairs for operations {operations}")
        item = make_item(rng, operations)
        if (item.prompt, item.chosen) in seen:
            continue
        seen.add((item.prompt, item.chosen))
        items.append(asdict(item))
    return items


def final_number(text: str) -> int | None:
    """The last integer in a model's answer: how a program checks a response."""
    found = _NUMBER.findall(text)
    return int(found[-1]) if found else None


def is_correct(prompt: str, response: str) -> bool:
    """True when the response's final number is the prompt's arithmetic result."""
    m = re.search(r"(\d+) ([-+*]) (\d+)", prompt)
    if m is None:
        raise ValueError(f"not a synthetic arithmetic prompt: {prompt!r}")
    return final_number(response) == apply(m.group(2), int(m.group(1)), int(m.group(3)))
