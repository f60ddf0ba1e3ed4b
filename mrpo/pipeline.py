"""The stage registry: every pipeline stage once, in pipeline order.

The CLI (subcommands, `--help`, dispatch, output locks), preflight (outputs to probe, the device),
the Prefect flows (the stage list) and the tests read this list; nothing else keeps one. A stage's
entry point is a lazy "module:function" string, so reading the registry imports no stage (and DVC's
deps of one stage do not take in the others).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One `mrpo <name>` command and DVC stage.

    `what`, `reads` and `writes` are its help; `params` the params.yaml keys that decide its outputs,
    exactly those dvc.yaml declares for it (tests/drivers/test_cli.py checks they agree); `outputs` (params
    key,
    "dir" or "file") what it writes, probed before it starts; `locks` the params keys of the outputs it
    locks while it runs (one file per reference, `<dir>/<reference>.parquet`, for a stage run
    `per_reference`); `device` the params key of the device it runs on; `run` its entry point, called with
    the config (and the reference's name).
    """

    name: str
    what: str
    reads: str
    writes: str
    params: tuple[str, ...]
    outputs: tuple[tuple[str, str], ...]
    run: str
    locks: tuple[str, ...] = ()
    device: str | None = None
    per_reference: bool = False
    section: str | None = None  # the params section `mrpo show-config` prints for it (default: its name)
    note: tuple[str, ...] = ()  # more help lines, under its params

    def entry_point(self) -> Callable:
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)

    @property
    def module(self) -> str:
        return self.run.partition(":")[0]


_TRAIN_KEYS = (
    "objective references dpo_reference loss_type loss_weights f_divergence_type "
    "f_alpha_divergence_coef discopop_tau use_weighting beta epsilon adaptive_epsilon label_smoothing "
    "sft_weight strategy fixed_weights window_size learning_rate lr_scheduler warmup_ratio weight_decay "
    "num_epochs max_steps batch_size gradient_accumulation_steps max_length eval_steps "
    "gradient_checkpointing batching logprob_chunk disable_dropout lora device"
).split()
_EVALUATE_KEYS = "tasks limit num_fewshot batch_size device max_gen_tokens task_data".split()

CHECK_STAGE = "check"

STAGES: tuple[Stage, ...] = (
    Stage(
        CHECK_STAGE,
        what="validate the whole params.yaml (every key known, every value in range), first in `dvc repro`",
        reads="params.yaml, as a whole file: any edit re-runs this stage, and only this one when it is valid",
        writes="data/params.checked (a marker with fixed bytes, which every other stage depends on)",
        params=("train.logging_steps", "train.save_steps"),
        outputs=(),
        note=(
            "(the two train keys no other stage declares that mrpo refuses when invalid; the params.yaml",
            "file dep covers every other key, a mistyped one included)",
        ),
        run="mrpo.stages.check:check",
    ),
    Stage(
        "zoo",
        what="build the tiny local model zoo (the default profile's anchor and references)",
        reads="the synthetic fact task (mrpo/data/synthetic.py); no data files",
        writes="zoo.output_dir/<member>/ (safetensors, tokenizer, mrpo_zoo.json: its settings and losses), "
        "zoo.metrics_file (timings)",
        params=("seed", "zoo"),
        outputs=(("zoo.output_dir", "dir"), ("zoo.metrics_file", "file")),
        locks=("zoo.output_dir",),
        run="mrpo.stages.zoo:build_zoo",
    ),
    Stage(
        "prepare",
        what="read preference data, clean it, split it into train/val/test",
        reads="data.source: the synthetic task, data.paths (local files) or a hub dataset",
        writes="data.output_dir/{train,val,test}.parquet and report.json (what was dropped, the data digest)",
        params=("seed", "data"),
        outputs=(("data.output_dir", "dir"),),
        locks=("data.output_dir",),
        section="data",
        run="mrpo.stages.prepare:prepare",
    ),
    Stage(
        "sft",
        what="supervised fine-tuning of sft.model on (prompt, response) rows: a model a reference can name",
        reads="sft.model, sft.data (the prepared train split's chosen responses, GSM8K or (prompt, response) "
        "files)",
        writes="sft.output_dir (safetensors, tokenizer, model card), sft.metrics_file, sft.plots_file "
        "(per-step loss), sft.checkpoint_dir (resumable checkpoints), an MLflow run",
        params=("seed", "sft", "data"),
        outputs=(
            ("sft.output_dir", "dir"),
            ("sft.checkpoint_dir", "dir"),
            ("sft.metrics_file", "file"),
            ("sft.plots_file", "file"),
        ),
        locks=("sft.output_dir", "sft.checkpoint_dir"),
        device="sft.device",
        note=("(sft.enabled false: the stage writes only a marker in sft.output_dir)",),
        run="mrpo.stages.sft:sft",
    ),
    Stage(
        "score",
        what="score every prepared pair under one reference model",
        reads="data.output_dir (the prepared pairs), references.<name> (the reference model)",
        writes="score.output_dir/<name>.parquet (log-probs and how they were made), "
        "score.metrics_dir/<name>.json (timings)",
        params=("references.<name>", "score"),
        outputs=(("score.output_dir", "dir"), ("score.metrics_dir", "dir")),
        locks=("score.output_dir",),
        device="score.device",
        per_reference=True,
        run="mrpo.stages.score:score_reference",
    ),
    Stage(
        "diagnose",
        what="reference diagnostics before training: accuracy, margins, agreement, clip rate, "
        "strategy weights",
        reads="score.output_dir/<reference>.parquet of every reference, the prepared split diagnose.split",
        writes="diagnose.metrics_file, diagnose.report_file (markdown), diagnose.plots_file and "
        "diagnose.image_file, an MLflow run",
        params=(
            "seed",
            "references",
            "diagnose",
            "train.epsilon",
            "train.adaptive_epsilon",
            "train.fixed_weights",
            "train.window_size",
        ),
        outputs=(
            ("diagnose.metrics_file", "file"),
            ("diagnose.plots_file", "file"),
            ("diagnose.image_file", "file"),
            ("diagnose.report_file", "file"),
        ),
        locks=("diagnose.metrics_file",),
        run="mrpo.stages.diagnose:diagnose",
    ),
    Stage(
        "train",
        what="train the policy on the precomputed reference scores (never loads a reference model)",
        reads="data.output_dir, score.output_dir/<reference>.parquet of each training reference, the anchor "
        "(the first of `references`)",
        writes="train.output_dir (the policy, with train_metrics.json), train.metrics_file, train.plots_file "
        "(per-step curves), train.checkpoint_dir (resumable checkpoints), an MLflow run",
        params=("seed", "references", *(f"train.{k}" for k in _TRAIN_KEYS), "score.dtype"),
        outputs=(
            ("train.output_dir", "dir"),
            ("train.checkpoint_dir", "dir"),
            ("train.metrics_file", "file"),
            ("train.plots_file", "file"),
            ("train.plots_dir", "dir"),
        ),
        locks=("train.output_dir", "train.checkpoint_dir"),
        device="train.device",
        note=(
            "(logging_steps and save_steps are left out: they never change the weights, so DVC",
            "does not re-train for them; `dvc repro -f train` redraws the curves at a new cadence)",
        ),
        run="mrpo.stages.train:train",
    ),
    Stage(
        "evaluate",
        what="lm-eval benchmarks and preference metrics for the policy and the anchor",
        reads="train.output_dir (the policy), the anchor, score.output_dir/<anchor>.parquet, the test split "
        "in data.output_dir, evaluation/tasks",
        writes="evaluate.metrics_file, evaluate.results_dir (lm-eval's results, metrics.json with the "
        "anchor's scores), evaluate.cache_dir (the anchor's cached results), metrics on the MLflow run",
        params=(
            "seed",
            "references",
            *(f"evaluate.{k}" for k in _EVALUATE_KEYS),
            "train.beta",
            "score.max_length",
            "score.batch_tokens",
            "score.dtype",
        ),
        outputs=(
            ("evaluate.metrics_file", "file"),
            ("evaluate.results_dir", "dir"),
            ("evaluate.cache_dir", "dir"),
        ),
        locks=("evaluate.results_dir",),
        device="evaluate.device",
        run="mrpo.stages.evaluate:evaluate",
    ),
    Stage(
        "summary",
        what="print and write the end-of-pipeline summary: before/after, the policy, how to look further",
        reads="train.metrics_file, evaluate.metrics_file, the full records and MLflow run beside the policy "
        "and in evaluate.results_dir",
        writes="summary.file (markdown)",
        params=(
            "seed",
            "references",
            "train.objective",
            "train.references",
            "train.dpo_reference",
            "train.strategy",
            "train.beta",
            "train.output_dir",
            "tracking",
        ),
        outputs=(("summary.file", "file"),),
        run="mrpo.stages.summary:summarize",
    ),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
_BY_NAME = {stage.name: stage for stage in STAGES}


def stage(name: str) -> Stage:
    """The registry's entry for `name`; ValueError naming the stages when there is none."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(STAGE_NAMES)}")
    return _BY_NAME[name]


def config_value(cfg, key: str):
    """The value of the dotted params key `key` (e.g. "train.output_dir") in a validated config."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def dvc_stage_names(reference_names) -> list[str]:
    """The dvc.yaml stages in execution order: a per-reference stage is one DVC stage per reference
    (`score@<name>`, DVC's foreach)."""
    return [
        name
        for s in STAGES
        for name in ([f"{s.name}@{ref}" for ref in reference_names] if s.per_reference else [s.name])
    ]
