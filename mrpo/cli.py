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

from mrpo.config import load_config, parse_yaml_value
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mrpo",
        description="Multi-Reference Preference Optimization pipeline. Each subcommand is one DVC stage "
        "and reads its settings from params.yaml.",
        epilog="Typical use: `dvc repro` runs every stage in order; "
        "run a single stage with e.g. `mrpo train`.",
    )
    parser.add_argument("--params", default="params.yaml", help="params file to read (default: params.yaml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param for this run only, e.g. --set train.beta=0.2 (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    sub.add_parser("zoo", help="build the tiny local model zoo (default profile's anchor and references)")
    sub.add_parser("prepare", help="read preference data, clean it, split it into data/prepared/")
    p = sub.add_parser("score", help="score every prepared pair under one reference model")
    p.add_argument("--reference", required=True, help="reference name from params.yaml `references`")
    sub.add_parser(
        "diagnose",
        help="reference diagnostics on the validation split: accuracy, margins, agreement, clip, weights",
    )
    sub.add_parser("train", help="train the policy with MRPO on the precomputed reference scores")
    sub.add_parser("evaluate", help="lm-eval benchmarks and preference metrics for policy and anchor")
    p = sub.add_parser(
        "compare",
        help=(
            "DPO per reference, MRPO per strategy and multi_dpo over seeds on few pairs: "
            "intervals, paired tests"
        ),
    )
    p.add_argument("--id", help="comparison id: the output folder and MLflow tag (default compare-<time>)")
    sub.add_parser("show-config", help="print the validated configuration")
    p = sub.add_parser(
        "runs", help="a comparison table of existing MLflow runs, filtered by experiment and tags"
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


def _dispatch(cfg, args: argparse.Namespace) -> None:
    if args.stage == "show-config":
        from mrpo.config import config_to_flat_dict

        for key, value in config_to_flat_dict(cfg).items():
            print(f"{key} = {value!r}")
    elif args.stage == "compare":
        from mrpo.compare import compare

        compare(cfg, comparison_id=args.id)
    elif args.stage == "runs":
        from mrpo.runs import parse_tags, runs_table
        from mrpo.tracking import tracking_uri

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
            ),
            end="",
        )
    elif args.stage == "zoo":
        from mrpo.zoo import build_zoo

        build_zoo(cfg)
    elif args.stage == "prepare":
        from mrpo.data import prepare

        prepare(cfg)
    elif args.stage == "score":
        from mrpo.scoring import score_reference

        score_reference(cfg, args.reference)
    elif args.stage == "diagnose":
        from mrpo.diagnostics import diagnose

        diagnose(cfg)
    elif args.stage == "train":
        from mrpo.train import train

        train(cfg)
    elif args.stage == "evaluate":
        from mrpo.evaluate import evaluate

        evaluate(cfg)


if __name__ == "__main__":
    sys.exit(main())
