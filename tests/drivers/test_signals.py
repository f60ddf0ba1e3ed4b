"""Signals end a stage cleanly: SIGTERM is handled as Ctrl-C is (the interrupted line, exit 130, the MLflow
run KILLED, the previous outputs untouched), and a stage run by DVC dies with it instead of writing on as an
orphan. Real `mrpo train` processes, real signals, a real MLflow store."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import config

from mrpo.interrupts import deferred_interrupts, interrupt_on_sigterm
from mrpo.locks import lock_path, output_lock
from mrpo.stages.train import train
from mrpo.training.checkpoints import SEAL_FILE

INTERRUPTED = "mrpo: interrupted; finished work is kept and the stage resumes on the next run"
LONG = {"train.max_steps": 400, "train.save_steps": 2, "train.eval_steps": 1000}

# What DVC does: run the stage's command in a shell (dash does not exec it, so the shell stays between).
AS_DVC = """
import subprocess, sys
sys.exit(subprocess.call(sys.argv[1:]))
"""


def digest(*paths: Path) -> dict[str, str]:
    out = {}
    for root in paths:
        for f in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    assert out
    return out


@pytest.fixture
def previous(scored, tmp_path, monkeypatch):
    """A finished short run: its outputs are what an interrupted run must leave alone."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    cfg = config(scored, tmp_path, **{"train.max_steps": 2})
    train(cfg)
    outputs = [Path(cfg.train.output_dir), Path(cfg.train.metrics_file), Path(cfg.train.plots_file)]
    return cfg, outputs, digest(*outputs)


def train_command(scored, cfg, tmp_path) -> list[str]:
    overrides = {
        **LONG,
        "train.output_dir": cfg.train.output_dir,
        "train.checkpoint_dir": tmp_path / "long-checkpoints",
        "train.metrics_file": cfg.train.metrics_file,
        "train.plots_file": cfg.train.plots_file,
        "train.plots_dir": cfg.train.plots_dir,
        "tracking.tracking_uri": cfg.tracking.tracking_uri,
    }
    argv = [sys.executable, "-m", "mrpo.cli", "--params", str(scored["params"])]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    return [*argv, "train"]


def wait_for_training(tmp_path: Path, *procs: subprocess.Popen) -> None:
    """Until the long run sealed its first checkpoint: the MLflow run is open and steps are being taken."""
    seal = tmp_path / "long-checkpoints" / "checkpoint-2" / SEAL_FILE
    deadline = time.monotonic() + 300
    while not seal.exists():
        assert all(p.poll() is None for p in procs), "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)


def newest_run_status(cfg) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])[0].info.status


@pytest.mark.slow
def test_sigterm_ends_train_as_ctrl_c_does(scored, tmp_path, previous):
    cfg, outputs, before = previous
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen(train_command(scored, cfg, tmp_path), stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for_training(tmp_path, proc)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        finally:
            proc.kill()
    text = log.read_text()
    assert code == 130, text[-4000:]
    assert text.rstrip("\n").splitlines()[-1] == INTERRUPTED and "Traceback" not in text
    assert newest_run_status(cfg) == "KILLED"
    assert digest(*outputs) == before


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("shell", [True, False], ids=["through-a-shell", "direct-child"])
def test_a_stage_dies_with_its_parent_killed_by_sigkill(scored, tmp_path, previous, shell):
    cfg, outputs, before = previous
    command = train_command(scored, cfg, tmp_path)
    if shell:
        command = ["/bin/sh", "-c", " ".join(f"'{a}'" for a in command)]
    parent = subprocess.Popen(
        [sys.executable, "-c", AS_DVC, *command],
        env={**os.environ, "DVC_STAGE": "train"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # so the test can clean up the whole group if the stage survives
    )
    try:
        wait_for_training(tmp_path, parent)
        holder = lock_path(cfg.train.output_dir).read_text()
        pid = int(holder.split("(pid ", 1)[1].split()[0])
        assert alive(pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 60
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid), "mrpo train outlived its parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
    assert newest_run_status(cfg) == "KILLED"
    assert digest(*outputs) == before
    with output_lock(cfg.train.output_dir, "train"):  # nothing holds the outputs any more
        pass


@pytest.mark.slow
def test_sigterm_to_dvc_repro_takes_the_stage_down(scored, tmp_path, previous):
    """The real thing: `dvc repro` runs `mrpo train` in a shell (dash, which stays between them); DVC is
    stopped with SIGTERM; the stage must not write on as an orphan."""
    cfg, outputs, before = previous
    repo = tmp_path / "repo"
    repo.mkdir()
    command = " ".join(f"'{a}'" for a in train_command(scored, cfg, tmp_path))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {"cmd": command}}}))
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "SHELL": "/bin/sh", "PATH": path}
    for args in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True)
    dvc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_training(tmp_path, dvc)
        pid = int(lock_path(cfg.train.output_dir).read_text().split("(pid ", 1)[1].split()[0])
        dvc.send_signal(signal.SIGTERM)
        dvc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid), "mrpo train outlived `dvc repro`"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(dvc.pid, signal.SIGKILL)
    assert newest_run_status(cfg) == "KILLED"
    assert digest(*outputs) == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_an_interrupt_waits_for_the_end_of_a_tracking_write(signum):
    """A write to the MLflow store cut half-way left sqlite locked, so the run could not be marked KILLED
    (exit 1 instead of 130); the interrupt now lands after the write."""
    finished = False
    with interrupt_on_sigterm(), pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signum)
            time.sleep(0.2)  # Python runs the handler between bytecodes: well inside the block
            finished = True
    assert finished
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
