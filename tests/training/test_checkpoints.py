"""Checkpoints are verified by content before a resume, never resumed from a pickle Trainer would refuse,
never logged twice into the resumed MLflow run, and a full disk while saving is one line that loses nothing.

Real tiny models and checkpoints, a real MLflow store (sqlite and file), a real full filesystem (a small
tmpfs in a private mount namespace; skipped where this process may not mount one)."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import CrashAtStep, SimulatedCrash, config
from safetensors.torch import load_file

from mrpo.io import file_sha256
from mrpo.stages.train import train
from mrpo.training.checkpoints import SEAL_FILE, checkpoint_problem, seal_checkpoint

RESUMABLE = {
    "train.max_steps": 6,
    "train.save_steps": 2,
    "train.strategy": "thompson",
    "train.logging_steps": 1,
}


@pytest.fixture(autouse=True)
def _no_outside_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def straight_run(scored, tmp_path_factory) -> dict:
    """6 thompson steps without interruption: what every resumed run must end with."""
    cfg = config(scored, tmp_path_factory.mktemp("straight"), **RESUMABLE)
    metrics = train(cfg, track=False)
    weights = load_file(Path(cfg.train.output_dir) / "model.safetensors")
    return {"cfg": cfg, "metrics": metrics, "weights": weights}


def crash_at_step_5(scored, out: Path, **overrides):
    """A run killed at step 5: checkpoints 2 and 4 complete."""
    cfg = config(scored, out, **{**RESUMABLE, **overrides})
    with pytest.raises(SimulatedCrash):
        train(cfg, callbacks=[CrashAtStep(5)], track="tracking.tracking_uri" in overrides)
    checkpoints = Path(cfg.train.checkpoint_dir)
    assert checkpoint_problem(checkpoints / "checkpoint-2") is None
    assert checkpoint_problem(checkpoints / "checkpoint-4") is None
    return cfg, checkpoints


def assert_same_end(cfg, metrics, straight_run):
    weights = load_file(Path(cfg.train.output_dir) / "model.safetensors")
    assert max((weights[k] - straight_run["weights"][k]).abs().max().item() for k in weights) < 1e-6
    assert metrics["train_loss"] == pytest.approx(straight_run["metrics"]["train_loss"], abs=1e-6)


def zero_first_half(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(bytes(size // 2))
    assert path.stat().st_size == size


# ---------------------------------------------------------------- content hashes


def test_the_seal_records_the_sha256_of_every_file(straight_run):
    checkpoint = Path(straight_run["cfg"].train.checkpoint_dir) / "checkpoint-2"
    import json

    files = json.loads((checkpoint / SEAL_FILE).read_text())["files"]
    on_disk = sorted(p.name for p in checkpoint.iterdir() if p.name != SEAL_FILE)
    assert sorted(files) == on_disk and "model.safetensors" in files and "optimizer.pt" in files
    for name, recorded in files.items():
        path = checkpoint / name
        assert recorded == {"size": path.stat().st_size, "sha256": file_sha256(path)}


def test_a_checkpoint_zeroed_in_place_falls_back_to_the_previous_one_and_ends_with_the_same_weights(
    scored, tmp_path, straight_run, caplog
):
    cfg, checkpoints = crash_at_step_5(scored, tmp_path)
    zero_first_half(checkpoints / "checkpoint-4" / "model.safetensors")
    assert checkpoint_problem(checkpoints / "checkpoint-4") == (
        "model.safetensors does not match the sha256 it was saved with (its content changed since)"
    )

    caplog.set_level(logging.INFO, logger="mrpo")
    metrics = train(cfg, track=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "checkpoint-4 is incomplete or damaged: model.safetensors does not match the sha256" in w
        and "falling back" in w
        for w in warnings
    ), warnings
    assert f"train: resuming from {checkpoints / 'checkpoint-2'}" in caplog.text
    assert metrics["resumed"] is True and metrics["steps"] == 6
    assert_same_end(cfg, metrics, straight_run)


def test_a_seal_without_content_hashes_is_not_trusted(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / SEAL_FILE).write_text('{"files": {"model.safetensors": 7}}')  # what an older mrpo wrote
    assert checkpoint_problem(tmp_path) == (
        "its seal records only the size of model.safetensors (an older mrpo wrote it), not its content hash"
    )


# ---------------------------------------------------------------- pickles Trainer would refuse


@pytest.mark.parametrize(
    "name, content, problem",
    [
        (
            "optimizer.pt",
            "pickle",
            "optimizer.pt holds a pickle that torch.load(weights_only=True) refuses "
            "(Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default.)",
        ),
        (
            "rng_state.pth",
            "pickle",
            "rng_state.pth holds a pickle that torch.load(weights_only=True) refuses "
            "(Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default.)",
        ),
        ("rng_state.pth", "empty", "rng_state.pth is unreadable (EOFError)"),
    ],
)
def test_a_checkpoint_whose_pickle_weights_only_refuses_falls_back_to_the_previous_one(
    scored, tmp_path, straight_run, caplog, name, content, problem
):
    cfg, checkpoints = crash_at_step_5(scored, tmp_path)
    latest = checkpoints / "checkpoint-4"
    if content == "pickle":  # a real pickle of a class weights_only does not allow (it could run any code)
        torch.save(argparse.Namespace(lr=1.0), latest / name)
    else:
        (latest / name).write_bytes(b"")
    seal_checkpoint(latest)  # sealed as it is: only the load check can tell
    assert checkpoint_problem(latest) == problem

    caplog.set_level(logging.INFO, logger="mrpo")
    metrics = train(cfg, track=False)
    assert f"checkpoint {latest} is incomplete or damaged: {problem}; removing it" in caplog.text
    assert f"train: resuming from {checkpoints / 'checkpoint-2'}" in caplog.text
    assert_same_end(cfg, metrics, straight_run)


# ---------------------------------------------------------------- the resumed MLflow run


def metric_points(cfg, run_id: str) -> dict[str, list]:
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking.tracking_uri)
    keys = client.get_run(run_id).data.metrics
    return {key: client.get_metric_history(run_id, key) for key in keys}


@pytest.mark.parametrize("store", ["sqlite", pytest.param("file", marks=pytest.mark.slow)])
def test_a_run_resumed_before_steps_it_logged_holds_one_point_per_step(
    scored, tmp_path, caplog, store, monkeypatch
):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps it, in maintenance mode
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite" else (tmp_path / "mlruns").as_uri()
    cfg, checkpoints = crash_at_step_5(scored, tmp_path, **{"tracking.tracking_uri": uri})
    zero_first_half(checkpoints / "checkpoint-4" / "model.safetensors")  # falls back past logged steps 3-5
    import json

    run_id = json.loads((checkpoints / "mrpo_run.json").read_text())["mlflow_run_id"]
    assert [m.step for m in metric_points(cfg, run_id)["loss"]] == [1, 2, 3, 4]  # killed before logging 5

    caplog.set_level(logging.INFO, logger="mrpo")
    resumed_at = int(time.time() * 1000)
    metrics = train(cfg)
    assert metrics["resumed"] is True
    points = metric_points(cfg, run_id)
    for key, history in points.items():
        steps = [m.step for m in history]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {sorted(steps)}"
    loss = sorted(points["loss"], key=lambda m: m.step)
    assert [m.step for m in loss] == [1, 2, 3, 4, 5, 6]  # max_steps / logging_steps points
    if store == "sqlite":  # the re-trained steps replace what the first attempt logged
        assert all(m.timestamp >= resumed_at for m in loss if m.step > 2)
        assert all(m.timestamp < resumed_at for m in loss if m.step <= 2)
        assert "replacing the" in caplog.text and "at steps 3-4" in caplog.text
    else:  # a store that cannot delete points keeps the first ones, each once, and says so
        assert all(m.timestamp < resumed_at for m in loss if m.step <= 4)
        assert "cannot delete the points an earlier attempt logged at steps 3-4" in caplog.text


# ---------------------------------------------------------------- a full disk


def _can_mount_tmpfs() -> bool:
    try:
        probe = subprocess.run(
            ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(
    not _can_mount_tmpfs(), reason="needs a private mount namespace to mount a small tmpfs (root)"
)


def train_on_small_disk(scored, cfg, small_dir: Path, size_kb: int, copy_to: Path):
    """`mrpo train` with `small_dir` a tmpfs of `size_kb` KiB (private to the command);
    its content is copied to `copy_to` afterwards. Returns the CompletedProcess."""
    overrides = {
        **RESUMABLE,
        "train.output_dir": cfg.train.output_dir,
        "train.checkpoint_dir": cfg.train.checkpoint_dir,
        "train.metrics_file": cfg.train.metrics_file,
        "train.plots_file": cfg.train.plots_file,
        "train.plots_dir": cfg.train.plots_dir,
        "tracking.tracking_uri": cfg.tracking.tracking_uri,
    }
    argv = [sys.executable, "-m", "mrpo.cli", "--params", str(scored["params"])]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    import shlex

    copy_to.mkdir(parents=True, exist_ok=True)
    script = (
        f"mount -t tmpfs -o size={size_kb}k tmpfs {shlex.quote(str(small_dir))} || exit 99\n"
        f"if [ -d {shlex.quote(str(copy_to))}/before ]; then cp -a {shlex.quote(str(copy_to))}/before/. "
        f"{shlex.quote(str(small_dir))}/; fi\n"
        f"{shlex.join([*argv, 'train'])}\nrc=$?\n"
        f"cp -a {shlex.quote(str(small_dir))}/. {shlex.quote(str(copy_to))}/after/\nexit $rc\n"
    )
    (copy_to / "after").mkdir()
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@needs_tmpfs
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_earlier_checkpoints(
    scored, tmp_path, straight_run
):
    first = Path(straight_run["cfg"].train.checkpoint_dir) / "checkpoint-2"
    size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    cfg = config(scored, tmp_path, **RESUMABLE)
    small = Path(cfg.train.checkpoint_dir)
    small.mkdir(parents=True)
    proc = train_on_small_disk(scored, cfg, small, (size * 3 // 2) // 1024, tmp_path / "disk")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"mrpo train: no space left on the disk holding {small / 'checkpoint-4'} "), line
    assert "(train.checkpoint_dir): the save needs about " in line
    assert " is free; removed the partial save" in line
    assert "Traceback" not in proc.stderr
    after = tmp_path / "disk" / "after"
    assert sorted(p.name for p in after.glob("checkpoint-*")) == ["checkpoint-2"]  # no partial checkpoint-4
    assert checkpoint_problem(after / "checkpoint-2") is None
    assert not Path(cfg.train.output_dir).exists()  # no policy from a failed run

    # With room again, the run resumes from the kept checkpoint and ends where an uninterrupted one does.
    import shutil

    shutil.copytree(after, small, dirs_exist_ok=True)
    metrics = train(cfg)
    assert metrics["resumed"] is True
    assert_same_end(cfg, metrics, straight_run)


@pytest.mark.slow
@needs_tmpfs
def test_a_full_disk_while_saving_the_policy_is_one_line_and_keeps_the_previous_policy(
    scored, tmp_path, straight_run
):
    cfg = config(scored, tmp_path, **{**RESUMABLE, "train.output_dir": str(tmp_path / "models/policy")})
    small = Path(cfg.train.output_dir).parent
    small.mkdir(parents=True)
    before = tmp_path / "disk" / "before" / "policy"
    before.mkdir(parents=True)
    (before / "model.safetensors").write_text("an earlier policy")
    policy_size = (Path(straight_run["cfg"].train.output_dir) / "model.safetensors").stat().st_size
    proc = train_on_small_disk(scored, cfg, small, (policy_size // 2) // 1024, tmp_path / "disk")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    expected = f"mrpo train: no space left on the disk holding {small} (train.output_dir): "
    assert line.startswith(expected), line
    assert "Traceback" not in proc.stderr
    after = tmp_path / "disk" / "after"
    assert not [p.name for p in after.iterdir() if p.name.startswith((".policy.tmp", ".policy.old"))]
    assert (after / "policy" / "model.safetensors").read_text() == "an earlier policy"
    assert checkpoint_problem(Path(cfg.train.checkpoint_dir) / "checkpoint-6") is None
