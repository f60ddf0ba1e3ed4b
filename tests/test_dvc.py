"""The DVC pipeline on a real git + DVC repo: full repro, no-op repro, and per-reference staleness."""

from __future__ import annotations

import json
import sys
import time

import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT, clone_project, run_tool

STAGES = ["zoo", "prepare", "score@anchor", "score@gpt2_char", "score@llama_expert", "train", "evaluate"]


def dvc(args, cwd, check=True):
    return run_tool([sys.executable, "-m", "dvc", *args], cwd, check=check)


def stale_stages(project) -> set[str]:
    """Stages `dvc status` reports as changed (params, deps or outs)."""
    return set(json.loads(dvc(["status", "--json"], project).stdout.strip().splitlines()[-1]))


def edit_params(project, edit) -> None:
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


STAGE_MODULES = {
    "zoo": "zoo",
    "prepare": "data",
    "score": "scoring",
    "train": "train",
    "evaluate": "evaluate",
}


def mrpo_imports(module: str) -> set[str]:
    """The mrpo modules `module` imports anywhere in its text (function-level imports included), transitively."""
    import ast

    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((REPO_ROOT / "mrpo" / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "mrpo":
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mrpo."):
                todo.append(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names if a.name.startswith("mrpo.")]
    return seen


def test_each_stage_depends_on_every_module_its_command_runs():
    """A change to any code a stage runs makes DVC re-run it; nothing the stage does not run is listed."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for stage, module in STAGE_MODULES.items():
        body = stages[stage].get("do", stages[stage])
        listed = {d.removeprefix("mrpo/").removesuffix(".py") for d in body["deps"] if d.startswith("mrpo/")}
        assert listed == mrpo_imports(module), stage


@pytest.mark.slow
def test_repro_runs_every_stage_in_order_and_writes_the_outputs(tiny_reproduced):
    out, project = tiny_reproduced["output"], tiny_reproduced["path"]
    at = {stage: out.index(f"Running stage '{stage}'") for stage in STAGES}
    scores = [at[s] for s in STAGES if s.startswith("score@")]
    assert max(at["zoo"], at["prepare"]) < min(scores) and max(scores) < at["train"] < at["evaluate"]

    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    # score@gpt2_char is keyed by its own reference's settings, not the others'
    assert set(lock["stages"]["score@gpt2_char"]["params"]["params.yaml"]) == {
        "references.gpt2_char",
        "score",
    }

    for ref in ("anchor", "gpt2_char", "llama_expert"):
        scores = pd.read_parquet(project / "data" / "scores" / f"{ref}.parquet")
        assert len(scores) == 200 and scores["fits"].all()
    train = json.loads((project / "metrics" / "train.json").read_text())
    assert train["steps"] == 6 and train["references"] == 3
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert any(k.startswith("policy/mrpo_facts_mc/") for k in evaluation)
    curves = pd.read_csv(project / "plots" / "train.csv")
    assert {
        "step",
        "loss",
        "rewards/accuracy",
        "weight/anchor",
        "weight/gpt2_char",
        "weight/llama_expert",
    } <= set(curves)
    # metrics are git-tracked (cache: false), outputs DVC-cached
    assert not (project / "metrics" / ".gitignore").exists()
    assert "/policy" in (project / "models" / ".gitignore").read_text()


@pytest.mark.slow
def test_plots_show_colours_each_series_and_includes_the_png_renders(tiny_reproduced, tmp_path):
    import json

    out = dvc(["plots", "show", "--json", "-o", str(tmp_path / "dvc_plots")], tiny_reproduced["path"]).stdout
    plots = json.loads(out)["data"]
    for name, series in (
        ("Loss", {"loss", "loss_smooth", "val_loss"}),
        ("Reward accuracy", {"rewards/accuracy", "rewards/accuracy_smooth", "val_reward_accuracy"}),
        ("Reference weights", {f"weight/{r}_smooth" for r in ("anchor", "gpt2_char", "llama_expert")}),
    ):
        spec = plots[name][0]["content"]
        # .dvc/plots/lines.json: one colour per series (DVC's own templates colour by revision only)
        assert spec["encoding"]["color"]["field"] == "field"
        assert {row["field"] for row in spec["data"]["values"]} == series
        assert spec["encoding"]["x"]["title"] == "training step" and spec["encoding"]["y"]["title"]
    for png in ("loss.png", "reward_accuracy.png", "reference_weights.png"):
        assert plots[f"plots/{png}"][0]["type"] == "image"


@pytest.mark.slow
def test_second_repro_changes_nothing_and_says_so(tiny_reproduced, tmp_path):
    project = clone_project(tiny_reproduced["path"], tmp_path / "p")
    lock_before = (project / "dvc.lock").read_text()
    start = time.perf_counter()
    out = dvc(["repro"], project).stdout
    seconds = time.perf_counter() - start
    print(f"no-op dvc repro: {seconds:.2f}s (full repro {tiny_reproduced['seconds']:.1f}s)")
    assert "Running stage" not in out
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in out
    assert "Data and pipelines are up to date." in out
    assert (project / "dvc.lock").read_text() == lock_before
    assert stale_stages(project) == set()


@pytest.mark.slow
def test_changing_one_reference_reruns_only_its_scoring_and_what_follows(tiny_reproduced, tmp_path):
    project = clone_project(tiny_reproduced["path"], tmp_path / "p")
    before = {
        r: (project / "data" / "scores" / f"{r}.parquet").read_bytes()
        for r in ("anchor", "gpt2_char", "llama_expert")
    }

    edit_params(
        project, lambda p: p["references"]["llama_expert"].update(tokenizer="models/zoo/llama_expert")
    )
    assert stale_stages(project) == {"score@llama_expert", "train", "evaluate"}

    out = dvc(["repro"], project).stdout
    ran = {s for s in STAGES if f"Running stage '{s}'" in out}
    assert ran == {"score@llama_expert", "train", "evaluate"}, out[-3000:]
    for stage in ("zoo", "prepare", "score@anchor", "score@gpt2_char"):
        assert f"Stage '{stage}' didn't change, skipping" in out
    after = {r: (project / "data" / "scores" / f"{r}.parquet").read_bytes() for r in before}
    assert after["anchor"] == before["anchor"] and after["gpt2_char"] == before["gpt2_char"]
    assert stale_stages(project) == set()


@pytest.mark.slow
def test_adding_a_reference_scores_only_that_one(tiny_reproduced, tmp_path):
    project = clone_project(tiny_reproduced["path"], tmp_path / "p")
    edit_params(project, lambda p: p["references"].update(anchor_twin={"model": "models/zoo/anchor"}))
    stale = stale_stages(project)
    assert stale == {"score@anchor_twin", "train", "evaluate"}
    out = dvc(["repro", "--dry"], project).stdout
    assert "Running stage 'score@anchor_twin'" in out
    assert "Running stage 'score@anchor'" not in out and "Running stage 'score@gpt2_char'" not in out


# ---------------------------------------------------------------- fast: the pipeline's declaration, a one-stage sweep


def test_dvc_yaml_declares_every_stage_with_params_deps_and_outs(tiny_project):
    from flows.stages import pipeline_stages
    from mrpo.config import load_config

    cfg = load_config(REPO_ROOT / "params.yaml")
    listed = dvc(["stage", "list", "--name-only"], tiny_project).stdout.split()
    assert listed == pipeline_stages(cfg) == STAGES
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        assert body["cmd"].startswith("mrpo "), name
        assert body["params"] and body["deps"] and body["outs"], (
            f"{name}: params, deps and outs must be declared"
        )
    assert spec["stages"]["score"]["foreach"] == "${references}"
    assert spec["stages"]["train"]["metrics"] == [
        {"${train.metrics_file}": {"cache": False, "persist": True}}
    ]
    assert spec["stages"]["evaluate"]["metrics"] == [
        {"${evaluate.metrics_file}": {"cache": False, "persist": True}}
    ]
    # the weights plot names exactly the default profile's references
    weights = next(p["Reference weights"] for p in spec["plots"] if "Reference weights" in p)
    assert weights["y"]["${train.plots_file}"] == [f"weight/{r.name}_smooth" for r in cfg.references]
    assert weights["y_label"].startswith("reference weight") and weights["x_label"] == "training step"
    assert weights["template"] == "lines" and (REPO_ROOT / ".dvc" / "plots" / "lines.json").is_file()
    # every curve has its validation counterpart, and the PNG renders are image plots and train outputs
    for name, column in (("Loss", "val_loss"), ("Reward accuracy", "val_reward_accuracy")):
        plot = next(p[name] for p in spec["plots"] if isinstance(p, dict) and name in p)
        assert plot["y"]["${train.plots_dir}/validation.csv"] == [column]
    pngs = [f"${{train.plots_dir}}/{n}" for n in ("loss.png", "reward_accuracy.png", "reference_weights.png")]
    assert [p for p in spec["plots"] if isinstance(p, str)] == pngs
    train_outs = [next(iter(o)) for o in spec["stages"]["train"]["outs"]]
    assert set(pngs) <= set(train_outs) and "${train.plots_dir}/validation.csv" in train_outs
    # DVC resolves the interpolations against params.yaml: one score stage per reference, its own out
    described = dvc(["stage", "list", "score@gpt2_char"], tiny_project).stdout.split()
    assert described[0] == "score@gpt2_char" and "data/scores/gpt2_char.parquet" in described


def test_exp_run_sets_a_param_and_reruns_only_that_stage(tiny_project, tmp_path):
    import json

    project = clone_project(tiny_project, tmp_path / "p")
    dvc(["repro", "prepare"], project)
    run_tool(["git", "add", "-A"], project)
    run_tool(["git", "commit", "-qm", "prepared"], project)
    out = dvc(["exp", "run", "-n", "small", "-S", "data.synthetic_pairs=120", "prepare"], project).stdout
    assert "Running stage 'prepare'" in out, out[-2000:]
    report = json.loads((project / "data" / "prepared" / "report.json").read_text())
    assert report["rows_read"] == 120
    assert yaml.safe_load((project / "params.yaml").read_text())["data"]["synthetic_pairs"] == 120
    shown = json.loads(dvc(["exp", "show", "--json"], project).stdout)
    text = json.dumps(shown)
    assert '"small"' in text and '"synthetic_pairs": 120' in text
    # the same -S again: nothing is stale, DVC says so instead of re-running
    again = dvc(["exp", "run", "-S", "data.synthetic_pairs=120", "prepare"], project).stdout
    assert "Running stage 'prepare'" not in again
