"""The built-in synthetic preference task: facts about made-up characters, checkable by a program.

A small world of facts, drawn from the seed: each of `ENTITIES` has a colour, a
home city and a food (`ATTRIBUTES`), and for each fact one plausible wrong value,
its *decoy* (a "common misconception"). A preference pair asks for one fact in one
of several wordings; the chosen answer states the true value, the rejected one the
decoy, in the same words, so only knowing the fact tells them apart.

A tiny model can memorise 144 facts, so the preference is learnable: the prepared
test pairs are new (prompt, answer) wordings of facts whose other wordings are in
the training split. The zoo (mrpo/stages/zoo.py) teaches each reference a different part
of the world: `attributes` it knows, `misled` ones it learned the decoys for.
The zoo only ever sees `ZOO_PROMPTS` of the prompt wordings; the rest are wordings
no reference was trained on. Deterministic under the seed; no network.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache

from mrpo.errors import ConfigError

# Made-up names (no meaning a reader or tokenizer brings along); fixed, only the facts depend on the seed.
ENTITIES = (
    "Abel", "Bodo", "Cira", "Dax", "Elan", "Fenn", "Gilo", "Hana",
    "Ivo", "Jola", "Kem", "Lio", "Mara", "Nox", "Orin", "Pim",
    "Quin", "Rasa", "Sol", "Tavi", "Ulla", "Vex", "Wren", "Xan",
    "Yara", "Zeb", "Ari", "Brin", "Cato", "Dune", "Esme", "Fay",
    "Gus", "Hux", "Isla", "Jem", "Kai", "Luz", "Milo", "Nia",
    "Odo", "Pia", "Rex", "Suki", "Teo", "Uma", "Vito", "Zia",
)  # fmt: skip
ATTRIBUTES = ("colour", "city", "food")
VALUES = {
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black"),
    "city": ("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Rome", "Quito"),
    "food": ("rice", "bread", "fish", "apples", "cheese", "beans", "soup", "nuts"),
}
PROMPTS = {
    "colour": (
        "What colour is {e}?",
        "Tell me the colour of {e}.",
        "{e} is which colour?",
        "Q: colour of {e}?",
        "Which colour does {e} have?",
        "Name the colour of {e}.",
    ),
    "city": (
        "Where does {e} live?",
        "Tell me the home city of {e}.",
        "{e} lives in which city?",
        "Q: city of {e}?",
        "Which city is home to {e}?",
        "Name the city {e} lives in.",
    ),
    "food": (
        "What does {e} eat?",
        "Tell me the food of {e}.",
        "{e} eats what?",
        "Q: food of {e}?",
        "Which food does {e} like?",
        "Name the food {e} eats.",
    ),
}
ANSWERS = {
    "colour": ("{e} is {v}.", "The colour of {e} is {v}.", "It is {v}.", "{v}."),
    "city": ("{e} lives in {v}.", "The home of {e} is {v}.", "In {v}.", "{v}."),
    "food": ("{e} eats {v}.", "The food of {e} is {v}.", "It eats {v}.", "{v}."),
}
ZOO_PROMPTS = 4  # the zoo learns from the first 4 prompt wordings; the last 2 are new to every reference
MC_CHOICES = 4  # held-out multiple choice: the true value, the decoy and two further wrong values


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str  # the truth
    decoy: str  # the wrong value the rejected answers state and `misled` references learn


@lru_cache(maxsize=8)
def world(seed: int) -> dict[tuple[str, str], Fact]:
    """(entity, attribute) -> Fact: every fact of the world, drawn from `seed`."""
    rng = random.Random(f"mrpo-facts:{seed}")
    facts = {}
    for entity in ENTITIES:
        for attribute in ATTRIBUTES:
            value, decoy = rng.sample(VALUES[attribute], 2)
            facts[entity, attribute] = Fact(entity, attribute, value, decoy)
    return facts


def total_pairs() -> int:
    """How many distinct pairs the task has: one per fact, prompt wording and answer wording."""
    return sum(len(ENTITIES) * len(PROMPTS[a]) * len(ANSWERS[a]) for a in ATTRIBUTES)


def _pair(fact: Fact, prompt_index: int, answer_index: int, wrong: str) -> dict:
    prompt = PROMPTS[fact.attribute][prompt_index].format(e=fact.entity)
    answer = ANSWERS[fact.attribute][answer_index]
    return {
        "prompt": prompt,
        "chosen": answer.format(e=fact.entity, v=fact.value),
        "rejected": answer.format(e=fact.entity, v=wrong),
        "entity": fact.entity,
        "attribute": fact.attribute,
        "answer": fact.value,
        "wrong": wrong,
    }


def generate_pairs(n_pairs: int, seed: int) -> list[dict]:
    """`n_pairs` distinct preference pairs, drawn without replacement (dicts with prompt/chosen/rejected and
    the fact: entity, attribute, answer, wrong)."""
    combos = [
        (key, p, a)
        for key in world(seed)
        for p in range(len(PROMPTS[key[1]]))
        for a in range(len(ANSWERS[key[1]]))
    ]
    if not 0 <= n_pairs <= len(combos):
        raise ConfigError(
            f"data.synthetic_pairs: got {n_pairs}; the synthetic task has {len(combos)} distinct pairs, "
            f"so use at most {len(combos)}"
        )
    facts = world(seed)
    rng = random.Random(f"mrpo-pairs:{seed}")
    return [_pair(facts[key], p, a, facts[key].decoy) for key, p, a in rng.sample(combos, n_pairs)]


def sft_examples(seed: int, attributes, misled=()) -> list[tuple[str, str]]:
    """(prompt, response) for a zoo member: the truth for `attributes`, the decoy for `misled`, and for any
    other attribute a value drawn at random per example, so the member knows how those questions are asked
    and answered but not the answers (its preference there is a coin flip, not an unseen wording).

    Only the first ZOO_PROMPTS prompt wordings, every answer wording; in a fixed order (the caller shuffles).
    """
    rng = random.Random(f"mrpo-guesses:{seed}")
    examples = []
    for (entity, attribute), fact in world(seed).items():
        for prompt in PROMPTS[attribute][:ZOO_PROMPTS]:
            for answer in ANSWERS[attribute]:
                if attribute in attributes:
                    value = fact.value
                elif attribute in misled:
                    value = fact.decoy
                else:
                    value = rng.choice(VALUES[attribute])
                examples.append((prompt.format(e=entity), answer.format(e=entity, v=value)))
    return examples


# ---------------------------------------------------------------- the program checks


@lru_cache(maxsize=1)
def _prompt_patterns() -> list[tuple[re.Pattern, str]]:
    names = "|".join(ENTITIES)
    return [
        (re.compile("^" + re.escape(t).replace(re.escape("{e}"), f"(?P<e>{names})") + "$"), attribute)
        for attribute in ATTRIBUTES
        for t in PROMPTS[attribute]
    ]


def parse_prompt(prompt: str) -> tuple[str, str] | None:
    """(entity, attribute) a synthetic prompt asks about ("What colour is Abel?" -> ("Abel", "colour")), or
    None."""
    for pattern, attribute in _prompt_patterns():
        m = pattern.match(prompt.strip())
        if m:
            return m.group("e"), attribute
    return None


def fact_answer(prompt: str, seed: int) -> str | None:
    """The true value a synthetic prompt asks for under `seed`, or None for other prompts."""
    parsed = parse_prompt(prompt)
    return world(seed)[parsed].value if parsed else None


def stated_values(attribute: str, response: str) -> list[str]:
    """The values of `attribute` a response states, in order (whole words)."""
    return re.findall(r"\b(" + "|".join(VALUES[attribute]) + r")\b", response)


def first_value(response: str) -> str | None:
    """The first value of any attribute a reply states: what the mrpo_facts_gen task scores (its regex)."""
    found = re.search(r"\b(" + "|".join(v for a in ATTRIBUTES for v in VALUES[a]) + r")\b", response)
    return found.group(1) if found else None


def is_correct(prompt: str, response: str, seed: int) -> bool:
    """True when the response states the prompt's true value and no other value of that attribute."""
    parsed = parse_prompt(prompt)
    if parsed is None:
        raise ValueError(f"not a synthetic fact prompt: {prompt!r}")
    return set(stated_values(parsed[1], response)) == {world(seed)[parsed].value}


# ---------------------------------------------------------------- held-out benchmark items (lm-eval tasks)


def _fact_of_pair(i: int, pid: str, prompt: str, chosen: str, task: str) -> tuple[str, str]:
    """(attribute, true value) of a test pair, read from its prompt and chosen answer."""
    parsed = parse_prompt(prompt)
    values = stated_values(parsed[1], chosen) if parsed else []
    if len(values) != 1:
        raise ConfigError(
            f"evaluate.tasks: {task} needs the synthetic fact task's pairs, but test row {i} (pair_id {pid}) "
            f"has {prompt[:80]!r}; use it with data.source: synthetic or drop it from evaluate.tasks"
        )
    return parsed[1], values[0]


def facts_gen_rows(pairs) -> list[dict]:
    """{"pair_id", "prompt", "answer"} per test pair: the value the chosen answer states."""
    rows = []
    for i, (pid, prompt, chosen) in enumerate(
        zip(pairs["pair_id"], pairs["prompt"], pairs["chosen"], strict=True)
    ):
        _, value = _fact_of_pair(i, pid, prompt, chosen, "mrpo_facts_gen")
        rows.append({"pair_id": pid, "prompt": prompt, "answer": value})
    return rows


def mc_choices(
    pair_id: str, prompt: str, chosen: str, rejected: str, n_choices: int = MC_CHOICES
) -> tuple[list[str], int]:
    """(choices, index of the right one): the chosen answer, the rejected one and further wrong values.

    The further choices re-use the chosen answer's wording with another value of the
    same attribute, so only the fact tells them apart. Non-synthetic pairs get just
    chosen vs rejected. Order is shuffled with a seed from the pair id (deterministic;
    the right answer is not always first, which matters because lm-eval breaks ties
    towards the first choice).
    """
    rng = random.Random(int(hashlib.sha256(pair_id.encode()).hexdigest()[:8], 16))
    choices = [chosen, rejected]
    parsed = parse_prompt(prompt)
    values = stated_values(parsed[1], chosen) if parsed else []
    if len(values) == 1:
        others = [v for v in VALUES[parsed[1]] if v != values[0]]
        rng.shuffle(others)
        for value in others:
            if len(choices) >= n_choices:
                break
            candidate = re.sub(r"\b" + values[0] + r"\b", value, chosen)
            if candidate not in choices:
                choices.append(candidate)
    order = list(range(len(choices)))
    rng.shuffle(order)
    return [choices[i] for i in order], order.index(0)


def facts_mc_rows(pairs) -> list[dict]:
    """{"pair_id", "prompt", "choices", "gold"} per test pair."""
    rows = []
    for pid, prompt, chosen, rejected in zip(
        pairs["pair_id"], pairs["prompt"], pairs["chosen"], pairs["rejected"], strict=True
    ):
        choices, gold = mc_choices(pid, prompt, chosen, rejected)
        rows.append({"pair_id": pid, "prompt": prompt, "choices": choices, "gold": gold})
    return rows
