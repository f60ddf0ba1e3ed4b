"""Reading params.yaml into a Config: a YAML loader that refuses duplicate keys, profile overlays, `--set`
overrides, and typed parsing that checks each field against its annotation and its knob's bounds and choices.
The rules that tie fields together are mrpo.config.rules.

Every error is a ConfigError naming the key, the bad value and what is allowed, so a user can fix params.yaml
without reading code.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from mrpo.config.knobs import MEMORY_DEVICES
from mrpo.config.rules import check, one_of, validate
from mrpo.config.schema import (
    Config,
    LoraConfig,
    PushToHubConfig,
    ReferenceConfig,
    SftConfig,
    SftDataConfig,
    TrainConfig,
    ZooConfig,
    ZooMember,
    field_at,
    section_class,
)
from mrpo.config.yamlfile import parse_yaml_value as parse_yaml_value  # re-exported: its old home
from mrpo.config.yamlfile import read_yaml_mapping
from mrpo.errors import ConfigError, quote

OVERLAY_KEY = "extends"  # an overlay's base file, relative to the overlay (profiles/*.yaml: ../params.yaml)
PROFILE_KEY = "profile"  # written by `mrpo profile apply`: which overlay params.yaml holds


def read_params(path: str | Path = "params.yaml") -> dict:
    """The settings of a params file; an overlay (a file with `extends: <base>`) merged onto its base."""
    raw = read_yaml_mapping(path)
    if OVERLAY_KEY not in raw:
        return raw
    base_path = Path(path).parent / str(raw.pop(OVERLAY_KEY))
    base = read_params(base_path)
    if PROFILE_KEY in base:
        raise ConfigError(
            f"{path}: extends {base_path}, which already holds profile {base[PROFILE_KEY]!r}; restore the "
            "default first (git checkout params.yaml)"
        )
    return merge_overlay(base, raw)


def merge_overlay(base: MutableMapping, overlay: Mapping, prefix: str = "") -> MutableMapping:
    """`base` with `overlay`'s values in place (in place: a round-trip YAML document keeps its comments).
    A section (data, train, train.lora, ...) is merged key by key; any other value, a named collection
    (references, zoo.members) or a mapping setting (evaluate.task_data) included, is replaced whole."""
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        f = field_at(dotted)
        section = f is not None and section_class(f.type) is not None and not f.type.startswith("tuple[")
        if section and isinstance(value, Mapping) and isinstance(base.get(key), MutableMapping):
            merge_overlay(base[key], value, dotted + ".")
        else:
            base[key] = value
    return base


def load_config(path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate params.yaml; `overrides` maps dotted keys to values (e.g. {"train.beta": 0.2})."""
    raw = read_params(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return parse_config(raw)


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, last = dotted.split(".")
    if not all(parents + [last]):
        raise ConfigError(f"--set {dotted}: empty key part; write it as section.key, e.g. train.beta")
    for i, key in enumerate(parents):
        child = node.setdefault(key, {})
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError(f"--set {dotted}: {where} is {quote(child)}, not a section with keys")
        node = child
    node[last] = value


def parse_config(raw: Mapping[str, Any]) -> Config:
    """A Config from params.yaml's settings: each field typed and checked against its knob, then the rules."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"params: expected a mapping of sections at the top level, got {quote(raw)}")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    _reject_unknown(raw, set(fields) | {"paths", PROFILE_KEY}, "")
    seed = _field(fields["seed"], raw.get("seed", 0), "seed")
    references = _references(raw.get("references"))
    parsers = {"zoo": _zoo, "train": _train, "sft": _sft}
    sections = {
        name: parsers[name](raw.get(name))
        if name in parsers
        else _section(section_class(f.type), raw.get(name), name)
        for name, f in fields.items()
        if name not in ("seed", "references")
    }
    cfg = Config(seed=seed, references=references, **sections)
    validate(cfg)
    return cfg


def _reject_unknown(raw: Mapping[str, Any], known: set[str], prefix: str) -> None:
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key; allowed: {sorted(known)}")


def _mapping(raw: Any, prefix: str) -> dict:
    """A section's settings as a dict:
    null (or an empty section) is {}, anything but a mapping is an error."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of settings (key: value lines), got {quote(raw)}")
    return dict(raw)


def _describe(annotation: str) -> str:
    base = annotation.removesuffix(" | None")
    text = {
        "bool": "true or false",
        "int": "an integer",
        "float": "a finite number",
        "str": "a non-empty string",
        "tuple[str, ...]": "a list of strings, e.g. [a, b]",
        "tuple[float, ...]": "a list of finite numbers, e.g. [1, 0.5]",
        "tuple[int, ...]": "a list of integers, e.g. [0, 1]",
        "Mapping[str, str]": "a mapping of names to strings, e.g. {name: value}",
    }[base]
    return text + (" or null" if annotation.endswith(" | None") else "")


def _typed(value: Any, annotation: str, key: str) -> Any:
    """`value` checked against the field's annotation (the dataclass's own type, as a string);
    lists become tuples."""
    base = annotation.removesuffix(" | None")
    if value is None:
        if annotation.endswith(" | None"):
            return None
        raise ConfigError(f"{key}: got null; expected {_describe(annotation)}")

    def bad(hint: str = "") -> ConfigError:
        return ConfigError(f"{key}: expected {_describe(annotation)}, got {quote(value)}{hint}")

    if base == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if base in ("int", "float"):
        return _number(value, base, key, bad)
    if base == "str":
        if not isinstance(value, str):
            raise bad(
                " (quote it in params.yaml to make it a string)" if isinstance(value, int | float) else ""
            )
        if not value.strip():
            raise ConfigError(f"{key}: got {quote(value)}; must be a non-empty string")
        return value
    if base.startswith("tuple["):
        if isinstance(value, str):
            raise bad(f"; a single value is written as a list: [{value}]")
        if not isinstance(value, list | tuple):
            raise bad()
        item = base.removeprefix("tuple[").removesuffix(", ...]")
        return tuple(_typed(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if base == "Mapping[str, str]":
        if not isinstance(value, Mapping):
            raise bad()
        return {_typed(k, "str", f"{key} (a name)"): _typed(v, "str", f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"{key}: no check for annotation {annotation!r}")  # a new field type: add it above


def _number(value: Any, base: str, key: str, bad) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad()
    if not math.isfinite(value):
        raise ConfigError(f"{key}: got {quote(value)}; must be a finite number")
    if base == "int" and isinstance(value, float):
        if not value.is_integer():
            raise bad()
        value = int(value)
    return value


_BOUND = re.compile(
    r"in (?P<lo_b>[\[(])(?P<lo>[-\d.e]+), (?P<hi>[-\d.e]+)(?P<hi_b>[\])])"
    r"|(?P<op>>=|<=|>|<) (?P<x>[-\d.e]+)|(?P<eq>-?[\d.e]+)"
)
_OPS = {">=": float.__ge__, ">": float.__gt__, "<=": float.__le__, "<": float.__lt__}


def _within(value: float, bound: str) -> bool:
    """Whether `value` meets a knob's bound: alternatives joined by " or " (outside parentheses), each
    "in [a, b)" (brackets inclusive), "OP x" or a number it may equal; any text after them is prose."""
    for alternative in re.split(r" or (?![^(]*\))", bound):
        m = _BOUND.match(alternative)
        if m is None:
            raise ValueError(f"bound {bound!r}: cannot read {alternative!r}")  # a schema typo: fix the knob
        v = float(value)
        if m["op"] and _OPS[m["op"]](v, float(m["x"])):
            return True
        if m["eq"] and v == float(m["eq"]):
            return True
        if m["lo_b"]:
            lo, hi = float(m["lo"]), float(m["hi"])
            if (lo <= v if m["lo_b"] == "[" else lo < v) and (v <= hi if m["hi_b"] == "]" else v < hi):
                return True
    return False


def check_knob(f: dataclasses.Field, value: Any, key: str) -> None:
    """A typed value against its field's bounds and choices (those of each item, for a list)."""
    if value is None:
        return
    optional = " or null" if f.type.endswith(" | None") else ""
    for bound in f.metadata.get("bounds", ()):
        check(_within(value, bound), key, value, f"must be {bound}{optional}")
    choices = f.metadata.get("choices", ())
    if choices:
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        indexed = f.metadata.get("indexed")
        for i, item in items:
            one_of(item, f"{key}[{i}]" if indexed and i is not None else key, choices)


def _field(f: dataclasses.Field, value: Any, key: str) -> Any:
    typed = _typed(value, f.type, key)
    check_knob(f, typed, key)
    return typed


def _section(cls, raw: Any, prefix: str, **fixed):
    raw = _mapping(raw, prefix)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, set(fields) - set(fixed), prefix + ".")
    values = {name: _field(fields[name], value, f"{prefix}.{name}") for name, value in raw.items()}
    values.update(fixed)
    return cls(**values)


def _references(raw: Any) -> tuple[ReferenceConfig, ...]:
    """Accept a mapping name -> settings (DVC foreach friendly) or a list of settings with `name`."""
    if raw is None or (isinstance(raw, Mapping | list) and len(raw) == 0):
        raise ConfigError("references: at least one reference is required (the first one is the anchor)")
    if isinstance(raw, Mapping):
        items = [(name, spec) for name, spec in raw.items()]
    elif isinstance(raw, list):
        items = []
        for i, spec in enumerate(raw):
            if not isinstance(spec, Mapping) or "name" not in spec:
                raise ConfigError(f"references[{i}]: expected a mapping with a 'name', got {quote(spec)}")
            items.append((spec["name"], {k: v for k, v in spec.items() if k != "name"}))
    else:
        raise ConfigError(f"references: expected a mapping of name -> settings, got {quote(raw)}")
    seen: set[str] = set()
    refs = []
    for name, spec in items:
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"references: name {quote(name)} must be non-empty letters, digits, '-' or '_'")
        if name in seen:
            raise ConfigError(f"references: duplicate reference name {quote(name)}; names must be unique")
        seen.add(name)
        if isinstance(spec, str):
            spec = {"model": spec}
        if not isinstance(spec, Mapping) or not spec.get("model"):
            raise ConfigError(f"references.{name}.model: required (a hub id, local directory or .gguf file)")
        spec = dict(spec)
        max_memory = _max_memory(spec.pop("max_memory", None), f"references.{name}.max_memory")
        refs.append(_section(ReferenceConfig, spec, f"references.{name}", name=name, max_memory=max_memory))
    return tuple(refs)


_MEMORY_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B)$", re.IGNORECASE)


def _max_memory(raw: Any, key: str) -> dict[str, int | str] | None:
    """accelerate's max_memory: device -> bytes (an integer) or a size with a unit ("70GiB", "500MB")."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(
            f"{key}: expected a mapping of device to size, e.g. {{0: 70GiB, cpu: 200GiB}}, got {quote(raw)}"
        )
    out: dict[str, int | str] = {}
    for device, size in raw.items():
        name = str(device)
        if not (name.isdigit() or name in MEMORY_DEVICES):
            raise ConfigError(
                f"{key}: device {quote(device)} is not a GPU index (0, 1, ...) "
                f"or one of {', '.join(MEMORY_DEVICES)}"
            )
        ok_int = isinstance(size, int) and not isinstance(size, bool) and size > 0
        if not (ok_int or (isinstance(size, str) and _MEMORY_SIZE.match(size.strip()))):
            raise ConfigError(
                f"{key}.{name}: got {quote(size)}; expected a positive number of bytes or a size with a unit,"
                " "
                "e.g. 70GiB or 500MB"
            )
        out[name] = size.strip() if isinstance(size, str) else size
    return out


def _zoo(raw: Any) -> ZooConfig:
    raw = _mapping(raw, "zoo")
    members_raw = raw.pop("members", None) or {}
    if not isinstance(members_raw, Mapping):
        raise ConfigError(f"zoo.members: expected a mapping of name -> settings, got {quote(members_raw)}")
    for name in members_raw:
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(
                f"zoo.members: name {quote(name)} must be non-empty letters, digits, '-' or '_'"
            )
    members = tuple(
        _section(ZooMember, spec, f"zoo.members.{name}", name=name) for name, spec in members_raw.items()
    )
    return _section(ZooConfig, raw, "zoo", members=members)


def _train(raw: Any) -> TrainConfig:
    raw = _mapping(raw, "train")
    lora = _section(LoraConfig, raw.pop("lora", None), "train.lora")
    push = _section(PushToHubConfig, raw.pop("push_to_hub", None), "train.push_to_hub")
    fixed: dict[str, Any] = {"lora": lora, "push_to_hub": push}
    if "loss_type" in raw:
        fixed["loss_type"] = _loss_type(raw.pop("loss_type"))
    return _section(TrainConfig, raw, "train", **fixed)


def _sft(raw: Any) -> SftConfig:
    raw = _mapping(raw, "sft")
    data = _section(SftDataConfig, raw.pop("data", None), "sft.data")
    lora = _section(LoraConfig, raw.pop("lora", None), "sft.lora")
    return _section(SftConfig, raw, "sft", data=data, lora=lora)


def _loss_type(value: Any) -> str | tuple[str, ...]:
    """A loss type, or a list of them (TRL's `loss_type` list); a list of one is that loss type."""
    if isinstance(value, list | tuple):
        if not value:
            raise ConfigError("train.loss_type: got []; name at least one loss type")
        types = _typed(value, "tuple[str, ...]", "train.loss_type")
        return types[0] if len(types) == 1 else types
    if not isinstance(value, str):
        raise ConfigError(
            f"train.loss_type: expected a loss type or a list of them, e.g. [sigmoid, sft], "
            f"got {quote(value)}"
        )
    return _typed(value, "str", "train.loss_type")
