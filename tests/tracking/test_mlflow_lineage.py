"""MLflow lineage against a real `mlflow server` on loopback: a pipeline run and a sweep member
recorded there, searched and compared by reference set and by score through MlflowClient."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import clone_project, free_port, prefect_api, run_tool, start_mlflow_server, stop_group

from mrpo.reporting import plots


@pytest.fixture()
def mlflow_server(tmp_path):
    """`mlflow server` with a sqlite backend and local artifacts in tmp; yields its URI."""
    port = free_port()
    server = start_mlflow_server(port, tmp_path / "mlflow")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(server)


@pytest.mark.slow
def test_runs_are_searchable_by_reference_set_and_score(
    mlflow_server, prefect_server, tiny_reproduced, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    from flows.lineage import record_lineage
    from flows.sweep import sweep
    from mrpo.config.load import load_config

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
    with prefect_api(prefect_server):
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
    from mrpo.data.prepared import prepared_digest

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
    member = client.search_runs(ids, "tags.`mrpo.reference_set` = 'llama_expert'")
    assert len(member) == 1
    assert member[0].data.tags["mlflow.parentRunId"] == result["parent_run_id"]
    member_params = member[0].data.params
    assert member_params["train.objective"] == "dpo" and member_params["train.strategy"] == "n/a"
    # DVC passes its experiment to the stage's command: the run says `dvc exp run` launched it, and which
    assert member[0].data.tags["mrpo.launcher"] == "dvc exp run"
    assert member[0].data.tags["mrpo.dvc_experiment"] == member[0].info.run_name
    assert tags["mrpo.launcher"] == "dvc repro" and tags["mrpo.dvc_stage"] == "train"

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


@pytest.mark.slow
def test_record_lineage_completes_the_train_stage_run(tiny_project, tmp_path, monkeypatch):
    """Lineage on a real sqlite store: `prepare` really run by DVC; the train and evaluate outputs
    (run record, metrics, curves) written here in their documented shapes, since only the lineage
    logic is under test (the slow test above runs the real stages)."""
    import hashlib
    import json

    import pandas as pd
    from mlflow import MlflowClient

    from flows.lineage import record_lineage
    from mrpo.config.load import load_config
    from mrpo.config.schema import config_to_flat_dict
    from mrpo.data.prepared import prepared_digest
    from mrpo.tracking.names import params_digest
    from mrpo.tracking.store import write_run_record
    from mrpo.tracking.tracker import start_pipeline_run

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
    # the full records (MLflow's names), beside the DVC metrics files' headline view
    (project / cfg.evaluate.results_dir).mkdir(parents=True, exist_ok=True)
    (project / cfg.evaluate.results_dir / "metrics.json").write_text(
        json.dumps({"policy/mrpo_facts_mc/acc": 0.625, "pref": {"n": 18}})
    )
    (project / "metrics" / "train.json").write_text(json.dumps({"steps": 3, "train_loss": 0.69}))
    (project / "metrics" / "eval.json").write_text(json.dumps({"mrpo_facts_mc": 0.625}))  # the headline view
    # The curves as the train stage writes them (mrpo.stages.train.write_plots), from a three-step log.
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
    (project / cfg.evaluate.results_dir).mkdir(parents=True, exist_ok=True)
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
    # the scores under the evaluate stage's own names (it logs them itself when it has a run): one name each
    assert metrics == {"policy/mrpo_facts_mc/acc": 0.625, "pref.n": 18.0}
    assert tags["mrpo.score.policy/mrpo_facts_mc/acc"] == "0.6250" and tags["mrpo.flow"] == "pipeline"
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outputs = json.loads(
        Path(client.download_artifacts(run.run_id, "lineage/dvc_outputs.json", str(tmp_path))).read_text()
    )["outputs"]
    assert outputs["data/prepared"] == lock["stages"]["prepare"]["outs"][0]["md5"]
    assert tags["mrpo.dvc_outputs_digest"] == params_digest(outputs)
    assert not [k for k in tags if k.startswith("mrpo.dvc_out.")]  # one artifact, not a tag per output
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


@pytest.mark.slow
def test_a_dvc_repro_run_records_its_own_lineage_and_evaluate_completes_it(tiny_project, tmp_path):
    """No Prefect: plain `dvc repro` in a work tree with an uncommitted change. Train records the git state
    (dirty, with the diff's hash), that DVC launched it and the dvc.lock it started from; evaluate completes
    the run (outputs' DVC digests, scores, artifacts, the card with scores) without touching train's outputs;
    `python -m mrpo.tracking.lineage` afterwards records the final dvc.lock."""
    import hashlib
    import json

    from mlflow import MlflowClient

    from mrpo.config.load import load_config
    from mrpo.data.prepared import prepared_digest
    from mrpo.tracking.store import read_run_record

    project = clone_project(tiny_project, tmp_path / "project")
    with (project / "prefect.yaml").open("a") as f:
        f.write("# a local change, not committed\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_tool([sys.executable, "-m", "dvc", "repro"], project, env={"MLFLOW_TRACKING_URI": uri})
    assert "up to date" in run_tool([sys.executable, "-m", "dvc", "status"], project).stdout  # nothing stale

    cfg = load_config(project / "params.yaml")
    record = read_run_record(project / cfg.train.output_dir)
    client = MlflowClient(uri)
    run = client.get_run(record.run_id)
    tags = run.data.tags
    head = run_tool(["git", "rev-parse", "HEAD"], project).stdout.strip()
    diff = subprocess.run(
        ["git", "diff", "HEAD", "--binary", "--", "prefect.yaml"],
        cwd=project,
        capture_output=True,
        check=True,
    ).stdout
    assert tags["mrpo.launcher"] == "dvc repro" and tags["mrpo.dvc_stage"] == "train"
    assert tags["mrpo.git_commit"] == head and tags["mlflow.source.git.commit"] == head
    assert tags["mrpo.git_dirty"] == "True" and tags["mrpo.git_changed"] == "prefect.yaml"
    assert tags["mrpo.git_diff_sha256"] == hashlib.sha256(diff).hexdigest()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    policy_md5 = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "models/policy")
    outputs = Path(client.download_artifacts(record.run_id, "lineage/dvc_outputs.json", str(tmp_path)))
    # train's entry, written before evaluate ran
    assert json.loads(outputs.read_text())["outputs"]["models/policy"] == policy_md5
    final_lock = hashlib.sha256((project / "dvc.lock").read_bytes()).hexdigest()
    assert tags["mrpo.dvc_lock_digest_at_start"] != tags["mrpo.dvc_lock_digest"] != final_lock
    assert tags["mrpo.prepared_digest"] == prepared_digest(project / cfg.data.output_dir)
    assert tags["mrpo.strategy"] == "uniform" and "mrpo.score.pref/reward_accuracy_vs_anchor" in tags

    # the scores once each, under the evaluate stage's names; artifacts once each
    metrics = run.data.metrics
    assert "policy/mrpo_facts_mc/acc" in metrics and not [
        m for m in metrics if m.startswith(("eval.", "final/"))
    ]
    top = {f.path for f in client.list_artifacts(record.run_id)}
    assert "evaluation" not in top and {"plots", "metrics", "lm_eval", "lineage", "data"} <= top
    lm_eval = {f.path for f in client.list_artifacts(record.run_id, "lm_eval")}
    assert {"lm_eval/policy.json", "lm_eval/anchor.json", "lm_eval/model_card.md"} <= lm_eval
    assert len(client.list_artifacts(record.run_id, "plots")) >= 4  # train.csv and the PNGs

    # datasets and the logged model; the model carries the card with the evaluation's scores
    assert len(run.inputs.dataset_inputs) == 3
    [output] = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.metrics and {m.key for m in model.metrics} >= {"policy/mrpo_facts_mc/acc"}
    card = Path(client.download_artifacts(record.run_id, "lm_eval/model_card.md", str(tmp_path)))
    scored_card = card.read_text()
    assert scored_card.startswith((project / "models/policy/README.md").read_text().rstrip("\n"))
    assert "## Evaluation" in scored_card and "| `policy/mrpo_facts_mc/acc` |" in scored_card
    assert "## Evaluation" not in (project / "models/policy/README.md").read_text()

    # after `dvc repro` has written the final dvc.lock, one command records it
    command = [sys.executable, "-m", "mrpo.tracking.lineage"]
    out = run_tool(command, project, env={"MLFLOW_TRACKING_URI": uri}).stdout
    assert f"lineage recorded on MLflow run {record.run_id}" in out
    assert client.get_run(record.run_id).data.tags["mrpo.dvc_lock_digest"] == final_lock


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
    # every member overrides what the base params.yaml might set against it
    # (a `fixed` strategy and its weights)
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

    # a list of loss types: every member once per loss type (a list in it is a weighted combination)
    by_loss = sweep_members(["anchor"], ["uniform"], seeds=[0], loss_types=["robust", ["sigmoid", "sft"]])
    assert [m.label for m in by_loss] == [
        "dpo:anchor:robust",
        "dpo:anchor:sigmoid+sft",
        "mrpo:uniform:robust",
        "mrpo:uniform:sigmoid+sft",
    ]
    assert by_loss[3].overrides["train.loss_type"] == ["sigmoid", "sft"]
    assert by_loss[2].overrides["train.objective"] == "mrpo" and by_loss[2].slug == "mrpo-uniform-robust-s0"
    assert set_param_args(by_loss[3].overrides)[-1] == 'train.loss_type=["sigmoid", "sft"]'
    with pytest.raises(ValueError, match="loss_types: 'kto' is not one of"):
        sweep_members(["anchor"], ["uniform"], loss_types=[["sigmoid", "kto"]])


def test_comparison_table_aggregates_over_seeds(tmp_path):
    from flows.sweep import aggregate, write_comparison

    m = "eval.mrpo_facts_mc"  # metrics/eval.json's headline name, by file stem
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


# ---------------------------------------------------------------- every kind of run in one store


@pytest.mark.slow
def test_pipeline_and_comparison_runs_sort_together_by_reference_set_and_accuracy(scored, tmp_path):
    """One real sqlite store: a pipeline run (the train stage, then evaluate's preference metrics) and a
    comparison (DPO with two references, MRPO with one strategy). Every trained run carries the reference set
    as tag `mrpo.reference_set` and held-out reward accuracy against the anchor as metric
    `pref/reward_accuracy_vs_anchor`, so MLflow sorts them in one query."""
    import dataclasses
    import json

    from helpers import config
    from mlflow import MlflowClient

    from mrpo.evaluation.lmeval import EvalSettings
    from mrpo.evaluation.preference import policy_preference_metrics, policy_reference
    from mrpo.stages.compare import report, run_all, start
    from mrpo.stages.evaluate import log_to_mlflow
    from mrpo.stages.train import train
    from mrpo.tracking import names

    short = {"train.max_steps": 2, "train.eval_steps": 2, "train.save_steps": 2}
    outputs = {
        "evaluate.metrics_file": str(tmp_path / "eval.json"),
        "evaluate.results_dir": str(tmp_path / "eval"),
    }
    cfg = config(scored, tmp_path, **short, **outputs)
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, device="cpu"))
    train(cfg)
    metrics = policy_preference_metrics(cfg, policy_reference(cfg), EvalSettings.from_config(cfg))
    pipeline_id = log_to_mlflow(cfg, metrics)
    compare = dataclasses.replace(
        cfg.compare,
        seeds=(0,),
        train_pairs=16,
        num_epochs=1.0,
        dpo_references=("anchor", "gpt2_char"),
        strategies=("vdw",),
        multi_dpo=False,
        lm_eval_limit=0,
        bootstrap=50,
        output_dir=str(tmp_path / "sweeps"),
        plots_file=str(tmp_path / "plots/comparison.csv"),
        image_file=str(tmp_path / "plots/comparison.png"),
    )
    comparison = start(dataclasses.replace(cfg, compare=compare), "one-store")
    results = run_all(comparison)
    report(comparison, results)

    client = MlflowClient(cfg.tracking.tracking_uri)
    ids = [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id]
    ranked = client.search_runs(
        ids,
        f"metrics.`{names.ACCURACY_VS_ANCHOR}` >= 0",
        order_by=[f"tags.`{names.REFERENCE_SET}` ASC", f"metrics.`{names.ACCURACY_VS_ANCHOR}` DESC"],
    )
    kinds = [r.data.tags[names.KIND] for r in ranked]
    assert sorted(kinds) == ["compare-member"] * 3 + ["pipeline"]
    for run in ranked:  # every trained run has both, and the same params, whatever its kind
        assert run.data.tags[names.REFERENCE_SET] and 0 <= run.data.metrics[names.ACCURACY_VS_ANCHOR] <= 1
        assert {"train.objective", "train.strategy", "train.beta", "seed"} <= set(run.data.params)
        assert run.data.tags[names.SOURCE_NAME] and run.data.tags[names.SOURCE_TYPE] == "LOCAL"
        assert run.data.metrics[names.TRAIN_PAIRS] > 0 and len(run.inputs.dataset_inputs) == 3
        assert run.data.tags[names.DESCRIPTION] and run.data.tags[names.PARAMS_DIGEST]
    keys = [(r.data.tags[names.REFERENCE_SET], -r.data.metrics[names.ACCURACY_VS_ANCHOR]) for r in ranked]
    assert keys == sorted(keys)
    assert [k[0] for k in keys] == [
        "anchor",
        "anchor,gpt2_char,llama_expert",
        "anchor,gpt2_char,llama_expert",
        "gpt2_char",
    ]
    by_kind = {(r.data.tags[names.KIND], r.data.tags[names.REFERENCE_SET]): r for r in ranked}
    pipeline = by_kind[("pipeline", "anchor,gpt2_char,llama_expert")]
    assert pipeline.info.run_id == pipeline_id
    assert pipeline.data.metrics[names.ACCURACY_VS_ANCHOR] == metrics[names.ACCURACY_VS_ANCHOR]
    assert (
        pipeline.data.metrics[names.TRAIN_PAIRS]
        == json.loads((tmp_path / "policy/train_metrics.json").read_text())["train_pairs"]
    )

    # a member: what reproduces it, and its accuracy is the report's
    dpo = by_kind[("compare-member", "anchor")]
    tags, params = dpo.data.tags, dpo.data.params
    assert params["train.objective"] == "dpo" and params["train.strategy"] == tags["mrpo.strategy"] == "n/a"
    assert tags[names.GROUP] == "one-store" and tags["mrpo.seed"] == params["seed"] == "0"
    assert tags[names.PARAMS_DIGEST] == names.params_digest(params)
    assert tags.get("mrpo.git_commit") == pipeline.data.tags.get("mrpo.git_commit")
    assert tags["mrpo.prepared_digest"] == pipeline.data.tags["mrpo.prepared_digest"]
    assert (
        tags[names.PARENT] == comparison.parent_run.run_id and "dpo:anchor seed 0" in tags[names.DESCRIPTION]
    )
    result = next(r for r in results if r.member.label == "dpo:anchor")
    assert dpo.data.metrics[names.ACCURACY_VS_ANCHOR] == result.accuracy and result.train_pairs == 16
    vdw = by_kind[("compare-member", "anchor,gpt2_char,llama_expert")]
    assert vdw.data.params["train.strategy"] == "vdw"

    # the pipeline run's DVC outputs are one artifact and one digest tag, not a tag each
    assert not [k for k in pipeline.data.tags if k.startswith("mrpo.dvc_out.")]
    parent = client.get_run(comparison.parent_run.run_id).data.tags
    assert parent[names.KIND] == "compare" and names.REFERENCE_SET not in parent  # trained nothing itself

    # `mrpo runs` on the same store: every kind in one table of at most 120 characters a line, the
    # pipeline run's pairs those it trained on, the accuracy in one column
    from mrpo.tracking.runs import runs_table

    table = runs_table(cfg.tracking.tracking_uri, cfg.tracking.experiment, sort=names.ACCURACY_VS_ANCHOR)
    print(table)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 120 and len(lines) == 2 + 5  # 4 trained runs and the parent
    header = lines[0].split()
    rows = [dict(zip(header, line.split(), strict=False)) for line in lines[2:]]
    top = rows[0]
    assert top["acc_vs_anchor"] == f"{ranked_best(ranked):.4f}"
    pipeline_row = next(r for r in rows if r["kind"] == "pipeline")
    assert pipeline_row["pairs"] == str(int(pipeline.data.metrics[names.TRAIN_PAIRS]))


def ranked_best(runs) -> float:
    from mrpo.tracking import names

    return max(r.data.metrics[names.ACCURACY_VS_ANCHOR] for r in runs)
