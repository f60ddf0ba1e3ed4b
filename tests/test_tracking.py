"""mrpo.tracking on a real sqlite MLflow store: run names that say what the run is, even with a seeded RNG."""

from __future__ import annotations

from conftest import REPO_ROOT
from mlflow import MlflowClient

from mrpo.config import load_config
from mrpo.runtime import seed_everything
from mrpo.tracking import default_run_name, start_pipeline_run


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
        assert cfg.train.strategy in info.data.tags["mlflow.note.content"]
    assert len(set(names)) == len(names), names
    assert names[0].startswith("mrpo-uniform-anchor+gpt2_char+llama_expert-b0.1-s0-")
    assert names[1].startswith("mrpo-vdw-") and names[2].split("-")[3] == "b0.2" and "-s1-" in names[3]
    assert names[5].startswith("dpo-gpt2_char-b0.1-s0-")
    # An explicit tracking.run_name still wins.
    cfg = load_config(REPO_ROOT / "params.yaml", {**store, "tracking.run_name": "my-baseline"})
    run = start_pipeline_run(cfg)
    assert MlflowClient(run.tracking_uri).get_run(run.run_id).info.run_name == "my-baseline"
