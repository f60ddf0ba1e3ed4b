"""The `mrpo` command: one subcommand per pipeline stage, each reading params.yaml.

The same stage runs identically from `dvc repro`, a Prefect flow or this command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from mrpo.config.schema import load_config, parse_yaml_value
from mrpo.errors import USER_ERROR_EXIT, ConfigError, MRPOError
from mrpo.io import output_lock
from mrpo.runtime import setup_logging

STATUS_FILE_ENV = "MRPO_STATUS_FILE"


def _parse_overrides(pairs: list[str]) -> dict:

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.beta=0.2")
        key, value = pair.split("=", 1)
        out[key] = parse_yaml_value(value)
    return out


# What each stage reads and writes, and the params.yaml keys that decide its outputs: exactly the keys
# dvc.yaml declares for it (tests/test_cli.py checks they agree). Paths are named by their params key.
_TRAIN_KEYS = (
    "objective references dpo_reference loss_type loss_weights f_divergence_type "
    "f_alpha_divergence_coef discopop_tau use_weighting beta epsilon adaptive_epsilon label_smoothing "
    "sft_weight strategy fixed_weights window_size learning_rate lr_scheduler warmup_ratio weight_decay "
    "num_epochs max_steps batch_size gradient_accumulation_steps max_length eval_steps "
    "gradient_checkpointing disable_dropout lora device"
).split()
_EVALUATE_KEYS = "tasks limit num_fewshot batch_size device max_gen_tokens task_data".split()
STAGE_DOCS = {
    "zoo": (
        "build the tiny local model zoo (the default profile's anchor and references)",
        "the synthetic fact task (mrpo/data/synthetic.py); no data files",
        "zoo.output_dir/<member>/ (safetensors, tokenizer, mrpo_zoo.json: its settings and losses), "
        "zoo.metrics_file (timings)",
        ("seed", "zoo"),
    ),
    "prepare": (
        "read preference data, clean it, split it into train/val/test",
        "data.source: the synthetic task, data.paths (local files) or a hub dataset",
        "data.output_dir/{train,val,test}.parquet and report.json (what was dropped, the data digest)",
        ("seed", "data"),
    ),
    "score": (
        "score every prepared pair under one reference model",
        "data.output_dir (the prepared pairs), references.<name> (the reference model)",
        "score.output_dir/<name>.parquet (log-probs and how they were made), "
        "score.metrics_dir/<name>.json (timings)",
        ("references.<name>", "score"),
    ),
    "train": (
        "train the policy on the precomputed reference scores (never loads a reference model)",
        "data.output_dir, score.output_dir/<reference>.parquet of each training reference, the anchor "
        "(the first of `references`)",
        "train.output_dir (the policy, with train_metrics.json), train.metrics_file, train.plots_file "
        "(per-step curves), train.checkpoint_dir (resumable checkpoints), an MLflow run",
        ("seed", "references", *(f"train.{k}" for k in _TRAIN_KEYS), "score.dtype"),
    ),
    "evaluate": (
        "lm-eval benchmarks and preference metrics for the policy and the anchor",
        "train.output_dir (the policy), the anchor, score.output_dir/<anchor>.parquet, the test split in "
        "data.output_dir, evaluation/tasks",
        "evaluate.metrics_file, evaluate.results_dir (lm-eval's results, metrics.json with the anchor's "
        "scores), evaluate.cache_dir (the anchor's cached results), metrics on the MLflow run",
        (
            "seed",
            "references",
            *(f"evaluate.{k}" for k in _EVALUATE_KEYS),
            "train.beta",
            "score.max_length",
            "score.batch_tokens",
            "score.dtype",
        ),
    ),
    "diagnose": (
        "reference diagnostics before training: accuracy, margins, agreement, clip rate, strategy weights",
        "score.output_dir/<reference>.parquet of every reference, the prepared split diagnose.split",
        "diagnose.metrics_file, diagnose.report_file (markdown), diagnose.plots_file and "
        "diagnose.image_file, an MLflow run",
        (
            "seed",
            "references",
            "diagnose",
            "train.epsilon",
            "train.adaptive_epsilon",
            "train.fixed_weights",
            "train.window_size",
        ),
    ),
    "summary": (
        "print and write the end-of-pipeline summary: before/after, the policy, how to look further",
        "train.metrics_file, evaluate.metrics_file, the full records and MLflow run beside the policy and in "
        "evaluate.results_dir",
        "summary.file (markdown)",
        (
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
    ),
}
_SHOW = {"prepare": "data", "summary": "summary"}


def _params_text(keys: tuple[str, ...]) -> str:
    """`seed; references; train: objective, beta, ...; score: dtype`: the keys grouped by section."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        section, _, rest = key.partition(".")
        groups.setdefault(section, [])
        if rest:
            groups[section].append(rest)
    return "; ".join(f"{s}: {', '.join(ks)}" if ks else s for s, ks in groups.items())


def _stage_description(stage: str) -> str:
    import textwrap

    what, reads, writes, params = STAGE_DOCS[stage]
    lines = [f"mrpo {stage}: {what}.", ""]
    for label, text in (("reads", reads), ("writes", writes), ("params", _params_text(params))):
        lines += textwrap.wrap(text, 100, initial_indent=f"{label + ':':9}", subsequent_indent=" " * 9)
    if stage == "train":
        lines += [
            " " * 9 + "(logging_steps and save_steps are left out: they never change the weights, so DVC",
            " " * 9 + "does not re-train for them; `dvc repro -f train` redraws the curves at a new cadence)",
        ]
    lines += [
        "",
        "Settings come from params.yaml (--params) and --set KEY=VALUE, given before or after the stage",
        f"name; `mrpo show-config {_SHOW.get(stage, stage)}` prints the values in force.",
    ]
    return "\n".join(lines)


def _add_common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--params, --set and -v, accepted before the stage name (top) and after it (the subcommand's own)."""
    suffix = "" if top else "_after"
    parser.add_argument(
        "--params",
        dest=f"params{suffix}",
        default="params.yaml" if top else None,
        metavar="FILE",
        help="params file to read (default: params.yaml)",
    )
    parser.add_argument(
        "--set",
        dest=f"set{suffix}",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param for this run only, e.g. --set train.beta=0.2 (repeatable)",
    )
    parser.add_argument("-v", "--verbose", dest=f"verbose{suffix}", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mrpo",
        description="Multi-Reference Preference Optimization pipeline. Each subcommand is one DVC stage "
        "and reads its settings from params.yaml.",
        epilog="Typical use: `dvc repro` runs every stage in order; "
        "run a single stage with e.g. `mrpo train`; "
        "`mrpo <stage> --help` says what it reads, writes and which params matter.",
    )
    _add_common_options(parser, top=True)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def stage_parser(name: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=STAGE_DOCS[name][0],
            description=_stage_description(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_common_options(p, top=False)
        return p

    stage_parser("zoo")
    stage_parser("prepare")
    stage_parser("score").add_argument(
        "--reference", required=True, help="reference name from params.yaml `references`"
    )
    stage_parser("diagnose")
    stage_parser("train")
    stage_parser("evaluate")
    stage_parser("summary")
    p = sub.add_parser(
        "compare",
        help=(
            "DPO per reference, MRPO per strategy and multi_dpo over seeds on few pairs: "
            "intervals, paired tests"
        ),
        description="Train every configuration of the `compare` params over its seeds on the stored "
        "scores, then report held-out reward accuracy and lm-eval scores with intervals and paired "
        "differences against DPO with the anchor (sweeps/<id>/comparison.{md,csv,png}).",
    )
    p.add_argument("--id", help="comparison id: the output folder and MLflow tag (default compare-<time>)")
    _add_common_options(p, top=False)
    p = sub.add_parser(
        "show-config",
        help="print the validated configuration (all of it, or one section)",
        description="Print every validated setting as `key = value`, defaults filled in. "
        "`mrpo show-config train` prints one section, `mrpo show-config train.lora` one subsection.",
    )
    p.add_argument("section", nargs="?", help="a section or dotted key prefix, e.g. train or train.lora")
    _add_common_options(p, top=False)
    from mrpo.tracking import runs

    p = sub.add_parser(
        "runs",
        help="a comparison table of existing MLflow runs, filtered by experiment and tags",
        description=runs.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment)")
    p.add_argument(
        "--tag", action="append", default=[], metavar="KEY=VALUE", help="only runs with this tag (repeatable)"
    )
    p.add_argument("--sweep", help="only the members of this sweep or comparison (tag mrpo.sweep)")
    p.add_argument("--filter", help="an MLflow filter string, e.g. \"params.`train.beta` = '0.1'\"")
    p.add_argument("--metric", action="append", default=[], help="another metric column (repeatable)")
    p.add_argument("--param", action="append", default=[], help="another param column (repeatable)")
    p.add_argument(
        "--sort", metavar="METRIC", help="order by this metric, best first (default: newest first)"
    )
    p.add_argument("--max-results", type=int, default=200, help="at most this many runs (default 200)")
    p.add_argument(
        "--width",
        type=int,
        default=runs.WIDTH,
        help=f"at most this many characters a line (default {runs.WIDTH}; 0: no limit)",
    )
    _add_common_options(p, top=False)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with --params/--set/-v merged from before and after the stage name (after wins)."""
    args = build_parser().parse_args(argv)
    args.params = args.params_after or args.params
    args.set = [*args.set, *args.set_after]
    args.verbose = args.verbose or args.verbose_after
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        _run_stage(args)
    except ConfigError as exc:
        return _exit(args.stage, USER_ERROR_EXIT, f"mrpo: configuration error: {exc}")
    except (MRPOError, FileNotFoundError) as exc:
        return _exit(args.stage, USER_ERROR_EXIT, f"mrpo {args.stage}: {exc}")
    except KeyboardInterrupt:
        return _exit(
            args.stage, 130, "mrpo: interrupted; finished work is kept and the stage resumes on the next run"
        )
    return _exit(args.stage, 0)


def _exit(stage: str, code: int, message: str | None = None) -> int:
    """Print `message` as one line, and tell a caller that asked (the flows, through STATUS_FILE_ENV) how the
    stage ended: DVC reports every failed command alike, so the exit code is passed on this way."""
    if message:
        print(message, file=sys.stderr)
    status_file = os.environ.get(STATUS_FILE_ENV)
    if status_file:
        with contextlib.suppress(OSError):
            Path(status_file).write_text(
                json.dumps({"stage": stage, "exit": code, "message": message}) + "\n"
            )
    return code


def stage_outputs(cfg, stage: str, reference: str | None = None) -> list[Path]:
    """What a stage writes, and so locks while it runs."""
    outputs = {
        "zoo": [cfg.zoo.output_dir],
        "prepare": [cfg.data.output_dir],
        "score": [Path(cfg.score.output_dir) / f"{reference}.parquet"],
        "diagnose": [cfg.diagnose.metrics_file],
        "train": [cfg.train.output_dir, cfg.train.checkpoint_dir],
        "evaluate": [cfg.evaluate.results_dir],
    }
    return [Path(p) for p in outputs.get(stage, [])]


def _run_stage(args: argparse.Namespace) -> None:
    cfg = load_config(args.params, _parse_overrides(args.set))
    with contextlib.ExitStack() as locks:
        if (
            int(os.environ.get("RANK", "0")) == 0
        ):  # the ranks of one torchrun job share outputs; rank 0 locks them
            for path in stage_outputs(cfg, args.stage, getattr(args, "reference", None)):
                locks.enter_context(output_lock(path, args.stage))
        _dispatch(cfg, args)


def config_section(flat: dict, section: str | None) -> dict:
    """The `section.*` entries of a flat config (all of them for None); ConfigError naming the sections."""
    if not section:
        return flat
    section = section.strip(".")
    picked = {k: v for k, v in flat.items() if k == section or k.startswith(section + ".")}
    if not picked:
        sections = sorted({k.split(".")[0] for k in flat})
        raise ConfigError(f"show-config {section!r}: no such section or key; sections: {', '.join(sections)}")
    return picked


def _dispatch(cfg, args: argparse.Namespace) -> None:
    if args.stage == "show-config":
        from mrpo.config.schema import config_to_flat_dict

        for key, value in config_section(config_to_flat_dict(cfg), args.section).items():
            print(f"{key} = {value!r}")
    elif args.stage == "compare":
        from mrpo.stages.compare import compare

        compare(cfg, comparison_id=args.id)
    elif args.stage == "runs":
        from mrpo.tracking.runs import parse_tags, runs_table
        from mrpo.tracking.store import tracking_uri

        tags = parse_tags(args.tag)
        if args.sweep:
            tags["mrpo.sweep"] = args.sweep
        print(
            runs_table(
                tracking_uri(cfg),
                args.experiment or cfg.tracking.experiment,
                tags,
                args.filter,
                args.metric,
                args.param,
                args.sort,
                args.max_results,
                args.width,
            ),
            end="",
        )
    elif args.stage == "zoo":
        from mrpo.stages.zoo import build_zoo

        build_zoo(cfg)
    elif args.stage == "prepare":
        from mrpo.stages.prepare import prepare

        prepare(cfg)
    elif args.stage == "score":
        from mrpo.stages.score import score_reference

        score_reference(cfg, args.reference)
    elif args.stage == "diagnose":
        from mrpo.stages.diagnose import diagnose

        diagnose(cfg)
    elif args.stage == "train":
        from mrpo.stages.train import train

        train(cfg)
    elif args.stage == "evaluate":
        from mrpo.stages.evaluate import evaluate

        evaluate(cfg)
    elif args.stage == "summary":
        from mrpo.stages.summary import summarize

        summarize(cfg)


if __name__ == "__main__":
    sys.exit(main())
