"""A tracking server that is down, dies mid-run or never answers; credentials in the tracking URI; stores that
are damaged, deleted or reached from a copy of the project (issue 24: bugs 5, 6, 8 and the MLflow cases)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO_ROOT, config, free_port, run_tool, start_mlflow_server, stop_group

PASSWORD = "s3cret-pw-4c1d"


@contextlib.contextmanager
def dead_endpoint(kind: str):
    """`refused`: a port nothing listens on; `silent`: a socket that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        if kind == "silent":
            sock.listen(16)  # the kernel completes the handshake; nobody ever reads or writes
        else:
            sock.close()
        yield f"http://127.0.0.1:{port}"


def mrpo(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_tool([sys.executable, "-m", "mrpo.cli", *args], cwd, env=env, check=False)


# ---------------------------------------------------------------- URIs as recorded


def test_user_info_is_removed_and_a_store_in_the_project_is_recorded_relative(tmp_path, monkeypatch):
    from mrpo.tracking.uri import portable, redact, resolve

    assert redact(f"http://mrpo:{PASSWORD}@host:5000/x") == "http://host:5000/x"
    assert redact(f"see https://tok:{PASSWORD}@a.b and postgresql://u:{PASSWORD}@db/m") == (
        "see https://a.b and postgresql://db/m"
    )
    assert redact("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert portable(f"sqlite:///{tmp_path / 'mlflow.db'}") == "sqlite:///mlflow.db"
    assert portable("sqlite:////elsewhere/mlflow.db") == "sqlite:////elsewhere/mlflow.db"
    assert resolve("sqlite:///mlflow.db") == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    # inside `dvc exp run --temp` DVC_ROOT names the main workspace: a relative store resolves there
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "main"))
    assert resolve("sqlite:///mlflow.db") == f"sqlite:///{(tmp_path / 'main').resolve() / 'mlflow.db'}"


def test_evaluate_in_a_copied_checkout_reopens_the_copy_s_store(tmp_path, monkeypatch):
    """The run record names a store inside the project relative to it: a copy of the project (store
    included) logs into its own mlflow.db, never into the original's."""
    from mrpo.tracking.store import PipelineRun, read_run_record, write_run_record

    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    original = tmp_path / "original"
    (original / "models").mkdir(parents=True)
    monkeypatch.chdir(original)
    write_run_record("models/policy", PipelineRun("r1", "0", f"sqlite:///{original / 'mlflow.db'}"))
    recorded = json.loads((original / "models/policy.mlflow_run.json").read_text())
    assert recorded["tracking_uri"] == "sqlite:///mlflow.db"
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    monkeypatch.chdir(copy)
    assert read_run_record("models/policy").tracking_uri == f"sqlite:///{copy.resolve() / 'mlflow.db'}"


# ---------------------------------------------------------------- an unreachable server: seconds, one line


@pytest.mark.parametrize("kind", ["refused", pytest.param("silent", marks=pytest.mark.slow)])
def test_an_unreachable_server_stops_a_stage_before_any_model_loads_with_one_line(kind, tmp_path):
    from mrpo.config.load import load_config
    from mrpo.errors import ConfigError
    from mrpo.tracking.health import check_tracking

    with dead_endpoint(kind) as uri:
        cfg = load_config(REPO_ROOT / "params.yaml")
        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            start = time.perf_counter()
            with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI: the MLflow tracking server") as err:
                check_tracking(cfg, "train")
            assert time.perf_counter() - start < 5
            assert "\n" not in str(err.value)
        finally:
            del os.environ["MLFLOW_TRACKING_URI"]

        start = time.perf_counter()
        proc = mrpo(
            ["--params", str(REPO_ROOT / "params.yaml"), "train"], tmp_path, env={"MLFLOW_TRACKING_URI": uri}
        )
        seconds = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 2, proc.stdout
    assert len(lines) == 1 and "is unreachable" in lines[0] and uri in lines[0], proc.stdout
    assert "Traceback" not in proc.stdout and seconds < 60
    assert not (tmp_path / "models").exists()


# ---------------------------------------------------------------- damaged, deleted, rejected


@pytest.mark.slow
def test_a_damaged_store_a_deleted_experiment_and_a_rejected_filter_are_one_line_each(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from mrpo.config.load import load_config
    from mrpo.errors import ConfigError
    from mrpo.tracking.tracker import start_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    cfg = load_config(REPO_ROOT / "params.yaml", {"tracking.tracking_uri": uri})
    run = start_run(cfg, kind="pipeline", name="one", source="test")
    run.end()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("mrpo").experiment_id
    params = ["--params", str(REPO_ROOT / "params.yaml"), "--set", f"tracking.tracking_uri={uri}"]

    proc = mrpo([*params, "runs", "--filter", "metrics.loss >> 1"], tmp_path)
    assert proc.returncode == 2 and len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    assert "--filter 'metrics.loss >> 1': MLflow rejects it" in proc.stdout

    client.delete_experiment(experiment)
    with pytest.raises(ConfigError, match=f"mlflow experiments restore --experiment-id {experiment}"):
        start_run(cfg, kind="pipeline", name="two", source="test")

    db.write_bytes(b"this is not a database" * 100)
    proc = mrpo([*params, "runs"], tmp_path)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout
    assert f"tracking.tracking_uri: {db} is not a readable MLflow database" in lines[0]
    assert f"mv {db} {db}.broken" in lines[0]


def test_a_killed_comparison_s_parent_ends_killed_and_a_rerun_replaces_its_members(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from mrpo.config.load import load_config
    from mrpo.tracking import names
    from mrpo.tracking.comparison import end_stale_parents, replace_earlier_member
    from mrpo.tracking.tracker import start_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(REPO_ROOT / "params.yaml", {"tracking.tracking_uri": uri})
    tags = {names.GROUP: "compare-x"}
    parent = start_run(cfg, kind="compare", name="compare-x", source="test", tags=tags)  # killed: RUNNING
    member = start_run(
        cfg, kind="compare-member", name="compare-x-a-s0", source="test", tags=tags, parent=parent
    )
    member.end()

    end_stale_parents(cfg, "compare-x")
    replace_earlier_member(cfg, "compare-x", "compare-x-a-s0")
    client = MlflowClient(uri)
    assert client.get_run(parent.run_id).info.status == "KILLED"
    assert client.get_run(member.run_id).info.lifecycle_stage == "deleted"
    replace_earlier_member(cfg, "compare-x", "compare-x-b-s0")  # another member: nothing to replace
    runs = client.search_runs([parent.run.experiment_id], f"tags.`{names.GROUP}` = 'compare-x'")
    assert [r.info.run_id for r in runs] == [parent.run_id]


# ---------------------------------------------------------------- a server that dies mid-run


@pytest.mark.slow
def test_a_server_stopped_mid_run_neither_stops_nor_slows_training_and_its_records_land_when_it_returns(
    scored, tmp_path, monkeypatch, caplog
):
    """Training goes on while the server is down, every output is written, the records are kept in the file
    the warning names; when the server is back the next Tracker of the run replays them: every step's loss,
    the run FINISHED and tagged with what happened."""
    from mlflow import MlflowClient
    from transformers import TrainerCallback

    from mrpo.stages.train import train
    from mrpo.tracking.outbox import OUTAGE_TAG
    from mrpo.tracking.store import read_run_record
    from mrpo.tracking.tracker import Tracker

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = config(scored, tmp_path / "out", **{"train.max_steps": 10, "train.logging_steps": 1})
    server = start_mlflow_server(port, tmp_path)
    stopped_at = {}

    class StopServer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3 and not stopped_at:
                stop_group(server)
                stopped_at["t"] = time.perf_counter()

    try:
        metrics = train(cfg, callbacks=[StopServer()])
        after_stop = time.perf_counter() - stopped_at["t"]
        assert metrics["steps"] == 10
        for path in (
            "policy/model.safetensors",
            "metrics/train.json",
            "plots/train.csv",
            "policy.mlflow_run.json",
        ):
            assert (tmp_path / "out" / path).is_file(), path
        run_id = read_run_record(cfg.train.output_dir).run_id
        kept = tmp_path / "logs" / "mlflow-outbox" / run_id / "records.jsonl"
        warnings = [r.getMessage() for r in caplog.records if str(kept) in r.getMessage()]
        assert warnings, [r.getMessage() for r in caplog.records if "mlflow" in r.getMessage()]
        records = [json.loads(line) for line in kept.read_text().splitlines()]
        assert records[-1]["op"] == "set_terminated" and records[-1]["args"] == {"status": "FINISHED"}
        assert after_stop < 60, after_stop  # the rest of training, outputs included: no request waits it out

        server = start_mlflow_server(port, tmp_path)
        Tracker(read_run_record(cfg.train.output_dir))  # what evaluate does first: the kept records land
        assert not kept.exists()
        client = MlflowClient(uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert "replayed" in run.data.tags[OUTAGE_TAG]
        assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 11))
        assert "train_loss" in run.data.metrics
    finally:
        stop_group(server)


# ---------------------------------------------------------------- credentials never recorded


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_is_in_no_output_of_a_run(scored, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from mrpo.reporting.summary import mlflow_ui_command, run_lines, summary_markdown
    from mrpo.stages.train import train
    from mrpo.tracking.store import read_run_record

    port = free_port()
    uri = f"http://mrpo:{PASSWORD}@127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    server = start_mlflow_server(port, tmp_path / "server")
    try:
        cfg = config(scored, tmp_path / "out", **{"tracking.tracking_uri": uri})
        train(cfg)
        record = read_run_record(cfg.train.output_dir)
        assert record.tracking_uri == uri  # used with the credentials the environment gives
        texts = {str(p): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
        texts["summary"] = summary_markdown(cfg, {}, {}, record, tmp_path).encode()
        texts["summary lines"] = "\n".join(run_lines(record)).encode()
        texts["ui"] = mlflow_ui_command(record.tracking_uri, tmp_path).encode()
        run = MlflowClient(uri).get_run(record.run_id)
        texts["params"] = json.dumps(run.data.params).encode()
        texts["tags"] = json.dumps(run.data.tags).encode()
        assert run.data.params["tracking.tracking_uri"] == f"http://127.0.0.1:{port}"
        leaked = [name for name, text in texts.items() if PASSWORD.encode() in text]
        assert leaked == []
        assert len(texts) > 10
    finally:
        stop_group(server)


# ---------------------------------------------------------------- dvc exp run --temp


@pytest.mark.slow
def test_a_temp_dvc_experiment_records_its_run_in_the_main_workspace_and_evaluate_finds_it(
    tiny_reproduced, tmp_path
):
    """`dvc exp run --temp` runs in a workspace DVC deletes afterwards: the relative default store resolves to
    the main workspace (DVC_ROOT), so the run outlives it; after `dvc exp apply`, `mrpo evaluate` logs into
    that run, the one that trained the applied policy."""
    from helpers import clone_project
    from mlflow import MlflowClient

    project = clone_project(tiny_reproduced["path"], tmp_path / "p")
    run_tool(["git", "add", "-A"], project)
    run_tool(["git", "commit", "-qm", "reproduced"], project)
    env = {"MLFLOW_TRACKING_URI": ""}
    dvc = [sys.executable, "-m", "dvc"]
    run_tool([*dvc, "exp", "run", "--temp", "-n", "beta2", "-S", "train.beta=0.2"], project, env=env)
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db"))
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mrpo").experiment_id
    runs = client.search_runs([experiment], "params.`train.beta` = '0.2'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "pref/reward_accuracy_vs_anchor" in runs[0].data.metrics  # evaluate ran in the temp workspace too

    run_tool([*dvc, "exp", "apply", "beta2"], project, env=env)
    proc = mrpo(["evaluate"], project, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert runs[0].info.run_id in proc.stdout, proc.stdout[-3000:]
