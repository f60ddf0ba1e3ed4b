"""Typed configuration, read from ``params.yaml`` and validated once, here.

Every error is a :class:`ConfigError` naming the key, the bad value and what is
allowed, so a user can fix ``params.yaml`` without reading code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mrpo.errors import ConfigError, MRPOError  # noqa: F401  (re-exported: the public error names)

OBJECTIVES = ("mrpo", "dpo", "multi_dpo")
LOSS_TYPES = ("sigmoid", "ipo", "ipo_norm", "hinge")  # ipo_norm: IPO on per-token log-probs (TRL's ipo)
STRATEGIES = ("uniform", "fixed", "arwc", "vdw", "vaw", "window", "thompson")
DATA_SOURCES = ("synthetic", "file", "hub", "gsm8k")
DATA_FORMATS = ("auto", "explicit", "conversational", "implicit")
ARCHITECTURES = ("llama", "gpt2")
TOKENIZER_KINDS = ("bpe", "char")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class ReferenceConfig:
    """One reference model. The first one listed is the anchor the policy starts from."""

    name: str
    model: str  # hub id, local directory, or a .gguf file
    revision: str | None = None
    gguf_file: str | None = None  # a GGUF inside `model` when `model` is a directory or hub id
    tokenizer: str | None = None  # defaults to `model`
    chat_template: bool = False


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"
    paths: tuple[str, ...] = ()  # local files (file, gsm8k) or one dataset id (hub)
    hub_split: str = "train"
    format: str = "auto"
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    question_column: str = "question"  # gsm8k builder
    answer_column: str = "answer"
    synthetic_pairs: int = 3000
    max_rows: int | None = None
    max_chars: int = 4000
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    output_dir: str = "data/prepared"


@dataclass(frozen=True)
class ZooMember:
    name: str
    architecture: str = "llama"
    tokenizer: str = "bpe"
    hidden_size: int = 64
    num_layers: int = 2
    train_steps: int = 200
    operations: tuple[str, ...] = ("+", "-", "*")  # slice of the synthetic task it learns


@dataclass(frozen=True)
class ZooConfig:
    enabled: bool = True
    output_dir: str = "models/zoo"
    members: tuple[ZooMember, ...] = ()


@dataclass(frozen=True)
class ScoreConfig:
    output_dir: str = "data/scores"
    max_length: int = 512
    batch_tokens: int = 16384
    shard_size: int = 512
    device: str = "auto"
    dtype: str = "auto"


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None lets peft pick per architecture
    merge: bool = True


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "mrpo"
    references: tuple[str, ...] | None = None  # subset of reference names; None = all
    dpo_reference: str | None = None  # for objective dpo; defaults to the anchor
    loss_type: str = "sigmoid"
    beta: float = 0.1
    epsilon: float = 0.1
    adaptive_epsilon: bool = True
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    strategy: str = "uniform"
    fixed_weights: tuple[float, ...] | None = None
    window_size: int = 256
    learning_rate: float = 5e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    num_epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    eval_steps: int = 50
    save_steps: int = 50
    logging_steps: int = 1
    gradient_checkpointing: bool = False
    disable_dropout: bool = True  # like TRL: the policy's log-probs are then deterministic and match the scores
    lora: LoraConfig = field(default_factory=LoraConfig)
    device: str = "auto"
    output_dir: str = "models/policy"
    checkpoint_dir: str = "models/checkpoints"
    metrics_file: str = "metrics/train.json"
    plots_file: str = "plots/train.csv"


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = ("mrpo_arith_gen", "mrpo_arith_mc")
    limit: int | None = None
    num_fewshot: int = 0
    batch_size: int = 16
    device: str = "auto"
    max_gen_tokens: int = 16
    task_data: Mapping[str, str] = field(default_factory=dict)  # task name -> local data file
    metrics_file: str = "metrics/eval.json"
    results_dir: str = "evaluation/results"
    cache_dir: str = "evaluation/cache"


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str | None = None  # MLFLOW_TRACKING_URI wins; default: sqlite store in the project
    experiment: str = "mrpo"
    run_name: str | None = None


@dataclass(frozen=True)
class Config:
    seed: int = 0
    references: tuple[ReferenceConfig, ...] = ()
    data: DataConfig = field(default_factory=DataConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def anchor(self) -> ReferenceConfig:
        return self.references[0]

    def reference(self, name: str) -> ReferenceConfig:
        for ref in self.references:
            if ref.name == name:
                return ref
        raise ConfigError(f"references: no reference named {name!r}; known: {[r.name for r in self.references]}")

    def training_references(self) -> tuple[ReferenceConfig, ...]:
        """The references the training objective uses, anchor first."""
        t = self.train
        if t.objective == "dpo":
            return (self.reference(t.dpo_reference or self.anchor.name),)
        if t.references is None:
            return self.references
        return tuple(self.reference(n) for n in t.references)


# ---------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate mapping keys instead of keeping the last one."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError(f"duplicate key {key!r} at line {line} of {node.start_mark.name}")
        seen[key] = loader.construct_object(value_node, deep=deep)
    return seen


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} not found (run from the project root or pass --params)")
    with path.open() as f:
        try:
            raw = yaml.load(f, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate params.yaml; `overrides` maps dotted keys to values (e.g. {"train.beta": 0.2})."""
    raw = read_params(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return parse_config(raw)


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def parse_config(raw: Mapping[str, Any]) -> Config:
    known = {f.name for f in dataclasses.fields(Config)} | {"paths", "profile"}
    _reject_unknown(raw, known, "")
    cfg = Config(
        seed=_int(raw.get("seed", 0), "seed", minimum=0),
        references=_references(raw.get("references")),
        data=_section(DataConfig, raw.get("data"), "data"),
        zoo=_zoo(raw.get("zoo")),
        score=_section(ScoreConfig, raw.get("score"), "score"),
        train=_train(raw.get("train")),
        evaluate=_section(EvalConfig, raw.get("evaluate"), "evaluate"),
        tracking=_section(TrackingConfig, raw.get("tracking"), "tracking"),
    )
    _validate(cfg)
    return cfg


def _reject_unknown(raw: Mapping[str, Any], known: set[str], prefix: str) -> None:
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key; allowed: {sorted(known)}")


def _section(cls, raw: Mapping[str, Any] | None, prefix: str, **fixed):
    raw = dict(raw or {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, set(fields), prefix + ".")
    values = {}
    for name, value in raw.items():
        if name in fixed:
            continue
        default = fields[name].default
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{prefix}.{name}: expected true or false, got {value!r}")
        if isinstance(default, int | float) and not isinstance(default, bool) and value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{prefix}.{name}: expected a number, got {value!r}")
            if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
                if not value.is_integer():
                    raise ConfigError(f"{prefix}.{name}: expected an integer, got {value!r}")
                value = int(value)
        values[name] = value
    values.update(fixed)
    return cls(**values)


def _references(raw: Any) -> tuple[ReferenceConfig, ...]:
    """Accept a mapping name -> settings (DVC foreach friendly) or a list of settings with `name`."""
    if raw is None or (hasattr(raw, "__len__") and len(raw) == 0):
        raise ConfigError("references: at least one reference is required (the first one is the anchor)")
    if isinstance(raw, Mapping):
        items = [(name, spec) for name, spec in raw.items()]
    elif isinstance(raw, list):
        items = []
        for i, spec in enumerate(raw):
            if not isinstance(spec, Mapping) or "name" not in spec:
                raise ConfigError(f"references[{i}]: expected a mapping with a 'name', got {spec!r}")
            items.append((spec["name"], {k: v for k, v in spec.items() if k != "name"}))
    else:
        raise ConfigError(f"references: expected a mapping of name -> settings, got {raw!r}")
    seen: set[str] = set()
    refs = []
    for name, spec in items:
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"references: name {name!r} must be non-empty letters, digits, '-' or '_'")
        if name in seen:
            raise ConfigError(f"references: duplicate reference name {name!r}; names must be unique")
        seen.add(name)
        if isinstance(spec, str):
            spec = {"model": spec}
        if not isinstance(spec, Mapping) or not spec.get("model"):
            raise ConfigError(f"references.{name}.model: required (a hub id, local directory or .gguf file)")
        refs.append(_section(ReferenceConfig, spec, f"references.{name}", name=name))
    return tuple(refs)


def _zoo(raw: Mapping[str, Any] | None) -> ZooConfig:
    raw = dict(raw or {})
    members_raw = raw.pop("members", {}) or {}
    if not isinstance(members_raw, Mapping):
        raise ConfigError(f"zoo.members: expected a mapping of name -> settings, got {members_raw!r}")
    members = tuple(
        _section(ZooMember, spec, f"zoo.members.{name}", name=name) for name, spec in members_raw.items()
    )
    return _section(ZooConfig, raw, "zoo", members=members)


def _train(raw: Mapping[str, Any] | None) -> TrainConfig:
    raw = dict(raw or {})
    lora = _section(LoraConfig, raw.pop("lora", None), "train.lora")
    return _section(TrainConfig, raw, "train", lora=lora)


def _int(value: Any, key: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}: got {value!r}; must be >= {minimum}")
    return value


def _one_of(value: Any, key: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: got {value!r}; allowed: {', '.join(allowed)}")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}; {allowed}")


def _validate(cfg: Config) -> None:
    t, d, s, e = cfg.train, cfg.data, cfg.score, cfg.evaluate
    names = [r.name for r in cfg.references]

    _one_of(d.source, "data.source", DATA_SOURCES)
    _one_of(d.format, "data.format", DATA_FORMATS)
    _check(d.source in ("synthetic",) or len(d.paths) > 0, "data.paths", list(d.paths),
           f"data.source {d.source!r} needs at least one path (a local file or, for hub, a dataset id)")
    _check(d.synthetic_pairs >= 10, "data.synthetic_pairs", d.synthetic_pairs, "must be >= 10")
    _check(d.max_rows is None or d.max_rows > 0, "data.max_rows", d.max_rows, "must be > 0 or null")
    _check(d.max_chars > 0, "data.max_chars", d.max_chars, "must be > 0")
    for key in ("val_fraction", "test_fraction"):
        v = getattr(d, key)
        _check(0 <= v < 1, f"data.{key}", v, "must be in [0, 1)")
    _check(d.val_fraction + d.test_fraction < 1, "data.val_fraction + data.test_fraction",
           d.val_fraction + d.test_fraction, "must be < 1 so a training split remains")

    member_names = [m.name for m in cfg.zoo.members]
    for m in cfg.zoo.members:
        _one_of(m.architecture, f"zoo.members.{m.name}.architecture", ARCHITECTURES)
        _one_of(m.tokenizer, f"zoo.members.{m.name}.tokenizer", TOKENIZER_KINDS)
        for op in m.operations:
            _one_of(op, f"zoo.members.{m.name}.operations", ("+", "-", "*"))
        _check(m.train_steps >= 0, f"zoo.members.{m.name}.train_steps", m.train_steps, "must be >= 0")
    _check(len(set(member_names)) == len(member_names), "zoo.members", member_names, "names must be unique")

    _check(s.max_length >= 8, "score.max_length", s.max_length, "must be >= 8")
    _check(s.batch_tokens >= s.max_length, "score.batch_tokens", s.batch_tokens,
           f"must be >= score.max_length ({s.max_length}) so one sequence fits a batch")
    _check(s.shard_size >= 1, "score.shard_size", s.shard_size, "must be >= 1")
    _one_of(s.device, "score.device", DEVICES)
    _one_of(s.dtype, "score.dtype", DTYPES)

    _one_of(t.objective, "train.objective", OBJECTIVES)
    _one_of(t.loss_type, "train.loss_type", LOSS_TYPES)
    _one_of(t.strategy, "train.strategy", STRATEGIES)
    _one_of(t.device, "train.device", DEVICES)
    _check(math.isfinite(t.beta) and t.beta > 0, "train.beta", t.beta, "must be > 0")
    _check(0 <= t.epsilon < 1, "train.epsilon", t.epsilon, "must be in [0, 1)")
    _check(0 <= t.label_smoothing < 0.5, "train.label_smoothing", t.label_smoothing, "must be in [0, 0.5)")
    _check(t.sft_weight >= 0, "train.sft_weight", t.sft_weight, "must be >= 0")
    _check(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "must be > 0")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _check(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps",
           t.gradient_accumulation_steps, "must be >= 1")
    _check(t.window_size >= 1, "train.window_size", t.window_size, "must be >= 1")
    _check(t.max_length >= 8, "train.max_length", t.max_length, "must be >= 8")
    _check(t.lora.r >= 1, "train.lora.r", t.lora.r, "must be >= 1")
    if t.references is not None:
        for n in t.references:
            _check(n in names, "train.references", list(t.references), f"each must be one of {names}")
        _check(len(set(t.references)) == len(t.references), "train.references", list(t.references),
               "names must be unique")
        _check(len(t.references) > 0 and t.references[0] == names[0], "train.references", list(t.references),
               f"must start with the anchor {names[0]!r} (the policy starts from it)")
    if t.dpo_reference is not None:
        _one_of(t.dpo_reference, "train.dpo_reference", tuple(names))
    k = len(cfg.training_references())
    if t.strategy == "fixed":
        w = t.fixed_weights
        _check(w is not None and len(w) == k, "train.fixed_weights", None if w is None else list(w),
               f"strategy 'fixed' needs exactly {k} weights, one per training reference")
        _check(all(isinstance(x, int | float) and x >= 0 for x in w), "train.fixed_weights", list(w),
               "weights must be non-negative numbers")
        _check(sum(w) > 0, "train.fixed_weights", list(w), "at least one weight must be positive")

    _check(e.limit is None or e.limit > 0, "evaluate.limit", e.limit, "must be > 0 or null")
    _check(e.num_fewshot >= 0, "evaluate.num_fewshot", e.num_fewshot, "must be >= 0")
    _check(e.batch_size >= 1, "evaluate.batch_size", e.batch_size, "must be >= 1")
    _one_of(e.device, "evaluate.device", DEVICES)


def config_to_flat_dict(cfg: Config) -> dict[str, Any]:
    """Every value as `section.key` -> scalar, for MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}.{f.name}" if prefix else f.name, getattr(value, f.name))
        elif isinstance(value, tuple) and value and all(dataclasses.is_dataclass(v) for v in value):
            for v in value:
                walk(f"{prefix}.{v.name}", v)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = list(value) if isinstance(value, tuple) else value

    walk("", cfg)
    return out
