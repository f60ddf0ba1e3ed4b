"""mrpo.tracking on a real sqlite MLflow store: run names that say what the run is, even with a seeded RNG."""

from __future__ import annotations

from helpers import REPO_ROOT
from mlflow import MlflowClient

from mrpo.config.load import load_config
from mrpo.runtime import seed_everything
from mrpo.tracking.names import default_run_name, strategy_of
from mrpo.tracking.tracker import start_pipeline_run


def test_runs_are_named_by_what_they_are_and_two_configurations_never_share_a_name(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = {"tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    variants = [
        {},
        {"train.strategy": "vdw"},
        {"train.beta": 0.2},
        {"seed": 1},
        {"train.learning_rate": 1e-3},
        {"train.objective": "dpo", "train.dpo_reference": "gpt2_char"},
    ]
    names = []
    for overrides in variants:
        cfg = load_config(REPO_ROOT / "params.yaml", {**store, **overrides})
        seed_everything(cfg.seed)  # what every stage does first: MLflow's own random names then repeat
        run = start_pipeline_run(cfg)
        info = MlflowClient(run.tracking_uri).get_run(run.run_id)
        names.append(info.info.run_name)
        assert info.info.run_name == default_run_name(cfg)
        note = info.data.tags["mlflow.note.content"]
        assert (cfg.train.strategy in note) == (strategy_of(cfg) != "n/a")  # DPO weights nothing
        assert (
            info.data.tags["mrpo.kind"] == "pipeline" and info.data.tags["mlflow.source.name"] == "mrpo train"
        )
    assert len(set(names)) == len(names), names
    assert names[0].startswith("mrpo-uniform-anchor+gpt2_char+llama_expert-b0.1-s0-")
    assert names[1].startswith("mrpo-vdw-") and names[2].split("-")[3] == "b0.2" and "-s1-" in names[3]
    assert names[5].startswith("dpo-gpt2_char-b0.1-s0-")
    # An explicit tracking.run_name still wins.
    cfg = load_config(REPO_ROOT / "params.yaml", {**store, "tracking.run_name": "my-baseline"})
    run = start_pipeline_run(cfg)
    assert MlflowClient(run.tracking_uri).get_run(run.run_id).info.run_name == "my-baseline"


def test_git_state_hashes_the_uncommitted_diff_but_not_what_the_pipeline_rewrites(tmp_path, monkeypatch):
    """A real git repo: a changed source file makes the tree dirty (with the hash of exactly its diff);
    changed pipeline outputs (dvc.yaml outs with `${...}` from params.yaml, dvc.lock) and DVC's .gitignore
    files do not."""
    import hashlib
    import subprocess

    from helpers import run_tool

    from mrpo.tracking.lineage import git_state, git_tags, launch_tags, pipeline_outputs

    (tmp_path / "params.yaml").write_text("train:\n  metrics_file: metrics/train.json\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: mrpo train\n    metrics:\n      - ${train.metrics_file}:\n"
        "          cache: false\n  score:\n    foreach: [a]\n    do:\n      cmd: x\n"
        "      outs:\n        - scores/${key}.parquet\n"
    )
    for name, text in {"code.py": "x = 1\n", "metrics/train.json": "{}\n", "dvc.lock": "a\n"}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    run_tool(["git", "init", "-q"], tmp_path)
    run_tool(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init", "--allow-empty"],
        tmp_path,
    )
    run_tool(["git", "add", "-A"], tmp_path)
    run_tool(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "files"], tmp_path)
    ignore = pipeline_outputs(tmp_path)
    assert ignore == ["dvc.lock", "metrics/train.json"]  # the foreach output does not resolve: left out

    (tmp_path / "metrics/train.json").write_text('{"a": 1}\n')
    (tmp_path / "dvc.lock").write_text("b\n")
    (tmp_path / "metrics/.gitignore").write_text("/x\n")
    run_tool(["git", "add", "metrics/.gitignore"], tmp_path)
    (tmp_path / "untracked.txt").write_text("new\n")
    clean = git_state(tmp_path, ignore)
    assert not clean.dirty and clean.diff_sha256 is None and git_tags(clean)["mrpo.git_dirty"] == "False"

    (tmp_path / "code.py").write_text("x = 2\n")
    state = git_state(tmp_path, ignore)
    diff = subprocess.run(
        ["git", "diff", "HEAD", "--binary", "--", "code.py"], cwd=tmp_path, capture_output=True
    )
    assert state.dirty and state.changed == ("code.py",)
    assert state.diff_sha256 == hashlib.sha256(diff.stdout).hexdigest()
    tags = git_tags(state)
    assert tags["mrpo.git_changed"] == "code.py" and tags["mrpo.git_commit"] == state.commit
    outside = tmp_path.parent / f"{tmp_path.name}-not-git"
    outside.mkdir()
    assert git_state(outside) is None

    for var in ("DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    assert launch_tags() == {"mrpo.launcher": "mrpo"}
    monkeypatch.setenv("DVC_STAGE", "train")
    assert launch_tags() == {"mrpo.launcher": "dvc repro", "mrpo.dvc_stage": "train"}
    monkeypatch.setenv("DVC_EXP_NAME", "small")
    assert launch_tags()["mrpo.launcher"] == "dvc exp run" and launch_tags()["mrpo.dvc_experiment"] == "small"
