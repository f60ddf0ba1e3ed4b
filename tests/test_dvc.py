"""The DVC pipeline on a real git + DVC repo: full repro, no-op repro, and per-reference staleness."""

from __future__ import annotations

import json
import sys
import time

import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT, clone_project, run_tool

STAGES = [
    "zoo",
    "prepare",
    "score@anchor",
    "score@gpt2_char",
    "score@llama_mul",
    "diagnose",
    "train",
    "evaluate",
]


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
    "diagnose": "diagnostics",
    "train": "train",
    "evaluate": "evaluate",
}


def mrpo_imports(module: str) -> set[str]:
    """The mrpo modules `module` imports anywhere in its text
    (function-level imports included), transitively."""
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
    assert max(scores) < at["diagnose"]

    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    # score@gpt2_char is keyed by its own reference's settings, not the others'
    assert set(lock["stages"]["score@gpt2_char"]["params"]["params.yaml"]) == {
        "references.gpt2_char",
        "score",
    }

    for ref in ("anchor", "gpt2_char", "llama_mul"):
        scores = pd.read_parquet(project / "data" / "scores" / f"{ref}.parquet")
        assert len(scores) == 200 and scores["fits"].all()
    train = json.loads((project / "metrics" / "train.json").read_text())
    assert train["steps"] == 6 and train["references"] == 3
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert any(k.startswith("policy/mrpo_arith_mc/") for k in evaluation)
    curves = pd.read_csv(project / "plots" / "train.csv")
    assert {
        "step",
        "loss",
        "rewards/accuracy",
        "weight/anchor",
        "weight/gpt2_char",
        "weight/llama_mul",
    } <= set(curves)
    # metrics are git-tracked (cache: false), outputs DVC-cached
    assert not (project / "metrics" / ".gitignore").exists()
    assert "/policy" in (project / "models" / ".gitignore").read_text()


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
        for r in ("anchor", "gpt2_char", "llama_mul")
    }

    edit_params(project, lambda p: p["references"]["llama_mul"].update(tokenizer="models/zoo/llama_mul"))
    assert stale_stages(project) == {"score@llama_mul", "diagnose", "train", "evaluate"}

    out = dvc(["repro"], project).stdout
    ran = {s for s in STAGES if f"Running stage '{s}'" in out}
    assert ran == {"score@llama_mul", "diagnose", "train", "evaluate"}, out[-3000:]
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
    assert stale == {"score@anchor_twin", "diagnose", "train", "evaluate"}
    out = dvc(["repro", "--dry"], project).stdout
    assert "Running stage 'score@anchor_twin'" in out
    assert "Running stage 'score@anchor'" not in out and "Running stage 'score@gpt2_char'" not in out


# ---------------------------------------------------------------- fast: pipeline declaration, one-stage sweep


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
    assert spec["stages"]["diagnose"]["metrics"] == [
        {"${diagnose.metrics_file}": {"cache": False, "persist": True}}
    ]
    assert spec["stages"]["evaluate"]["metrics"] == [
        {"${evaluate.metrics_file}": {"cache": False, "persist": True}}
    ]
    # the weights plot names exactly the default profile's references
    weights = next(p["Reference weights"] for p in spec["plots"] if "Reference weights" in p)
    assert weights["y"]["${train.plots_file}"] == [f"weight/{r.name}" for r in cfg.references]
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


@pytest.mark.slow
def test_references_scored_at_once_outside_repro_are_committed_and_dvc_then_sees_them_up_to_date(
    tiny_project, tmp_path
):
    """The multi-GPU recipe in the README: DVC says which score stages are stale, they run at the same time
    (one under torchrun with 2 ranks, one alone; on GPUs each with its own CUDA_VISIBLE_DEVICES), `dvc commit`
    records them, and `dvc repro` then skips them."""
    import os
    import subprocess

    project = clone_project(tiny_project, tmp_path / "p")
    dvc(["repro", "zoo", "prepare"], project)
    assert {"score@anchor", "score@gpt2_char"} <= stale_stages(project)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    score = [sys.executable, "-m", "mrpo.cli", "score", "--reference"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    jobs = [
        subprocess.Popen(
            [*torchrun, "-m", "mrpo.cli", "score", "--reference", "anchor"], cwd=project, env=env
        ),
        subprocess.Popen([*score, "gpt2_char"], cwd=project, env=env),
    ]
    assert [job.wait(timeout=600) for job in jobs] == [0, 0]
    dvc(["commit", "-f", "score@anchor", "score@gpt2_char"], project)
    stale = stale_stages(project)
    assert "score@anchor" not in stale and "score@gpt2_char" not in stale and "score@llama_mul" in stale
    out = dvc(["repro", "--dry", "score@anchor", "score@gpt2_char"], project).stdout
    assert "Running stage" not in out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_checkouts_share_outputs_through_a_dvc_remote_and_runs_through_an_mlflow_server(
    tiny_reproduced, tmp_path
):
    """The several-machines recipe in the README with two checkouts on this machine: checkout A reproduces
    and pushes to a (local-directory) DVC remote; a fresh git clone B pulls, and its `dvc repro` runs
    nothing; both log training runs to one `mlflow server` whose artifact store both write through."""
    import subprocess
    import urllib.request

    from mlflow.tracking import MlflowClient

    a = clone_project(tiny_reproduced["path"], tmp_path / "a")
    dvc(["remote", "add", "-d", "shared", str(tmp_path / "dvc-remote")], a)
    run_tool(["git", "add", "-A"], a)
    run_tool(["git", "commit", "-qm", "pipeline outputs (dvc.lock) and the shared DVC remote"], a)
    dvc(["push"], a)

    b = tmp_path / "b"
    run_tool(["git", "clone", "-q", str(a), str(b)], tmp_path)
    assert not (b / "data" / "scores" / "anchor.parquet").exists()  # git holds dvc.lock, not the outputs
    dvc(["pull"], b)
    out = dvc(["repro"], b).stdout
    assert "Running stage" not in out and "Data and pipelines are up to date." in out
    for path in (
        "data/scores/anchor.parquet",
        "data/scores/llama_mul.parquet",
        "models/policy/model.safetensors",
    ):
        assert (b / path).read_bytes() == (a / path).read_bytes(), path
    assert stale_stages(b) == set()

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ]
        + ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
        + ["--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(1)
        for checkout, beta in ((a, "0.2"), (b, "0.3")):  # a new setting each, so each trains a new run
            mrpo = [sys.executable, "-m", "mrpo.cli", "--set", f"train.beta={beta}", "train"]
            run_tool(mrpo, checkout, env={"MLFLOW_TRACKING_URI": uri})
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("mrpo").experiment_id])
        assert sorted(r.data.params["train.beta"] for r in runs) == ["0.2", "0.3"]
        for run in runs:
            assert {"policy.json", "reference_set.json"} <= {
                f.path for f in client.list_artifacts(run.info.run_id)
            }
            assert list((tmp_path / "server-artifacts").rglob(f"{run.info.run_id}/artifacts/policy.json"))
    finally:
        server.terminate()
        server.wait(timeout=30)
