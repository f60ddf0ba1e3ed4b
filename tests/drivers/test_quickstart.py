"""The quickstart as a new user runs it: a fresh clone, `make pipeline` (`dvc repro`), then `git status`.

Nothing the pipeline writes may differ from run to run where git or DVC look (timings and run ids go to the
git-ignored logs/ or the terminal), so a fresh clone's run leaves the tree clean and its MLflow run is not
marked dirty by the pipeline's own outputs. Progress off a terminal is a few log lines, not carriage returns.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO_ROOT, run_tool, tiny_params

# ---------------------------------------------------------------- progress off a terminal


def test_progress_off_a_terminal_is_a_few_log_lines(caplog):
    from mrpo.runtime import LogProgress, progress

    bar = progress(total=1000, desc="score anchor", unit="seq", tty=False)
    assert isinstance(bar, LogProgress)
    with caplog.at_level(logging.INFO, logger="mrpo"), bar:
        for _ in range(100):
            bar.update(10)
            bar.set_postfix_str("1,234 tok/s")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all("\r" not in line for line in lines)
    assert lines[0].startswith("score anchor: 250/1000 seq (25%) in ") and lines[0].endswith("s, 1,234 tok/s")
    assert lines[-1].startswith("score anchor: 1000/1000 seq (100%) in ")


def test_progress_over_an_iterable_logs_as_it_goes_and_at_the_end(caplog):
    from mrpo.runtime import progress

    with caplog.at_level(logging.INFO, logger="mrpo"):
        assert list(progress(["a", "b", "c"], desc="zoo", unit="model", tty=False)) == ["a", "b", "c"]
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" in ")[0] for line in lines] == ["zoo: 1/3 model (33%)", "zoo: 2/3 model (67%)"] + [
        "zoo: 3/3 model (100%)"
    ]


def test_progress_on_a_terminal_is_a_tqdm_bar():
    from tqdm.auto import tqdm

    from mrpo.runtime import progress

    bar = progress(total=3, desc="x", unit="seq", tty=True)
    bar.close()
    assert isinstance(bar, tqdm)


def test_library_bars_are_disabled_off_a_terminal_and_restored(monkeypatch):
    import types

    from tqdm import tqdm

    from mrpo import runtime

    module = types.SimpleNamespace(tqdm=tqdm)
    monkeypatch.setattr(runtime, "on_terminal", lambda: False)
    with runtime.library_bars_off(module):
        bar = module.tqdm(range(3), disable=False)
        assert bar.disable
    assert module.tqdm is tqdm


# ---------------------------------------------------------------- lm-eval's results, reproducible


def test_lm_eval_results_drop_timestamps_and_machine_paths(tmp_path):
    from mrpo.evaluation.lmeval import reproducible, task_lines

    results = {
        "results": {"mrpo_facts_mc": {"alias": "mrpo_facts_mc", "acc,none": 0.81, "acc_stderr,none": 0.04}},
        "n-samples": {"mrpo_facts_mc": {"original": 100, "effective": 100}},
        "config": {"model": f"{tmp_path.resolve()}/models/policy", "batch_size": 16},
        "date": 1765000000.5,
        "git_hash": "abc1234",
        "pretty_env_info": "PyTorch version: ...",
        "transformers_version": "5.0.0",
    }
    clean = reproducible(results, tmp_path)
    assert clean["config"] == {"model": "models/policy", "batch_size": 16}
    assert not {"date", "git_hash", "pretty_env_info"} & set(clean)
    assert clean["results"] == results["results"] and clean["transformers_version"] == "5.0.0"
    assert task_lines(results) == ["mrpo_facts_mc: acc 0.810 (100 documents)"]


# ---------------------------------------------------------------- the quickstart on a fresh clone


def _repro(project: Path) -> str:
    """`make pipeline`'s `dvc repro`, with this venv's interpreter and the clone's code."""
    env = {"PYTHONPATH": str(project), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    env = {**env, "PREFECT_HOME": str(project / ".prefect")}
    return run_tool([sys.executable, "-m", "dvc", "repro"], project, env=env).stdout


def _train_run_tags(project: Path) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.`mrpo.stage` = 'train'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0].data.tags


@pytest.mark.slow
def test_a_fresh_clone_reproduces_to_a_clean_tree_and_a_clean_run(tmp_path):
    """A clone of the committed project with the tiny profile committed in it (so it starts clean): its
    `dvc repro` writes the tiny profile's lock and outputs, committed as a maintainer commits a new lock. A
    fresh clone of that then reproduces every stage from nothing and must leave `git status` empty (every
    tracked output and dvc.lock byte for byte the same) with its train run not marked dirty. With the default
    profile the first half is the committed dvc.lock itself; the tiny one keeps the test to a few minutes."""
    first = tmp_path / "maintainer"
    run_tool(["git", "clone", "-q", str(REPO_ROOT), str(first)], tmp_path)
    for key, value in (("user.email", "tests@mrpo.invalid"), ("user.name", "mrpo tests")):
        run_tool(["git", "config", key, value], first)
    params = yaml.safe_load((first / "params.yaml").read_text())
    (first / "params.yaml").write_text(yaml.safe_dump(tiny_params(params), sort_keys=False))
    run_tool(["git", "commit", "-qam", "tiny profile"], first)
    _repro(first)
    status = run_tool(["git", "status", "--short", "--untracked-files=all"], first).stdout
    assert "??" not in status, f"the pipeline wrote files git neither tracks nor ignores:\n{status}"
    assert "logs/" not in status and (first / "logs" / "zoo.json").is_file()
    run_tool(["git", "add", "-A"], first)
    run_tool(["git", "commit", "-qm", "the tiny profile's lock and tracked outputs"], first)

    user = tmp_path / "user"
    run_tool(["git", "clone", "-q", str(first), str(user)], tmp_path)
    out = _repro(user)
    assert "Running stage 'train'" in out  # a fresh clone has no outputs: everything runs
    status = run_tool(["git", "status", "--short"], user).stdout
    assert status == "", f"`dvc repro` on a fresh clone changed tracked files:\n{status}"
    tags = _train_run_tags(user)
    assert tags["mrpo.git_dirty"] == "False", tags.get("mrpo.git_changed")
    # each score stage's timings, and the size and mtime of the model it scored (train's cheap check that
    # a reference has not changed since)
    assert sorted(p.name for p in (user / "logs" / "score").iterdir()) == [
        f"{name}{kind}.json" for name in ("anchor", "gpt2_char", "llama_expert") for kind in ("", ".model")
    ]


@pytest.mark.slow
def test_dvc_metrics_show_fits_a_terminal(tiny_reproduced):
    """One table of every metrics file's keys: under 160 characters a line (the tiny profile has the
    default one's references and tasks, so the same columns)."""
    out = run_tool(
        [sys.executable, "-m", "dvc", "metrics", "show"],
        tiny_reproduced["path"],
        env={"COLUMNS": "400", "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    ).stdout
    widest = max(out.splitlines(), key=len)
    assert len(widest) < 160, f"{len(widest)} characters:\n{out}"
