"""Failures are loud and lose nothing: non-finite training, re-runs, damaged checkpoints, concurrent writers,
failing DVC stages. Real tiny models, real checkpoints, a real MLflow store, real DVC repos, real kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import CrashAtStep, SimulatedCrash, clone_project, config, run_tool
from safetensors.torch import load_file

from mrpo.cli import main
from mrpo.errors import OutputLocked, TrainingError
from mrpo.locks import output_lock
from mrpo.stages.train import train
from mrpo.training.checkpoints import SEAL_FILE, checkpoint_problem


def tree_digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths`: equal digests mean byte-identical outputs."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    assert out, f"nothing under {paths}"
    return out


def mlflow_client(cfg):
    from mlflow import MlflowClient

    return MlflowClient(cfg.tracking.tracking_uri)


# ---------------------------------------------------------------- non-finite training


def test_an_exploding_run_stops_at_the_first_non_finite_step_and_keeps_the_previous_policy(
    scored, tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    good = config(scored, tmp_path, **{"train.max_steps": 2})
    train(good)
    before = tree_digest(
        Path(good.train.output_dir), Path(good.train.metrics_file), Path(good.train.plots_file)
    )

    # A finite but absurd learning rate:
    # step 1 is finite, its update makes the weights overflow, step 2 is NaN.
    exploding = config(scored, tmp_path, **{"train.max_steps": 4, "train.learning_rate": 1e30})
    with pytest.raises(
        TrainingError, match=r"became non-finite .* at optimizer step 2;.*train\.learning_rate"
    ):
        train(exploding)
    assert (
        tree_digest(Path(good.train.output_dir), Path(good.train.metrics_file), Path(good.train.plots_file))
        == before
    )
    runs = mlflow_client(good).search_runs(
        [mlflow_client(good).get_experiment_by_name("mrpo").experiment_id], order_by=["start_time DESC"]
    )
    assert runs[0].info.status == "FAILED" and runs[1].info.status == "FINISHED"

    # Through the CLI: one line, exit 2 (the flows do not retry it).
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load(Path(scored["params"]).read_text())
    raw["train"].update(
        {
            k.split(".", 1)[1]: v
            for k, v in {
                "train.output_dir": good.train.output_dir,
                "train.checkpoint_dir": str(tmp_path / "ckpt2"),
                "train.metrics_file": good.train.metrics_file,
                "train.plots_file": good.train.plots_file,
                "train.plots_dir": good.train.plots_dir,
                "train.learning_rate": 1e30,
            }.items()
        }
    )
    raw["tracking"]["tracking_uri"] = good.tracking.tracking_uri
    params.write_text(yaml.safe_dump(raw))
    assert main(["--params", str(params), "train"]) == 2
    assert (
        tree_digest(Path(good.train.output_dir), Path(good.train.metrics_file), Path(good.train.plots_file))
        == before
    )


# ---------------------------------------------------------------- re-runs


@pytest.mark.slow
def test_a_finished_run_is_trained_again_from_scratch_as_a_new_run(scored, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config(scored, tmp_path, **{"train.max_steps": 3, "train.save_steps": 2})
    first = train(cfg)
    first_run = json.loads((Path(cfg.train.checkpoint_dir) / "mrpo_run.json").read_text())
    assert first_run["completed"] is True

    # Only the logging interval changed: not part of the fingerprint, so before this fix it "resumed" 0 steps.
    again = train(
        config(scored, tmp_path, **{"train.max_steps": 3, "train.save_steps": 2, "train.logging_steps": 2})
    )
    assert again["resumed"] is False and again["steps"] == 3
    for key in ("train_loss", "val_loss_after", "val_reward_margin_after", "test_reward_accuracy_after"):
        assert again[key] == pytest.approx(first[key], abs=1e-6), key

    client = mlflow_client(cfg)
    second_run = json.loads((Path(cfg.train.checkpoint_dir) / "mrpo_run.json").read_text())["mlflow_run_id"]
    assert second_run != first_run["mlflow_run_id"]
    finished = client.get_run(first_run["mlflow_run_id"])
    assert finished.info.status == "FINISHED"
    assert len(client.get_metric_history(first_run["mlflow_run_id"], "train_loss")) == 1


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def straight_run(scored, tmp_path_factory) -> dict:
    """6 thompson steps without interruption: what every resumed run must end with."""
    out = tmp_path_factory.mktemp("straight")
    cfg = config(scored, out, **RESUMABLE)
    metrics = train(cfg, track=False)
    return {"metrics": metrics, "weights": load_file(Path(cfg.train.output_dir) / "model.safetensors")}


RESUMABLE = {
    "train.max_steps": 6,
    "train.save_steps": 2,
    "train.strategy": "thompson",
    "train.logging_steps": 3,
}


def crash_at_step_5(scored, out: Path):
    cfg = config(scored, out, **RESUMABLE)
    with pytest.raises(SimulatedCrash):
        train(cfg, callbacks=[CrashAtStep(5)], track=False)
    checkpoints = Path(cfg.train.checkpoint_dir)
    assert checkpoint_problem(checkpoints / "checkpoint-2") is None
    assert checkpoint_problem(checkpoints / "checkpoint-4") is None
    return cfg, checkpoints


def assert_same_end(cfg, metrics, straight_run):
    weights = load_file(Path(cfg.train.output_dir) / "model.safetensors")
    assert max((weights[k] - straight_run["weights"][k]).abs().max().item() for k in weights) < 1e-6
    # the mean training loss covers the whole run, not only the resumed steps
    assert metrics["train_loss"] == pytest.approx(straight_run["metrics"]["train_loss"], abs=1e-6)


@pytest.mark.parametrize("damage", ["optimizer.pt deleted", "save cut short"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    scored, tmp_path, straight_run, damage, caplog
):
    cfg, checkpoints = crash_at_step_5(scored, tmp_path)
    latest = checkpoints / "checkpoint-4"
    if damage == "optimizer.pt deleted":
        (latest / "optimizer.pt").unlink()
        assert checkpoint_problem(latest) == "optimizer.pt is missing"
    else:  # a disk that filled mid-save: a truncated file and no seal
        (latest / SEAL_FILE).unlink()
        with open(latest / "model.safetensors", "r+b") as f:
            f.truncate(100)
        assert "never finished" in checkpoint_problem(latest)

    metrics = train(cfg, track=False)
    assert metrics["resumed"] is True
    assert "checkpoint-4 is incomplete" in caplog.text and "falling back" in caplog.text
    assert_same_end(cfg, metrics, straight_run)


def test_an_intact_checkpoint_resumes_to_the_same_weights(scored, tmp_path, straight_run):
    cfg, _ = crash_at_step_5(scored, tmp_path)
    metrics = train(cfg, track=False)
    assert metrics["resumed"] is True and metrics["steps"] == 6
    assert_same_end(cfg, metrics, straight_run)


@pytest.mark.slow
def test_kill_9_anywhere_after_the_first_checkpoint_resumes_to_the_same_weights(
    scored, tmp_path, straight_run, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config(scored, tmp_path, **RESUMABLE)
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
    proc = subprocess.Popen([*argv, "train"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_seal = Path(cfg.train.checkpoint_dir) / "checkpoint-2" / SEAL_FILE
    deadline = time.monotonic() + 120
    while not first_seal.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # wherever it is now: stepping, mid-save, evaluating, or already done
    proc.wait()

    assert main([*argv[3:], "train"]) == 0
    metrics = json.loads(Path(cfg.train.metrics_file).read_text())
    assert metrics["steps"] == 6
    assert_same_end(cfg, metrics, straight_run)


# ---------------------------------------------------------------- concurrent writers


HOLD_LOCK = """
import sys, time
from mrpo.locks import output_lock
with output_lock(sys.argv[1], "train"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_fails_at_once_naming_the_holder_and_a_killed_holder_leaves_no_stale_lock(
    tmp_path, capsys
):
    policy = tmp_path / "models/policy"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(policy)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            OutputLocked, match=rf"{policy} is being written by `mrpo train` \(pid {holder.pid} "
        ):
            with output_lock(policy, "train"):
                pass

        # The CLI: exit 2 within a second, before loading anything.
        params = tmp_path / "params.yaml"
        raw = yaml.safe_load((Path(__file__).parents[2] / "params.yaml").read_text())
        raw["train"]["output_dir"] = str(policy)
        params.write_text(yaml.safe_dump(raw))
        started = time.perf_counter()
        assert main(["--params", str(params), "train"]) == 2
        assert time.perf_counter() - started < 5
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with output_lock(policy, "train"):  # the kernel released the killed holder's lock
        pass


# ---------------------------------------------------------------- DVC: a failing stage keeps old outputs


def dvc(args, cwd, check=True):
    return run_tool([sys.executable, "-m", "dvc", *args], cwd, check=check)


@pytest.mark.slow
def test_a_failing_stage_under_dvc_repro_and_the_flow_keeps_the_previous_outputs(tiny_reproduced, tmp_path):
    from flows.stages import StageFailed, reproduce_stage

    project = clone_project(tiny_reproduced["path"], tmp_path / "project")
    train_outputs = [project / "models/policy", project / "metrics/train.json", project / "plots/train.csv"]
    score_outputs = [project / "data/scores/anchor.parquet"]
    before = tree_digest(*train_outputs, *score_outputs)
    params = (project / "params.yaml").read_text()

    # A bad train value: only train is stale, and it fails. (A misspelt key DVC declares, `bta` for `beta`,
    # is refused by DVC itself before mrpo runs: "Parameters 'train.beta' are missing from 'params.yaml'".)
    (project / "params.yaml").write_text(params.replace("  beta: 0.1\n", "  beta: -0.1\n"))
    proc = dvc(["repro"], project, check=False)
    assert proc.returncode != 0 and "train.beta: got -0.1; must be > 0" in proc.stdout
    with pytest.raises(StageFailed) as failed:
        reproduce_stage("train", project)
    assert failed.value.command_exit == 2 and not failed.value.transient

    # A bad score setting: the score stages are stale, and the first one fails.
    (project / "params.yaml").write_text(params.replace("  batch_tokens: 16384\n", "  batch_tokens: 16\n"))
    proc = dvc(["repro"], project, check=False)
    assert proc.returncode != 0 and "score.batch_tokens" in proc.stdout
    with pytest.raises(StageFailed):
        reproduce_stage("score@anchor", project)

    assert tree_digest(*train_outputs, *score_outputs) == before

    # Fixed again: nothing to redo, the kept outputs are exactly what dvc.lock records.
    (project / "params.yaml").write_text(params)
    status = dvc(["status"], project).stdout
    assert "up to date" in status, status


def test_every_dvc_output_persists_so_dvc_never_deletes_it_before_a_run():
    stages = yaml.safe_load((Path(__file__).parents[2] / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        for entry in body.get("outs", []) + body.get("metrics", []):
            assert isinstance(entry, dict) and next(iter(entry.values())).get("persist") is True, (
                name,
                entry,
            )
