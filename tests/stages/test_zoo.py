"""The default profile's tiny model zoo: real checkpoints, different architectures and tokenizers, different
knowledge."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mrpo.config.load import parse_config
from mrpo.config.schema import ReferenceConfig, ZooMember
from mrpo.data.synthetic import generate_pairs
from mrpo.data.tokenization import encode_response
from mrpo.modeling.logprobs import collate_responses, response_logps
from mrpo.modeling.models import load_model, load_tokenizer, model_fingerprint
from mrpo.reporting.records import ZOO_MANIFEST as MANIFEST
from mrpo.stages.zoo import (
    DISABLED_MARKER,
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


def file_bytes(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_rebuilding_with_the_same_settings_writes_the_same_bytes_and_the_timings_apart(tiny_zoo, tmp_path):
    """The score stages depend on the zoo folder as a whole: a rebuild must leave every byte of it as it was
    (weights, safetensors header, config, tokenizer, manifest), with how long it took only in the metrics
    file. Both architectures and both tokenizers, rebuilt in one process."""
    cfg = tiny_zoo["cfg"]
    timings = json.loads(Path(cfg.zoo.metrics_file).read_text())
    assert set(timings["members"]) == {m.name for m in cfg.zoo.members}
    assert timings["seconds"] > 0 and all(t["seconds"] > 0 for t in timings["members"].values())
    assert timings["workers"] >= 1
    assert not Path(cfg.zoo.metrics_file).is_relative_to(tiny_zoo["output_dir"])

    members = tuple(m for m in cfg.zoo.members if m.name in ("anchor", "gpt2_char"))
    zoo = dataclasses.replace(
        cfg.zoo, members=members, output_dir=str(tmp_path / "zoo"), metrics_file=str(tmp_path / "zoo.json")
    )
    built = build_zoo(dataclasses.replace(cfg, zoo=zoo))
    again = file_bytes(tmp_path / "zoo")
    rebuilt = {k.split("/")[0] for k in again}
    assert rebuilt == {"anchor", "gpt2_char"}
    first = {k: v for k, v in file_bytes(tiny_zoo["output_dir"]).items() if k.split("/")[0] in rebuilt}
    assert {k.split("/", 1)[1] for k in again} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        MANIFEST,
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert again.keys() == first.keys()
    assert [k for k in again if again[k] != first[k]] == []
    # the timings: returned and in the metrics file, never in a member's manifest
    assert all(info["seconds"] > 0 for info in built)
    assert set(json.loads((tmp_path / "zoo.json").read_text())["members"]) == {"anchor", "gpt2_char"}
    assert all("seconds" not in json.loads(again[f"{m.name}/{MANIFEST}"]) for m in members)


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
                "metrics_file": str(tmp_path / "zoo.json"),
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
    zoo = dataclasses.replace(
        cfg.zoo, enabled=False, output_dir=str(out), metrics_file=str(tmp_path / "metrics" / "zoo.json")
    )
    assert build_zoo(dataclasses.replace(cfg, zoo=zoo)) == []
    assert [p.name for p in out.iterdir()] == [DISABLED_MARKER]
    # the declared DVC metric exists all the same: timings of nothing
    timings = json.loads((tmp_path / "metrics" / "zoo.json").read_text())
    assert timings == {"members": {}, "seconds": 0.0, "workers": 0}
