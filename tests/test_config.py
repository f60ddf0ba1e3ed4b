"""params.yaml is validated once, at the edge: each bad value gets a message naming the key, the value and the rule."""

import copy
from pathlib import Path

import pytest
import yaml

from mrpo.config import ConfigError, config_to_flat_dict, load_config, parse_config, read_params

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture(scope="module")
def raw():
    return read_params(PARAMS)


def with_(raw, dotted, value):
    out = copy.deepcopy(raw)
    node = out
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return out


def test_default_profile_parses(raw):
    cfg = parse_config(raw)
    assert [r.name for r in cfg.references] == ["anchor", "gpt2_char", "llama_mul"]
    assert cfg.anchor.name == "anchor"
    assert cfg.train.beta == 0.1 and cfg.train.epsilon == 0.1 and cfg.train.strategy == "uniform"
    assert config_to_flat_dict(cfg)["train.beta"] == 0.1


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.beta", 0, "train.beta: got 0; must be > 0"),
        ("train.beta", -0.5, "train.beta: got -0.5; must be > 0"),
        ("train.epsilon", 1.0, r"train.epsilon: got 1.0; must be in \[0, 1\)"),
        ("train.epsilon", -0.1, r"train.epsilon: got -0.1; must be in \[0, 1\)"),
        ("train.loss_type", "kto", "train.loss_type: got 'kto'; allowed: sigmoid, ipo, ipo_norm, hinge"),
        (
            "train.strategy",
            "best",
            "train.strategy: got 'best'; allowed: uniform, fixed, arwc, vdw, vaw, window, thompson",
        ),
        ("train.objective", "ppo", "train.objective: got 'ppo'; allowed: mrpo, dpo, multi_dpo"),
    ],
)
def test_bad_scalar_values(raw, key, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(with_(raw, key, value))


def test_fixed_weights_wrong_length_or_negative(raw):
    fixed = with_(raw, "train.strategy", "fixed")
    with pytest.raises(
        ConfigError, match=r"train.fixed_weights: got \[0.5, 0.5\]; strategy 'fixed' needs exactly 3 weights"
    ):
        parse_config(with_(fixed, "train.fixed_weights", [0.5, 0.5]))
    with pytest.raises(
        ConfigError, match=r"train.fixed_weights: got None; strategy 'fixed' needs exactly 3 weights"
    ):
        parse_config(fixed)
    with pytest.raises(
        ConfigError, match=r"train.fixed_weights: got \[1, -1, 1\]; weights must be non-negative"
    ):
        parse_config(with_(fixed, "train.fixed_weights", [1, -1, 1]))
    assert parse_config(with_(fixed, "train.fixed_weights", [1, 0, 3])).train.fixed_weights == (1, 0, 3)


def test_zero_references(raw):
    with pytest.raises(ConfigError, match="references: at least one reference is required"):
        parse_config(with_(raw, "references", {}))


def test_duplicate_reference_names(raw, tmp_path):
    as_list = with_(raw, "references", [{"name": "anchor", "model": "a"}, {"name": "anchor", "model": "b"}])
    with pytest.raises(ConfigError, match="references: duplicate reference name 'anchor'"):
        parse_config(as_list)
    # in the mapping form a repeated name is a repeated YAML key, which YAML would silently collapse
    text = "references:\n  anchor:\n    model: a\n  anchor:\n    model: b\n"
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match="duplicate key 'anchor' at line 4"):
        load_config(tmp_path / "params.yaml")


def test_unknown_key_is_named(raw):
    with pytest.raises(ConfigError, match="train.bta"):
        parse_config(with_(raw, "train.bta", 0.1))


def test_overrides_are_validated_too(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(read_params(PARAMS)))
    assert load_config(path, {"train.beta": 0.3}).train.beta == 0.3
    with pytest.raises(ConfigError, match="train.beta: got -1"):
        load_config(path, {"train.beta": -1})


@pytest.mark.parametrize("profile", sorted((PARAMS.parent / "profiles").glob("*.yaml")), ids=lambda p: p.name)
def test_documented_profiles_are_valid(profile):
    cfg = load_config(profile)
    assert len(cfg.references) >= 2
    assert cfg.anchor.name == next(iter(read_params(profile)["references"]))
