"""The default profile's tiny model zoo: real checkpoints, different architectures and tokenizers, different
knowledge."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from mrpo.config import ReferenceConfig, ZooMember, parse_config
from mrpo.models import collate_responses, load_model, load_tokenizer, model_fingerprint, response_logps
from mrpo.synthetic import generate_pairs
from mrpo.tokenization import encode_response
from mrpo.zoo import (
    DISABLED_MARKER,
    MANIFEST,
    build_member,
    build_model,
    build_tokenizer,
    build_zoo,
    member_seed,
)

KNOWLEDGE_STEPS = 300


def margins(tiny_zoo, name: str, pairs: list[dict]) -> np.ndarray:
    """log p(chosen) - log p(rejected) per pair under one zoo member."""
    ref = ReferenceConfig(name, str(tiny_zoo["members"][name]))
    tokenizer, model = load_tokenizer(ref), load_model(ref)
    enc = [
        encode_response(tokenizer, p["prompt"], p[side], 256, chat_template=False)
        for side in ("chosen", "rejected")
        for p in pairs
    ]
    with torch.inference_mode():
        logps = response_logps(model, **collate_responses(enc, tokenizer.pad_token_id)).double().numpy()
    return logps[: len(pairs)] - logps[len(pairs) :]


def test_every_member_is_a_real_safetensors_checkpoint_with_its_own_tokenizer(tiny_zoo):
    cfg = tiny_zoo["cfg"]
    assert [m.name for m in cfg.zoo.members] == ["anchor", "gpt2_char", "llama_expert"]
    manifests = {}
    for member in cfg.zoo.members:
        path = tiny_zoo["members"][member.name]
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
        assert not list(path.glob("*.bin"))
        manifests[member.name] = json.loads((path / MANIFEST).read_text())
        m = manifests[member.name]
        assert (m["architecture"], m["tokenizer"]) == (member.architecture, member.tokenizer)
        assert (m["attributes"], m["misled"]) == (list(member.attributes), list(member.misled))
        # The short SFT really learned something: the loss on chosen responses fell a lot.
        assert m["final_loss"] < 0.6 * m["first_loss"]
    assert manifests["gpt2_char"]["vocab_size"] < manifests["anchor"]["vocab_size"]
    assert not list(tiny_zoo["output_dir"].glob(".*tmp*"))  # no half-built leftovers
    assert tiny_zoo["seconds"] < 120, f"tiny zoo took {tiny_zoo['seconds']:.0f}s"


def test_members_prefer_differently(tiny_zoo):
    pairs = generate_pairs(240, seed=tiny_zoo["cfg"].seed)
    m = {name: margins(tiny_zoo, name, pairs) for name in ("anchor", "gpt2_char", "llama_expert")}
    # Their per-pair preferences are genuinely different signals, not rescaled copies of one another.
    for a, b in (("anchor", "gpt2_char"), ("anchor", "llama_expert"), ("gpt2_char", "llama_expert")):
        assert abs(np.corrcoef(m[a], m[b])[0, 1]) < 0.9, (a, b)


@pytest.mark.slow
def test_members_know_what_they_were_taught_and_guess_the_rest(tmp_path):
    """Three members that differ only in what they learned about foods: the truth, the decoys, nothing."""
    cfg = parse_config(
        {
            "zoo": {
                "output_dir": str(tmp_path / "zoo"),
                "members": {
                    "knows": {"train_steps": KNOWLEDGE_STEPS, "attributes": ["food"]},
                    "misled": {"train_steps": KNOWLEDGE_STEPS, "attributes": [], "misled": ["food"]},
                    "guesses": {"train_steps": KNOWLEDGE_STEPS, "attributes": ["colour"]},
                },
            },
            "references": {"knows": {"model": "x"}},
        }
    )
    build_zoo(cfg)
    food = [p for p in generate_pairs(3456, cfg.seed) if p["attribute"] == "food"][:200]
    zoo = {"members": {name: tmp_path / "zoo" / name for name in ("knows", "misled", "guesses")}}
    acc = {name: float((margins(zoo, name, food) > 0).mean()) for name in zoo["members"]}
    assert acc["knows"] > 0.8 and acc["misled"] < 0.2 and 0.3 < acc["guesses"] < 0.7, acc


def test_a_member_is_deterministic_under_the_seed_and_differs_under_another(tmp_path):
    member = ZooMember(
        "tiny",
        architecture="gpt2",
        tokenizer="bpe",
        hidden_size=32,
        num_layers=1,
        train_steps=3,
        attributes=("colour",),
    )
    first = build_member(member, 7, tmp_path / "a")
    again = build_member(member, 7, tmp_path / "b")
    other = build_member(member, 8, tmp_path / "c")
    fp = {
        k: model_fingerprint(ReferenceConfig("tiny", str(tmp_path / k / "tiny")))["content_hash"]
        for k in "abc"
    }
    assert fp["a"] == fp["b"] and fp["a"] != fp["c"]
    assert first["final_loss"] == again["final_loss"] != other["final_loss"]
    assert member_seed(7, "tiny") != member_seed(7, "other")
    # Rebuilding into the same place replaces it atomically, leaving no temp or old directory.
    build_member(member, 7, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["tiny"]
    assert model_fingerprint(ReferenceConfig("tiny", str(tmp_path / "a" / "tiny")))["content_hash"] == fp["a"]


def test_tokenizers_round_trip_any_text_and_the_char_one_is_one_token_per_character():
    char, bpe = build_tokenizer("char", 0), build_tokenizer("bpe", 0)
    text = "What colour is Abel?\nAbel is red, 17 * 23."
    assert len(char(text, add_special_tokens=False)["input_ids"]) == len(text)
    assert char.decode(char(text, add_special_tokens=False)["input_ids"]) == text
    unusual = "Ünïcode ✓ and emoji 🙂"  # byte-level BPE still encodes it losslessly
    assert bpe.decode(bpe(unusual, add_special_tokens=False)["input_ids"]) == unusual
    assert len(bpe(text, add_special_tokens=False)["input_ids"]) < len(text)
    with pytest.raises(ValueError, match="unknown zoo tokenizer kind 'word'"):
        build_tokenizer("word", 0)
    with pytest.raises(ValueError, match="unknown zoo architecture 'mamba'"):
        build_model(ZooMember("x", architecture="mamba"), char, 0)


def test_disabled_zoo_writes_only_a_marker(tiny_zoo, tmp_path):
    cfg = tiny_zoo["cfg"]
    out = tmp_path / "zoo"
    disabled = dataclasses.replace(cfg, zoo=dataclasses.replace(cfg.zoo, enabled=False, output_dir=str(out)))
    assert build_zoo(disabled) == []
    assert [p.name for p in out.iterdir()] == [DISABLED_MARKER]
