"""The `summary` stage: before/after on the key metrics, where the policy is, how to look further."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mrpo.cli import main
from mrpo.reporting.summary import format_number

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"

TRAIN_RECORD = {
    "steps": 152,
    "train_loss": 0.6838,
    "val_reward_accuracy_before": 0.4035,
    "val_reward_accuracy_after": 0.5053,
    "val_reward_margin_before": -0.0052,
    "val_reward_margin_after": 0.0381,
    "val_loss_before": 0.6958,
    "val_loss_after": 0.6796,
    "test_reward_accuracy_before": 0.3857,
    "test_reward_accuracy_after": 0.5529,
    "weight/anchor": 0.5,
    "weight/gpt2_char": 0.25,
    "weight/llama_expert": 0.25,
}
EVAL_RECORD = {
    "anchor/mrpo_facts_mc/acc": 0.39,
    "policy/mrpo_facts_mc/acc": 0.44,
    "delta/mrpo_facts_mc/acc": 0.05,
    "pref/reward_accuracy_vs_anchor": 0.5666,
    "pref/reward_margin_vs_anchor": 0.0398,
    "pref/anchor_likelihood_accuracy": 0.604,
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def test_summary_prints_and_writes_before_after_the_policy_and_how_to_look_further(project, capsys):
    write(project / "models/policy/train_metrics.json", TRAIN_RECORD)
    write(project / "metrics/train.json", {"steps": 152})  # the records win over the short metrics files
    write(project / "evaluation/results/metrics.json", EVAL_RECORD)
    write(
        project / "models/policy.mlflow_run.json",
        {"run_id": "abc123", "experiment_id": "1", "tracking_uri": f"sqlite:///{project / 'mlflow.db'}"},
    )
    assert main(["summary"]) == 0
    printed = capsys.readouterr().out
    written = (project / "metrics/summary.md").read_text()
    # the run id differs run to run: printed, never in the tracked markdown
    assert printed.startswith(written.strip())
    assert printed.strip().endswith(
        "MLflow run of this policy: abc123\n  http://127.0.0.1:5000/#/experiments/1/runs/abc123"
    )
    assert "abc123" not in written
    assert (
        "Objective **mrpo**, strategy **uniform**, beta 0.1; references anchor, gpt2_char, llama_expert"
        in written
    )
    assert "152 steps" in written
    assert (
        "Reference weights at the end of training: anchor 0.5000, gpt2_char 0.2500, llama_expert 0.2500"
        in written
    )
    assert "| val reward accuracy | 0.4035 | 0.5053 | +0.1018 |" in written
    assert "| val loss | 0.6958 | 0.6796 | -0.0162 |" in written
    assert "| mrpo_facts_mc acc | 0.3900 | 0.4400 | +0.0500 |" in written
    assert "on 56.7% of them (mean reward margin 0.0398)" in written
    assert "Policy: `models/policy` (its MLflow run: `mrpo runs`)" in written
    # the sqlite store in the project is named relative to it, so the file reads the same on every machine
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in written and str(project) not in written
    assert "dvc plots show" in written


def test_summary_before_any_training_says_what_to_run(project, capsys):
    assert main(["summary"]) == 0
    written = (project / "metrics/summary.md").read_text()
    assert "No metrics yet: run `mrpo train` and `mrpo evaluate` (or `dvc repro`)" in written
    assert "MLflow run" not in written


def test_summary_reads_the_short_metrics_files_when_the_records_are_missing(project, capsys):
    write(project / "metrics/train.json", {"val_loss_before": 0.7, "val_loss_after": 0.65, "steps": 3})
    assert main(["summary", "--set", "summary.file=out/summary.md"]) == 0
    assert "| val loss | 0.7000 | 0.6500 | -0.0500 |" in (project / "out/summary.md").read_text()


def test_the_record_names_agree_with_the_stages_that_write_them():
    from mrpo.stages import evaluate, summary, train

    assert summary.TRAIN_RECORD == train.TRAIN_RECORD and summary.EVAL_RECORD == evaluate.EVAL_RECORD


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (16270.0, "16,270"),
        (16270.46, "16,270.5"),
        (2422, "2,422"),
        (0.50526, "0.5053"),
        (-0.000654, "-0.000654"),
        (6.5e-6, "0.00000650"),
        (1e-12, "1.00e-12"),
        (0.0, "0.0000"),
        (None, "n/a"),
        (float("nan"), "n/a"),
    ],
)
def test_numbers_read_as_numbers(value, shown):
    assert format_number(value) == shown
