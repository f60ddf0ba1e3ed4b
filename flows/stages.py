"""Reproduce one DVC stage and summarise what it wrote; no Prefect here.

The flows call these so that DVC stays the one that decides what is stale and versions what
a stage writes: a task never runs `mrpo <stage>` itself, it asks DVC to reproduce the stage.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mrpo.cli import STATUS_FILE_ENV
from mrpo.config.schema import Config
from mrpo.errors import USER_ERROR_EXIT, MRPOError
from mrpo.pipeline import CHECK_STAGE, dvc_stage_names
from mrpo.reporting.records import read_record

log = logging.getLogger("mrpo")


class StageFailed(RuntimeError):
    """`dvc repro` of a stage (or `dvc exp run` of an experiment) failed. `command_exit` is how the stage's
    `mrpo` command ended (None when it never reported: it did not start, or it was killed); `transient` says
    whether a retry may help, `reason` why (for DVC's own errors: its ERROR line and the fix)."""

    def __init__(self, stage: str, returncode: int, output: str, command_exit: int | None = None):
        self.stage = stage
        self.returncode = returncode
        self.output = output
        self.command_exit = command_exit
        verdict = classify_failure(output, command_exit)
        self.transient = verdict.transient
        self.reason = verdict.reason
        # DVC's error line is the headline already; the rest is the context (mrpo's own output, DVC's details)
        lines = [ln for ln in output.strip().splitlines() if ln.strip() and ln.strip() != verdict.quoted]
        tail = "\n".join(lines[-15:])
        kind = "transient, will retry" if self.transient else "not transient: fix the cause and re-run"
        super().__init__(
            f"dvc repro of stage {stage!r} failed with exit {returncode} ({kind}): {verdict.reason}"
            + (f"\n{tail}" if tail else "")
        )


@dataclass(frozen=True)
class FailureVerdict:
    """Whether a retry may help, why in one line, and the line of DVC's output that it quotes."""

    transient: bool
    reason: str
    quoted: str = ""


# DVC's own errors that no retry can change, as DVC 3.67 words them (tests/drivers/test_flows.py holds
# the real outputs), each with the fix. DVC raises them before (or, for a missing output, after) the
# stage's command.
_PERMANENT_DVC_ERRORS: list[tuple[re.Pattern, str]] = [
    (
        re.compile(r"Parameters '(?P<keys>[^']+)' are missing from '(?P<file>[^']+)'"),
        "add {keys} to {file}, or drop it from the stage's params in dvc.yaml",
    ),
    (
        re.compile(r"Stage '(?P<stage>[^']+)' not found inside '(?P<file>[^']+)'"),
        "no stage {stage} in {file}: check the name against `dvc stage list`",
    ),
    (
        re.compile(r"failed to parse '(?P<where>[^']+)' in '(?P<file>[^']+)'"),
        "fix {where} in {file}: a ${{...}} it uses is not in params.yaml",
    ),
    (
        re.compile(r"unable to read: '(?P<file>[^']+)'"),
        "fix the syntax of {file}",
    ),
    (
        # a dep that is missing: no stage wrote it yet, and --single-item does not run the one that would
        re.compile(r"failed to reproduce '[^']+': \[Errno 2\] No such file or directory: '(?P<path>[^']+)'"),
        "a dependency is missing: create {path}, or reproduce the stage that writes it first",
    ),
    (
        re.compile(r"output '(?P<path>[^']+)' does not exist"),
        "the command ended without writing {path}: make it write it, or fix the stage's outs in dvc.yaml",
    ),
    (
        re.compile(r"'(?P<file>[^']*dvc\.yaml)' does not exist"),
        "run from the project's root, where dvc.yaml is",
    ),
    (
        re.compile(r"you are not inside of a DVC repository"),
        "run from the project's root (a git + DVC repository)",
    ),
    (
        re.compile(r"Invalid `--set-param` value: Could not override '(?P<key>[^']+)'"),
        "{key} is not in params.yaml: fix the override's key",
    ),
    (
        # the shell's "command not found" (127) or "not executable" (126): the environment, not the stage
        re.compile(r"failed to run: .*, exited with 12[67]$"),
        "the stage's command was not found: install the project (`pip install -e .`) in this environment",
    ),
]
# A dvc.yaml DVC cannot parse or validate: a header line of its own (no `ERROR:`), details on the lines below.
_INVALID_FILE = re.compile(r"^'(?P<file>[^']+)' (is invalid|validation failed)\.$")
# Kept transient on purpose: DVC's repo lock and its per-path rwlock are held by a live process (DVC drops
# a dead process's entry itself; the repo lock's wording is dvc/lock.py's), so a later try finds them free;
# a signal is memory pressure or a preemption, not the stage's settings. Anything not recognised stays
# transient too (a lost connection).
_TRANSIENT_DVC_ERRORS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"Unable to acquire lock"), "another DVC process holds the repository's lock"),
    (re.compile(r"is busy, it is being blocked by"), "another DVC process is using the stage's paths"),
    (
        re.compile(r"failed to run: .*, exited with -(?P<signal>\d+)$"),
        "the command was killed by signal {signal}",
    ),
]


def classify_failure(output: str, command_exit: int | None) -> FailureVerdict:
    """Whether a failed `dvc repro`/`dvc exp run` may pass on a retry, and why, from DVC's output and how the
    stage's `mrpo` command ended (None: it never reported). Only mrpo's exit 2 (a user-fixable error) and
    DVC's own errors about the pipeline's files are certain to fail again; a crash or a kill may pass."""
    if command_exit == USER_ERROR_EXIT:
        return FailureVerdict(
            False, f"mrpo exited {USER_ERROR_EXIT}: a user-fixable error (its message below)"
        )
    lines = [ln.strip() for ln in output.splitlines()]
    # DVC's error is its last `ERROR:` line; only those are read, never the command's own output
    errors = [ln for ln in lines if ln.startswith("ERROR: ")]
    error = errors[-1] if errors else ""
    for pattern, hint in _PERMANENT_DVC_ERRORS:
        if match := pattern.search(error):
            return FailureVerdict(False, f"{error} Fix: {hint.format(**match.groupdict())}.", error)
    if not errors:  # a dvc.yaml DVC cannot parse: its header line, no `ERROR:`, and no command ran
        for line in lines:
            if match := _INVALID_FILE.match(line):
                hint = f"correct {match['file']} where DVC's details below point"
                return FailureVerdict(False, f"{line} Fix: {hint}.", line)
    for pattern, why in _TRANSIENT_DVC_ERRORS:
        if match := pattern.search(error):
            why = why.format(**match.groupdict())
            return FailureVerdict(True, f"{error} ({why}; a retry may pass)", error)
    if command_exit is not None:
        return FailureVerdict(True, f"mrpo exited {command_exit}, not a user error: a retry may pass")
    return FailureVerdict(
        True, f"{error or 'DVC printed no error'} (mrpo never reported an exit; a retry may pass)", error
    )


@dataclass(frozen=True)
class StageResult:
    """What `dvc repro` did with one stage: `ran`, `skipped` (up to date) or `restored` (run-cache)."""

    stage: str
    status: str
    seconds: float
    output: str


def pipeline_stages(cfg: Config) -> list[str]:
    """The dvc.yaml stages in execution order; score is one stage per reference (`score@<name>`)."""
    return dvc_stage_names([ref.name for ref in cfg.references])


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for `dvc` and `mrpo` subprocesses: this interpreter's bin dir first on PATH,
    so a Prefect worker started without activating the venv still finds `mrpo`."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.update(extra or {})
    return env


_PROGRESS = re.compile(r"\b\d{1,3}%\|")


def _progress_update(line: str) -> bool:
    """A tqdm refresh short of 100% (off a terminal each refresh is a line of its own): not worth a log
    line."""
    return bool(_PROGRESS.search(line)) and "100%|" not in line


def dvc(
    args: list[str],
    project_dir: str | Path,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    on_output: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess:
    """Run `dvc <args>` in the project with this interpreter; output captured (stderr merged), and passed line
    by line to `on_output` as it comes (a flow sends it to its logs, so training progress shows while it
    runs)."""
    with subprocess.Popen(
        [sys.executable, "-m", "dvc", *args],
        cwd=project_dir,
        env=tool_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as popen:
        lines = []
        for line in popen.stdout:
            lines.append(line)
            if on_output is not None and line.strip() and not _progress_update(line):
                on_output(line.rstrip("\n"))
        returncode = popen.wait()
    proc = subprocess.CompletedProcess(popen.args, returncode, "".join(lines))
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"`dvc {' '.join(args)}` in {project_dir} failed ({proc.returncode}):\n{proc.stdout}"
        )
    return proc


def classify_repro_output(stage: str, output: str) -> str:
    """`ran`, `restored` or `skipped`, from what `dvc repro` printed about `stage`."""
    quoted = re.escape(f"'{stage}'")
    if re.search(rf"Stage {quoted} is cached - skipping run, checking out outputs", output) or re.search(
        rf"[Rr]estored stage {quoted}", output
    ):
        return "restored"
    if re.search(rf"Running stage {quoted}", output):
        return "ran"
    if re.search(rf"Stage {quoted} didn't change, skipping", output):
        return "skipped"
    return "skipped" if "Data and pipelines are up to date" in output else "ran"


def dvc_running_mrpo(
    args: list[str],
    name: str,
    project_dir: str | Path,
    env: Mapping[str, str] | None = None,
    on_output: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess:
    """`dvc <args>` whose stage commands are `mrpo`; raises StageFailed carrying how the failing `mrpo`
    command exited, which it reports through a status file (DVC itself exits 255 for every failed command)."""
    with tempfile.TemporaryDirectory(prefix="mrpo-status-") as tmp:
        status_file = Path(tmp) / "status.json"
        proc = dvc(
            args,
            project_dir,
            env={**(env or {}), STATUS_FILE_ENV: str(status_file)},
            check=False,
            on_output=on_output,
        )
        command_exit = read_record(status_file).get("exit")
    if proc.returncode != 0:
        raise StageFailed(name, proc.returncode, proc.stdout, command_exit)
    return proc


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry a failed stage unless the failure cannot change on its own."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.transient
    except MRPOError:
        return False
    except Exception:  # anything else (a lost connection, a killed process) may pass
        return True
    return True


def reproduce_stage(
    stage: str,
    project_dir: str | Path,
    env: Mapping[str, str] | None = None,
    on_output: Callable[[str], None] | None = None,
) -> StageResult:
    """`dvc repro --single-item check <stage>`: run the stage if DVC finds it stale, else skip it, after the
    check stage (params.yaml validated whole; the marker every stage depends on); `on_output` gets what it
    prints, line by line."""
    start = time.perf_counter()
    targets = [stage] if stage == CHECK_STAGE else [CHECK_STAGE, stage]
    proc = dvc_running_mrpo(["repro", "--single-item", *targets], stage, project_dir, env, on_output)
    seconds = time.perf_counter() - start
    status = classify_repro_output(stage, proc.stdout)
    log.info("stage %s: %s in %.1fs", stage, status, seconds)
    return StageResult(stage=stage, status=status, seconds=seconds, output=proc.stdout)
