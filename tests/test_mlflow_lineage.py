"""MLflow lineage against a real `mlflow server` on loopback: a pipeline run and a sweep member
recorded there, searched and compared by reference set and by score through MlflowClient."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import clone_project, run_tool

from mrpo import plots


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path):
    """`mlflow server` with a sqlite backend and local artifacts in tmp; yields its URI."""
    port = free_port()
    log = tmp_path / "mlflow_server.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")),
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"mlflow server did not come up:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    try:
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_runs_are_searchable_by_reference_set_and_score(
    mlflow_server, tiny_reproduced, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    from flows.lineage import record_lineage
    from flows.sweep import sweep
    from mrpo.config import load_config

    project = clone_project(tiny_reproduced["path"], tmp_path / "project")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # 1) the pipeline with two of the three references (a new setting, so train really runs)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["references"] = ["anchor", "gpt2_char"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_tool(["git", "commit", "-qam", "two references"], project)
    out = run_tool(
        [sys.executable, "-m", "dvc", "repro"], project, env={"MLFLOW_TRACKING_URI": mlflow_server}
    ).stdout
    assert "Running stage 'train'" in out and "Running stage 'score@anchor'" not in out
    cfg = load_config(project / "params.yaml")
    pipeline_run_id = record_lineage(cfg, project)

    # 2) a one-member sweep (DPO on llama_expert alone) under an MLflow parent run
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect_home"))
    result = sweep(project_dir=str(project), seeds=[0], strategies=[], dpo_references=["llama_expert"])
    assert result["members"] == 1 and result["failed"] == 0

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    ids = [experiment.experiment_id]

    run = client.get_run(pipeline_run_id)
    tags, run_params = run.data.tags, run.data.params
    commit = run_tool(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert tags["mrpo.git_commit"] == commit and tags["mlflow.source.git.commit"] == commit
    import hashlib

    assert tags["mrpo.dvc_lock_digest"] == hashlib.sha256((project / "dvc.lock").read_bytes()).hexdigest()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert (
        tags["mrpo.reference.gpt2_char.score_digest"] == lock["stages"]["score@gpt2_char"]["outs"][0]["md5"]
    )
    from mrpo.data import prepared_digest

    assert tags["mrpo.prepared_digest"] == prepared_digest(project / "data" / "prepared")
    assert run_params["train.max_steps"] == "6" and run_params["data.synthetic_pairs"] == "200"
    artifacts = {f.path for f in client.list_artifacts(pipeline_run_id, "plots")}
    assert {
        "plots/train.csv",
        "plots/loss.png",
        "plots/reward_accuracy.png",
        "plots/reference_weights.png",
    } <= artifacts
    assert {f.path for f in client.list_artifacts(pipeline_run_id, "metrics")} == {
        "metrics/train.json",
        "metrics/eval.json",
    }
    assert any(f.path.startswith("lm_eval/") for f in client.list_artifacts(pipeline_run_id, "lm_eval"))

    # search by reference set: exactly the pipeline run, then exactly the sweep member
    by_set = client.search_runs(ids, "tags.`mrpo.reference_set` = 'anchor,gpt2_char'")
    assert [r.info.run_id for r in by_set] == [pipeline_run_id]
    member = client.search_runs(ids, "params.`reference_set.names` = '[\"llama_expert\"]'")
    assert len(member) == 1
    assert member[0].data.tags["mlflow.parentRunId"] == result["parent_run_id"]
    assert member[0].data.params["train.objective"] == "dpo"

    # compare by score: both runs carry the downstream metrics, ordered by them
    metric = "policy/mrpo_facts_mc/acc"
    ranked = client.search_runs(ids, f"metrics.`{metric}` >= 0", order_by=[f"metrics.`{metric}` DESC"])
    assert {pipeline_run_id, member[0].info.run_id} <= {r.info.run_id for r in ranked}
    values = [r.data.metrics[metric] for r in ranked]
    assert values == sorted(values, reverse=True)

    # the sweep wrote its comparison and logged it on the parent
    out_dir = Path(result["output_dir"])
    table = (out_dir / "comparison.md").read_text()
    assert "dpo:llama_expert" in table
    assert (out_dir / "comparison.csv").is_file() and (out_dir / "comparison.png").stat().st_size > 1000
    parent_files = {f.path for f in client.list_artifacts(result["parent_run_id"], "comparison")}
    assert {
        "comparison/comparison.md",
        "comparison/comparison.csv",
        "comparison/comparison.png",
    } <= parent_files


# ---------------------------------------------------------------- fast: lineage and sweep logic


def test_record_lineage_completes_the_train_stage_run(tiny_project, tmp_path, monkeypatch):
    """Lineage on a real sqlite store: `prepare` really run by DVC; the train and evaluate outputs
    (run record, metrics, curves) written here in their documented shapes, since only the lineage
    logic is under test (the slow test above runs the real stages)."""
    import hashlib
    import json

    import pandas as pd
    from mlflow import MlflowClient

    from flows.lineage import record_lineage
    from mrpo.config import config_to_flat_dict, load_config
    from mrpo.data import prepared_digest
    from mrpo.tracking import start_pipeline_run, write_run_record

    project = clone_project(tiny_project, tmp_path / "project")
    run_tool([sys.executable, "-m", "dvc", "repro", "prepare"], project)
    run_tool(["git", "commit", "-qam", "prepared"], project)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(project)
    cfg = load_config(project / "params.yaml")

    run = start_pipeline_run(cfg)
    write_run_record(project / cfg.train.output_dir, run)
    client = MlflowClient(uri)
    client.log_param(run.run_id, "train.beta", "0.1")  # already logged by train: must not be re-logged
    (project / "metrics").mkdir()
    (project / "metrics" / "eval.json").write_text(
        json.dumps({"policy/mrpo_facts_mc/acc": 0.625, "pref": {"n": 18}})
    )
    (project / "metrics" / "train.json").write_text(json.dumps({"steps": 3, "final_loss": 0.69}))
    # The curves as the train stage writes them (mrpo.train.write_plots), from a three-step log.
    frame = pd.DataFrame(
        {
            "step": [1, 2, 3],
            "loss": [0.69, 0.6, 0.5],
            "rewards/accuracy": [0.5, 0.6, 0.7],
            "weight/anchor": [0.4, 0.5, 0.6],
            "weight/gpt2_char": [0.6, 0.5, 0.4],
        }
    )
    columns, rows = plots.with_smoothed(list(frame.columns), frame.to_dict("records"))
    plots.write_csv(project / "plots" / "train.csv", columns, rows)
    validation = plots.validation_rows(rows, {"val_loss_before": 0.7, "val_reward_accuracy_before": 0.3})
    plots.write_csv(project / "plots" / "validation.csv", plots.VALIDATION_COLUMNS, validation)
    plots.render_pngs(project / "plots", rows, validation, ["anchor", "gpt2_char"], "mrpo (uniform)")
    (project / cfg.evaluate.results_dir).mkdir(parents=True)
    (project / cfg.evaluate.results_dir / "results_policy.json").write_text("{}")

    assert record_lineage(cfg, project) == run.run_id
    got = client.get_run(run.run_id)
    tags, params, metrics = got.data.tags, got.data.params, got.data.metrics
    commit = run_tool(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert (
        tags["mrpo.git_commit"] == commit and tags["mrpo.git_dirty"] == "False"
    )  # only untracked files added
    assert tags["mrpo.dvc_lock_digest"] == hashlib.sha256((project / "dvc.lock").read_bytes()).hexdigest()
    assert tags["mrpo.prepared_digest"] == prepared_digest(project / "data" / "prepared")
    assert tags["mrpo.reference_set"] == "anchor,gpt2_char,llama_expert" and tags["mrpo.anchor"] == "anchor"
    assert tags["mrpo.reference.gpt2_char.model"] == "models/zoo/gpt2_char"
    assert not any(k.endswith(".score_digest") for k in tags)  # nothing scored yet: no digest claimed
    assert set(config_to_flat_dict(cfg)) <= set(params)
    assert params["data.synthetic_pairs"] == "200" and params["train.max_steps"] == "6"
    assert metrics == {"eval.policy/mrpo_facts_mc/acc": 0.625, "eval.pref.n": 18.0}
    files = {
        f.path
        for d in ("plots", "metrics", "lineage", "data", "lm_eval")
        for f in client.list_artifacts(run.run_id, d)
    }
    assert {
        "plots/train.csv",
        "plots/validation.csv",
        "plots/loss.png",
        "plots/reward_accuracy.png",
        "plots/reference_weights.png",
        "metrics/eval.json",
        "metrics/train.json",
        "lineage/params.yaml",
        "lineage/dvc.lock",
        "data/report.json",
        "lm_eval/results_policy.json",
    } <= files

    # a second recording (e.g. `dvc repro` restored training from the run-cache) is idempotent
    assert record_lineage(cfg, project) == run.run_id
    assert client.get_run(run.run_id).data.metrics == metrics


def test_sweep_members_and_dvc_set_arguments():
    from flows.sweep import DEFAULT_STRATEGIES, set_param_args, sweep_members

    members = sweep_members(["anchor", "b"], ["uniform", "arwc"], seeds=[0, 1], extra={"train.max_steps": 5})
    assert [(m.label, m.seed) for m in members] == [
        ("dpo:anchor", 0),
        ("dpo:b", 0),
        ("mrpo:uniform", 0),
        ("mrpo:arwc", 0),
        ("dpo:anchor", 1),
        ("dpo:b", 1),
        ("mrpo:uniform", 1),
        ("mrpo:arwc", 1),
    ]
    # every member overrides what the base params.yaml might set against it (a `fixed` strategy and its weights)
    assert members[1].overrides == {
        "train.max_steps": 5,
        "seed": 0,
        "train.objective": "dpo",
        "train.dpo_reference": "b",
        "train.strategy": "uniform",
        "train.fixed_weights": None,
    }
    assert members[3].slug == "mrpo-arwc-s0"
    assert set_param_args(members[3].overrides) == [
        "-S",
        "train.max_steps=5",
        "-S",
        "seed=0",
        "-S",
        "train.objective=mrpo",
        "-S",
        "train.strategy=arwc",
        "-S",
        "train.references=null",
        "-S",
        "train.fixed_weights=null",
    ]
    assert "train.fixed_weights" not in sweep_members(["anchor"], ["fixed"], seeds=[0])[1].overrides
    assert "fixed" not in DEFAULT_STRATEGIES
    with pytest.raises(ValueError, match="'c' is not a reference"):
        sweep_members(["anchor", "b"], [], dpo_references=["c"])
    with pytest.raises(ValueError, match="'nope' is not one of"):
        sweep_members(["anchor"], ["nope"])


def test_comparison_table_aggregates_over_seeds(tmp_path):
    from flows.sweep import aggregate, write_comparison

    m = "eval.policy/mrpo_facts_mc/acc"
    rows = [
        {"experiment": "e1", "label": "dpo:anchor", "seed": 0, "status": "ok", m: 0.5},
        {"experiment": "e2", "label": "dpo:anchor", "seed": 1, "status": "ok", m: 0.7},
        {"experiment": "e3", "label": "mrpo:uniform", "seed": 0, "status": "ok", m: 0.8},
        {"experiment": "e4", "label": "mrpo:uniform", "seed": 1, "status": "failed"},
    ]
    summary = {r["label"]: r for r in aggregate(rows, [m])}
    assert summary["dpo:anchor"]["seeds"] == 2
    assert summary["dpo:anchor"][f"{m} mean"] == pytest.approx(0.6)
    assert summary["dpo:anchor"][f"{m} std"] == pytest.approx(0.1414213562)  # sample sd of 0.5, 0.7
    assert summary["mrpo:uniform"]["seeds"] == 1 and summary["mrpo:uniform"][f"{m} std"] == 0.0

    paths = write_comparison(rows, tmp_path)
    md = paths["md"].read_text()
    assert f"Headline metric: `{m}`" in md
    assert "| dpo:anchor | 2 | 0.6000 ± 0.1414 |" in md and "| mrpo:uniform | 1 | 0.8000 |" in md
    assert "| e4 | mrpo:uniform | 1 | failed |" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert len(pd_read(paths["csv"])) == 4


def pd_read(path):
    import pandas as pd

    return pd.read_csv(path)
