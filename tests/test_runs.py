"""`mrpo runs` against a real local MLflow store (sqlite) holding a few runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mrpo.errors import ConfigError


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Four runs in experiment `mrpo`: two members of sweep s1 (DPO and MRPO/vdw), one of sweep s2, one
    without."""
    from mlflow import MlflowClient

    tmp_path = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("mrpo", artifact_location=(tmp_path / "mlruns").as_uri())
    client.create_experiment("other", artifact_location=(tmp_path / "mlruns2").as_uri())
    specs = [
        ("dpo-a", {"mrpo.sweep": "s1", "mrpo.sweep_label": "dpo:a"}, "dpo", "uniform", 0.61, 0.40),
        ("mrpo-vdw", {"mrpo.sweep": "s1", "mrpo.sweep_label": "mrpo:vdw"}, "mrpo", "vdw", 0.72, 0.35),
        ("mrpo-arwc", {"mrpo.sweep": "s2"}, "mrpo", "arwc", 0.55, None),
        ("pipeline", {}, "mrpo", "uniform", None, None),
    ]
    for name, tags, objective, strategy, acc, loss in specs:
        run = client.create_run(exp, run_name=name, tags=tags)
        rid = run.info.run_id
        for key, value in {"train.objective": objective, "train.strategy": strategy, "seed": 3}.items():
            client.log_param(rid, key, value)
        if acc is not None:
            client.log_metric(rid, "compare/test_reward_accuracy_vs_anchor", acc)
        if loss is not None:
            client.log_metric(rid, "final/final_loss", loss)
        client.log_metric(rid, "extra/score", 1.5)
        client.set_terminated(rid)
    return uri


def test_table_of_one_sweep_with_key_params_and_scores_sorted_by_a_metric(store):
    from mrpo.tracking.runs import runs_table

    text = runs_table(store, "mrpo", {"mrpo.sweep": "s1"}, sort="compare/test_reward_accuracy_vs_anchor")
    lines = text.splitlines()
    header = lines[0].split()
    assert header == [
        "run",
        "id",
        "status",
        "label",
        "objective",
        "strategy",
        "seed",
        "compare/test_reward_accuracy_vs_anchor",
        "final/final_loss",
    ]
    rows = [ln.split() for ln in lines[2:]]
    assert [r[0] for r in rows] == ["mrpo-vdw", "dpo-a"]  # best first
    assert rows[0][3:] == ["mrpo:vdw", "mrpo", "vdw", "3", "0.7200", "0.3500"]
    assert rows[1][3:] == ["dpo:a", "dpo", "uniform", "3", "0.6100", "0.4000"]


def test_filters_extra_columns_and_a_run_without_a_value(store):
    from mrpo.tracking.runs import runs_table

    text = runs_table(
        store, "mrpo", filter_string="params.`train.strategy` != 'vdw'", metrics=["extra/score"]
    )
    lines = text.splitlines()
    assert lines[0].split()[-1] == "extra/score"
    assert sorted(ln.split()[0] for ln in lines[2:]) == ["dpo-a", "mrpo-arwc", "pipeline"]
    pipeline = next(ln.split() for ln in lines[2:] if ln.startswith("pipeline"))
    assert pipeline[-3:] == ["-", "-", "1.5000"]  # no accuracy, no loss, the extra metric
    assert "no runs" in runs_table(store, "mrpo", {"mrpo.sweep": "nope"})
    assert "no runs" in runs_table(store, "other")
    with pytest.raises(ConfigError, match="no such MLflow experiment"):
        runs_table(store, "missing")


def test_cli_prints_the_table_and_refuses_a_bad_tag(store, tmp_path):
    import os

    from conftest import REPO_ROOT

    env_cmd = [sys.executable, "-m", "mrpo.cli", "--params", str(REPO_ROOT / "params.yaml"), "runs"]
    env = dict(os.environ, MLFLOW_TRACKING_URI=store)
    out = subprocess.run([*env_cmd, "--sweep", "s2"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[2].split()[0] == "mrpo-arwc" and len(out.stdout.splitlines()) == 3
    bad = subprocess.run([*env_cmd, "--tag", "nokey"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "--tag 'nokey': expected KEY=VALUE" in bad.stderr
