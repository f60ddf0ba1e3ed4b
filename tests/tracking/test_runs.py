"""`mrpo runs` against a real local MLflow store (sqlite) holding a few runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mrpo.errors import ConfigError


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Four runs in experiment `mrpo`, as each kind records them (mrpo.tracking.names): two comparison members
    of s1 (DPO and MRPO/vdw), a member of s2, a pipeline run (a long name, three references)."""
    from mlflow import MlflowClient

    tmp_path = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("mrpo", artifact_location=(tmp_path / "mlruns").as_uri())
    client.create_experiment("other", artifact_location=(tmp_path / "mlruns2").as_uri())
    member = {"mrpo.kind": "compare-member"}
    specs = [
        ("dpo-a", {**member, "mrpo.sweep": "s1", "mrpo.sweep_label": "dpo:a"}, "dpo", "n/a", "a", 0.61, 0.40),
        (
            "mrpo-vdw",
            {**member, "mrpo.sweep": "s1", "mrpo.sweep_label": "mrpo:vdw"},
            "mrpo",
            "vdw",
            "a,b",
            0.72,
            0.35,
        ),
        ("mrpo-arwc", {**member, "mrpo.sweep": "s2"}, "mrpo", "arwc", "a,b", 0.55, None),
        (
            "mrpo-uniform-anchor+gpt2_char+llama_expert-b0.1-s3-3f9a1c",
            {"mrpo.kind": "pipeline"},
            "mrpo",
            "uniform",
            "anchor,gpt2_char,llama_expert",
            None,
            None,
        ),
    ]
    for name, tags, objective, strategy, refs, acc, loss in specs:
        run = client.create_run(exp, run_name=name, tags={**tags, "mrpo.reference_set": refs})
        rid = run.info.run_id
        params = {"train.objective": objective, "train.strategy": strategy, "seed": 3, "train.beta": 0.1}
        for key, value in params.items():
            client.log_param(rid, key, value)
        client.log_metric(rid, "train_pairs", 2385 if tags["mrpo.kind"] == "pipeline" else 32)
        if acc is not None:
            client.log_metric(rid, "pref/reward_accuracy_vs_anchor", acc)
        if loss is not None:
            client.log_metric(rid, "train_loss", loss)
        client.log_metric(rid, "extra/score", 1.5)
        client.set_terminated(rid)
    return uri


def test_table_of_one_sweep_with_key_params_and_scores_sorted_by_a_metric(store):
    from mrpo.tracking.runs import runs_table

    text = runs_table(store, "mrpo", {"mrpo.sweep": "s1"}, sort="pref/reward_accuracy_vs_anchor")
    lines = text.splitlines()
    header = lines[0].split()
    assert header == [
        "id",
        "kind",
        "label",
        "objective",
        "strategy",
        "refs",
        "seed",
        "beta",
        "pairs",
        "acc_vs_anchor",
        "loss",
        "run",
    ]
    rows = [ln.split() for ln in lines[2:]]
    assert [r[-1] for r in rows] == ["mrpo-vdw", "dpo-a"]  # best first
    assert rows[0][1:] == [
        "compare-member",
        "mrpo:vdw",
        "mrpo",
        "vdw",
        "a,b",
        "3",
        "0.1",
        "32",
        "0.7200",
        "0.3500",
        "mrpo-vdw",
    ]
    assert rows[1][1:] == [
        "compare-member",
        "dpo:a",
        "dpo",
        "n/a",
        "a",
        "3",
        "0.1",
        "32",
        "0.6100",
        "0.4000",
        "dpo-a",
    ]


def test_every_kind_of_run_in_one_table_of_at_most_120_columns(store):
    """The pipeline run's `pairs` are the pairs it trained on, its accuracy in the same column as the members'
    (a dash: not evaluated); in 120 characters the free-text columns give way (the id names the run), wider
    the run name comes back, shortened to what is left."""
    from mrpo.tracking.runs import runs_table

    text = runs_table(store, "mrpo")
    lines = text.splitlines()
    widest = max(len(ln) for ln in lines)
    assert widest <= 120, text
    header = lines[0].split()
    assert header[:2] == ["id", "kind"] and "run" not in header and len(lines) == 2 + 4
    pipeline = dict(zip(header, next(ln.split() for ln in lines[2:] if "pipeline" in ln), strict=True))
    assert (
        pipeline["pairs"] == "2385" and pipeline["acc_vs_anchor"] == "-" and pipeline["strategy"] == "uniform"
    )
    assert pipeline["refs"] == "anchor,gpt2_char,llama_expert"
    members = [dict(zip(header, ln.split(), strict=True)) for ln in lines[2:] if "compare-member" in ln]
    assert sorted(m["acc_vs_anchor"] for m in members) == ["0.5500", "0.6100", "0.7200"]
    wider = runs_table(store, "mrpo", width=150).splitlines()
    assert max(len(ln) for ln in wider) <= 150 and wider[0].split()[-1] == "run"
    assert next(ln for ln in wider if "pipeline" in ln).split()[-1].startswith("mrpo-uniform-")
    unlimited = runs_table(store, "mrpo", width=0)
    assert "mrpo-uniform-anchor+gpt2_char+llama_expert-b0.1-s3-3f9a1c" in unlimited


def test_filters_extra_columns_and_a_run_without_a_value(store):
    from mrpo.tracking.runs import runs_table

    text = runs_table(
        store, "mrpo", filter_string="params.`train.strategy` != 'vdw'", metrics=["extra/score"], width=0
    )
    lines = text.splitlines()
    assert lines[0].split()[-1] == "extra/score"
    assert sorted(ln.split()[-2] for ln in lines[2:]) == [
        "dpo-a",
        "mrpo-arwc",
        "mrpo-uniform-anchor+gpt2_char+llama_expert-b0.1-s3-3f9a1c",
    ]
    pipeline = next(ln.split() for ln in lines[2:] if "pipeline" in ln)
    assert (
        pipeline[-4:-2] == ["-", "-"] and pipeline[-1] == "1.5000"
    )  # no accuracy, no loss; the extra metric
    assert "no runs" in runs_table(store, "mrpo", {"mrpo.sweep": "nope"})
    assert "no runs" in runs_table(store, "other")
    with pytest.raises(ConfigError, match="no such MLflow experiment"):
        runs_table(store, "missing")


@pytest.mark.slow
def test_cli_prints_the_table_and_refuses_a_bad_tag(store, tmp_path):
    import os

    from helpers import REPO_ROOT

    env_cmd = [sys.executable, "-m", "mrpo.cli", "--params", str(REPO_ROOT / "params.yaml"), "runs"]
    env = dict(os.environ, MLFLOW_TRACKING_URI=store)
    out = subprocess.run([*env_cmd, "--sweep", "s2"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[2].split()[-1] == "mrpo-arwc" and len(out.stdout.splitlines()) == 3
    bad = subprocess.run([*env_cmd, "--tag", "nokey"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "--tag 'nokey': expected KEY=VALUE" in bad.stderr
    help_text = subprocess.run([*env_cmd, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "acc_vs_anchor   held-out (test split) reward accuracy against the anchor" in help_text.stdout
