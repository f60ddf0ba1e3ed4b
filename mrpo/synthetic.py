"""The built-in synthetic preference task: small arithmetic, checkable by a program.

The chosen answer is right, the rejected one a near miss, worded the same way, so
a model can only prefer the chosen one by knowing the arithmetic. Deterministic
under a seed. Several wordings of prompts and answers keep it from being a
single template.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass

from mrpo.errors import ConfigError

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
NEAR_MISS_OFFSETS = (-10, -2, -1, 1, 2, 10)  # how far a near miss is from the right answer
MC_CHOICES = 4  # held-out multiple choice: chosen, rejected and two further near misses per question
_NUMBER = re.compile(r"-?\d+")
_ARITHMETIC = re.compile(r"(\d+) ([-+*]) (\d+)")


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
    return answer + rng.choice(NEAR_MISS_OFFSETS)


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
    answer = arithmetic_answer(prompt)
    if answer is None:
        raise ValueError(f"not a synthetic arithmetic prompt: {prompt!r}")
    return final_number(response) == answer


def arithmetic_answer(prompt: str) -> int | None:
    """The true result of a synthetic arithmetic prompt ("What is 3 + 4?" -> 7), or None for other prompts."""
    m = _ARITHMETIC.search(prompt)
    return apply(m.group(2), int(m.group(1)), int(m.group(3))) if m else None


def replace_final_number(text: str, value: int) -> str:
    """`text` with its last integer replaced by `value` (the answer slot of a synthetic response)."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        raise ValueError(f"no number in {text!r}")
    last = matches[-1]
    return text[: last.start()] + str(value) + text[last.end() :]


# ---------------------------------------------------------------- held-out benchmark items (lm-eval tasks)


def arith_gen_rows(pairs) -> list[dict]:
    """{"pair_id", "prompt", "answer"} per test pair; every prompt must be synthetic arithmetic."""
    rows = []
    for i, (pid, prompt) in enumerate(zip(pairs["pair_id"], pairs["prompt"], strict=True)):
        answer = arithmetic_answer(prompt)
        if answer is None:
            raise ConfigError(
                f"evaluate.tasks: mrpo_arith_gen needs synthetic arithmetic prompts, but test row {i} "
                f"(pair_id {pid}) has {prompt[:80]!r}; "
                "use it with data.source: synthetic or drop it from evaluate.tasks"
            )
        rows.append({"pair_id": pid, "prompt": prompt, "answer": str(answer)})
    return rows


def mc_choices(
    pair_id: str, prompt: str, chosen: str, rejected: str, n_choices: int = MC_CHOICES
) -> tuple[list[str], int]:
    """(choices, index of the right one): the chosen response, the rejected one and further near misses.

    Near misses re-use the chosen response's wording with its final number moved by
    one of the offsets the synthetic task uses, so only the arithmetic tells them
    apart. Non-arithmetic pairs get just chosen vs rejected. Order is shuffled with
    a seed from the pair id (deterministic; the right answer is not always first,
    which matters because lm-eval breaks ties towards the first choice).
    """
    rng = random.Random(int(hashlib.sha256(pair_id.encode()).hexdigest()[:8], 16))
    choices = [chosen, rejected]
    answer = arithmetic_answer(prompt)
    if answer is not None and _NUMBER.search(chosen):
        offsets = list(NEAR_MISS_OFFSETS)
        rng.shuffle(offsets)
        for offset in offsets:
            if len(choices) >= n_choices:
                break
            candidate = replace_final_number(chosen, answer + offset)
            if candidate not in choices:
                choices.append(candidate)
    order = list(range(len(choices)))
    rng.shuffle(order)
    return [choices[i] for i in order], order.index(0)


def arith_mc_rows(pairs) -> list[dict]:
    """{"pair_id", "prompt", "choices", "gold"} per test pair."""
    rows = []
    for pid, prompt, chosen, rejected in zip(
        pairs["pair_id"], pairs["prompt"], pairs["chosen"], pairs["rejected"], strict=True
    ):
        choices, gold = mc_choices(pid, prompt, chosen, rejected)
        rows.append({"pair_id": pid, "prompt": prompt, "choices": choices, "gold": gold})
    return rows
