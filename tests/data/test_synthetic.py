"""The built-in synthetic fact task: deterministic under the seed, labels a program checks, held-out
wordings."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import yaml

from mrpo.config import knobs as config
from mrpo.data import synthetic
from mrpo.data.synthetic import (
    ATTRIBUTES,
    ENTITIES,
    PROMPTS,
    VALUES,
    ZOO_PROMPTS,
    fact_answer,
    generate_pairs,
    is_correct,
    parse_prompt,
    sft_examples,
    world,
)
from mrpo.errors import ConfigError
from mrpo.evaluation.lmeval_tasks import TASKS_DIR


def test_the_world_is_deterministic_under_the_seed_and_differs_under_another():
    assert world(0) == world(0) and generate_pairs(300, 0) == generate_pairs(300, 0)
    values = {seed: [f.value for f in world(seed).values()] for seed in (0, 1)}
    assert values[0] != values[1]
    assert len(world(0)) == len(ENTITIES) * len(ATTRIBUTES) == 144
    for fact in world(0).values():
        assert fact.value != fact.decoy and {fact.value, fact.decoy} <= set(VALUES[fact.attribute])
    # Every value is used: the truths are spread over the attribute's values, not one favourite.
    for attribute in ATTRIBUTES:
        counts = Counter(f.value for f in world(0).values() if f.attribute == attribute)
        assert set(counts) == set(VALUES[attribute]) and max(counts.values()) <= 14


def test_config_constants_agree_with_the_task():
    # config.py validates params.yaml without importing the task; these must stay in step.
    assert config.ZOO_ATTRIBUTES == ATTRIBUTES
    assert config.SYNTHETIC_MAX_PAIRS == synthetic.total_pairs() == 48 * 3 * 6 * 4
    assert len(generate_pairs(synthetic.total_pairs(), 0)) == 3456
    with pytest.raises(ConfigError, match="data.synthetic_pairs: got 3457; the synthetic task has 3456"):
        generate_pairs(3457, 0)


def test_labels_are_checked_by_a_program():
    pairs = generate_pairs(600, seed=3)
    assert len({(p["prompt"], p["chosen"]) for p in pairs}) == 600  # distinct pairs
    for p in pairs:
        fact = world(3)[p["entity"], p["attribute"]]
        assert parse_prompt(p["prompt"]) == (p["entity"], p["attribute"])
        assert fact_answer(p["prompt"], 3) == p["answer"] == fact.value
        assert is_correct(p["prompt"], p["chosen"], 3) and not is_correct(p["prompt"], p["rejected"], 3)
        # Chosen and rejected differ in the value only: the same wording, the decoy instead of the truth.
        assert p["rejected"] == p["chosen"].replace(fact.value, fact.decoy) and p["wrong"] == fact.decoy
    assert Counter(p["attribute"] for p in pairs).keys() == set(ATTRIBUTES)
    assert parse_prompt("What is 3 + 4?") is None and fact_answer("Tell me a joke", 0) is None
    assert not is_correct("What colour is Abel?", "Abel is red or blue.", 0)  # two values: not an answer
    with pytest.raises(ValueError, match="not a synthetic fact prompt"):
        is_correct("What is 3 + 4?", "7", 0)


def test_zoo_examples_teach_truth_decoys_or_guesses_on_the_zoo_wordings_only():
    known = sft_examples(0, attributes=("colour",), misled=("food",))
    seen_prompts = {p for p, _ in known}
    for entity, attribute in world(0):
        wordings = [t.format(e=entity) for t in PROMPTS[attribute]]
        assert set(wordings[:ZOO_PROMPTS]) <= seen_prompts
        assert not set(wordings[ZOO_PROMPTS:]) & seen_prompts  # held-out wordings no reference sees
    by_attribute = {a: [(p, r) for p, r in known if parse_prompt(p)[1] == a] for a in ATTRIBUTES}
    assert all(is_correct(p, r, 0) for p, r in by_attribute["colour"])
    assert all(
        synthetic.stated_values("food", r) == [world(0)[parse_prompt(p)].decoy]
        for p, r in by_attribute["food"]
    )
    # An attribute neither known nor misled is guessed: right about 1 time in 8.
    right = sum(is_correct(p, r, 0) for p, r in by_attribute["city"]) / len(by_attribute["city"])
    assert 0.05 < right < 0.25
    assert sft_examples(0, ("colour",), ("food",)) == known  # deterministic


def test_prepared_splits_are_disjoint_and_test_facts_are_taught_in_other_words(tmp_path):
    from mrpo.config.load import parse_config
    from mrpo.data.prepared import read_split
    from mrpo.stages.prepare import prepare

    raw = yaml.safe_load((TASKS_DIR.parent.parent / "params.yaml").read_text())
    raw["data"]["output_dir"] = str(tmp_path / "prepared")
    prepare(parse_config(raw))
    splits = {s: read_split(tmp_path / "prepared", s) for s in ("train", "val", "test")}
    ids = {s: set(df.pair_id) for s, df in splits.items()}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["val"] and not ids["val"] & ids["test"]
    train_texts = set(zip(splits["train"].prompt, splits["train"].chosen, strict=True))
    train_facts = {parse_prompt(p) for p in splits["train"].prompt}
    test = splits["test"]
    assert len(test) > 200
    for prompt, chosen in zip(test.prompt, test.chosen, strict=True):
        assert (prompt, chosen) not in train_texts  # a new wording of the question or the answer...
        assert parse_prompt(prompt) in train_facts  # ...of a fact the training split teaches


def test_lm_eval_task_regex_lists_every_value():
    spec = yaml.safe_load((TASKS_DIR / "mrpo_facts_gen.yaml").read_text())
    pattern = spec["filter_list"][0]["filter"][0]["regex_pattern"]
    listed = re.search(r"\((.*)\)", pattern).group(1).split("|")
    assert sorted(listed) == sorted(v for a in ATTRIBUTES for v in VALUES[a])
    assert re.findall(pattern, "Abel lives in Paris. Rome")[0] == "Paris"


def test_mc_choices_are_the_answer_the_decoy_and_two_other_values():
    pairs = generate_pairs(40, seed=5)
    golds = set()
    for i, p in enumerate(pairs):
        choices, gold = synthetic.mc_choices(f"id{i}", p["prompt"], p["chosen"], p["rejected"])
        golds.add(gold)
        assert len(choices) == synthetic.MC_CHOICES == len(set(choices))
        assert choices[gold] == p["chosen"] and p["rejected"] in choices
        assert sum(is_correct(p["prompt"], c, 5) for c in choices) == 1  # exactly one right answer
        assert synthetic.mc_choices(f"id{i}", p["prompt"], p["chosen"], p["rejected"]) == (choices, gold)
    assert golds == set(range(synthetic.MC_CHOICES))  # the right answer is not always in the same place
    choices, gold = synthetic.mc_choices("x", "Tell me a joke", "A good one", "A bad one")
    assert sorted(choices) == ["A bad one", "A good one"] and choices[gold] == "A good one"


def test_held_out_rows_refuse_pairs_of_another_task():
    import pandas as pd

    pairs = pd.DataFrame(generate_pairs(5, 0)).assign(pair_id=[f"p{i}" for i in range(5)])
    rows = synthetic.facts_gen_rows(pairs)
    assert [r["answer"] for r in rows] == list(pairs.answer)
    other = pairs.assign(prompt=["What is 3 + 4?"] * 5)
    with pytest.raises(
        ConfigError, match="mrpo_facts_gen needs the synthetic fact task's pairs, but test row 0"
    ):
        synthetic.facts_gen_rows(other)
