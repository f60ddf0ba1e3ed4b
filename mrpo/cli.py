"""The `mrpo` command: one subcommand per pipeline stage, each reading params.yaml.

The same stage runs identically from `dvc repro`, a Prefect flow or this command.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
from pathlib import Path

from mrpo.config.load import load_config, parse_yaml_value
from mrpo.errors import USER_ERROR_EXIT, ConfigError, MRPOError, disk_full_cause, quote
from mrpo.interrupts import interrupt_on_sigterm
from mrpo.locks import output_lock
from mrpo.pipeline import STAGE_NAMES, STAGES, Stage, config_value
from mrpo.pipeline import stage as pipeline_stage
from mrpo.runtime import die_with_parent, setup_logging

STATUS_FILE_ENV = "MRPO_STATUS_FILE"
MESSAGE_LIMIT = 2000  # characters of an error line: whatever it quotes, a line stays a line
# The names writers give the file they write (ours, safetensors' save_file, save_pretrained's directory).
WRITTEN_PATH_NAMES = ("path", "tmp", "final", "filename", "save_directory")


def _parse_overrides(pairs: list[str]) -> dict:

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.beta=0.2")
        key, value = pair.split("=", 1)
        out[key] = parse_yaml_value(value, f"--set {quote(pair)}")
    return out


def _params_text(keys: tuple[str, ...]) -> str:
    """`seed; references; train: objective, beta, ...; score: dtype`: the keys grouped by section."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        section, _, rest = key.partition(".")
        groups.setdefault(section, [])
        if rest:
            groups[section].append(rest)
    return "; ".join(f"{s}: {', '.join(ks)}" if ks else s for s, ks in groups.items())


def _stage_description(stage: Stage) -> str:
    import textwrap

    lines = [f"mrpo {stage.name}: {stage.what}.", ""]
    parts = (("reads", stage.reads), ("writes", stage.writes), ("params", _params_text(stage.params)))
    for label, text in parts:
        lines += textwrap.wrap(text, 100, initial_indent=f"{label + ':':9}", subsequent_indent=" " * 9)
    lines += [" " * 9 + line for line in stage.note]
    lines += [
        "",
        "Settings come from params.yaml (--params) and --set KEY=VALUE, given before or after the stage",
        f"name; `mrpo show-config {stage.section or stage.name}` prints the values in force.",
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


def _add_config_commands(sub) -> None:
    """`show-config` and `profile apply`: the configuration's own commands."""
    p = sub.add_parser(
        "show-config",
        help="print the validated configuration (all of it, or one section), each key with its help",
        description="Print every validated setting as `key = value`, defaults filled in, each followed by "
        "an indented line with its help, bounds and choices. "
        "`mrpo show-config train` prints one section, `mrpo show-config train.lora` one subsection.",
    )
    p.add_argument("section", nargs="?", help="a section or dotted key prefix, e.g. train or train.lora")
    _add_common_options(p, top=False)
    p = sub.add_parser(
        "profile",
        help="apply a profile overlay (profiles/*.yaml) to params.yaml",
        description="`mrpo profile apply profiles/<name>.yaml` writes params.yaml (or --params) merged with "
        "the overlay, keeping its comments, and dvc.yaml's deps on the files it names; "
        "`git checkout params.yaml dvc.yaml` restores the default.",
    )
    p.add_argument(
        "action",
        choices=["apply", "sync"],
        help="sync: rewrite dvc.yaml's deps on the data files and "
        "local models params.yaml names (after editing them by hand)",
    )
    p.add_argument("overlay", nargs="?", help="a profile overlay, e.g. profiles/smollm2-gsm8k.yaml")
    _add_common_options(p, top=False)


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

    for stage in STAGES:
        p = sub.add_parser(
            stage.name,
            help=stage.what,
            description=_stage_description(stage),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_common_options(p, top=False)
        if stage.per_reference:
            p.add_argument("--reference", required=True, help="reference name from params.yaml `references`")
    _add_compare_command(sub)
    _add_config_commands(sub)
    _add_runs_command(sub)
    return parser


def _add_compare_command(sub) -> None:
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
    p.add_argument(
        "--id",
        help="comparison id: the output folder and MLflow tag (default compare-<time>); the id of a stopped "
        "comparison resumes it: members it finished with the same settings and inputs are not trained again",
    )
    _add_common_options(p, top=False)


def _add_runs_command(sub) -> None:
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
    with interrupt_on_sigterm():
        return _run_mapped(args)


def _run_mapped(args: argparse.Namespace) -> int:
    """The command, its user errors as one line and exit 2, an interrupt (Ctrl-C, SIGTERM) as exit 130."""
    try:
        die_with_parent()
        _run_stage(args)
    except ConfigError as exc:
        return _exit(args.stage, USER_ERROR_EXIT, f"mrpo: configuration error: {exc}")
    except (MRPOError, FileNotFoundError) as exc:
        return _exit(args.stage, USER_ERROR_EXIT, f"mrpo {args.stage}: {exc}")
    except Exception as exc:
        if disk_full_cause(exc) is None:
            raise
        return _exit(args.stage, USER_ERROR_EXIT, f"mrpo {args.stage}: {_disk_full(exc)}")
    except KeyboardInterrupt:
        return _exit(
            args.stage, 130, "mrpo: interrupted; finished work is kept and the stage resumes on the next run"
        )
    return _exit(args.stage, 0)


def _written_path(exc: BaseException) -> str | None:
    """The file a failed write was writing: the error's own filename, else, from the innermost frame out, a
    local `path` or the name of an open file (Python's `write` names no file when the disk is full)."""
    if getattr(exc, "filename", None):
        return str(exc.filename)
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name, value in frame.f_locals.items():
            if name in WRITTEN_PATH_NAMES and isinstance(value, str | Path):
                return str(value)
            if hasattr(value, "write") and isinstance(getattr(value, "name", None), str):
                return value.name
    return None


def _disk_full(exc: BaseException) -> str:
    quota = getattr(exc, "errno", None) == errno.EDQUOT or os.strerror(errno.EDQUOT) in str(exc)
    what = "disk quota exceeded" if quota else "no space left on device"
    path = _written_path(exc)
    where = f"writing {path}" if path else "writing the stage's outputs"
    df = f"df -h {Path(path).parent}" if path else "df -h"
    return f"{what} {where}; free some space ({df}) and re-run: finished work is kept"


def _exit(stage: str, code: int, message: str | None = None) -> int:
    """Print `message` as one line, and tell a caller that asked (the flows, through STATUS_FILE_ENV) how the
    stage ended: DVC reports every failed command alike, so the exit code is passed on this way."""
    if message and len(message) > MESSAGE_LIMIT:
        message = message[: MESSAGE_LIMIT - 3] + "..."
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
    """What a stage writes, and so locks while it runs (nothing for a command that is not a stage)."""
    if stage not in STAGE_NAMES:
        return []
    entry = pipeline_stage(stage)
    paths = [Path(config_value(cfg, key)) for key in entry.locks]
    return [p / f"{reference}.parquet" for p in paths] if entry.per_reference else paths


def _run_stage(args: argparse.Namespace) -> None:
    cfg = load_config(args.params, _parse_overrides(args.set))
    with contextlib.ExitStack() as locks:
        if (
            int(os.environ.get("RANK", "0")) == 0
        ):  # the ranks of one torchrun job share outputs; rank 0 locks them
            for path in stage_outputs(cfg, args.stage, getattr(args, "reference", None)):
                locks.enter_context(output_lock(path, args.stage))
        _dispatch(cfg, args)


def _config_command(cfg, args: argparse.Namespace) -> None:
    if args.stage == "show-config":
        from mrpo.config.show import show_config

        print(show_config(cfg, args.section), end="")
    elif args.action == "sync":
        from mrpo.config.inputs import sync_dvc_yaml

        changed = sync_dvc_yaml("dvc.yaml", cfg)
        print(
            f"dvc.yaml: deps on the files {args.params} names {'updated' if changed else 'already in step'}"
        )
    else:
        from mrpo.config.profiles import apply_profile

        if not args.overlay:
            raise ConfigError(
                "mrpo profile apply: name the overlay to apply, e.g. profiles/smollm2-gsm8k.yaml"
            )
        name = apply_profile(args.overlay, args.params)
        restore = f"git checkout {args.params} dvc.yaml restores the default"
        print(f"{args.params}: profile {name!r} applied ({restore})")


def _dispatch(cfg, args: argparse.Namespace) -> None:
    if args.stage in ("show-config", "profile"):
        _config_command(cfg, args)
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
    else:
        entry = pipeline_stage(args.stage)
        run = entry.entry_point()
        if entry.per_reference:
            run(cfg, args.reference)
        else:
            run(cfg)


if __name__ == "__main__":
    sys.exit(main())
