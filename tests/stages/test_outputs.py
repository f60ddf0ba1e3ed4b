"""Stage outputs never overlap and swap in all at once: output paths are checked before anything runs; a
stage's outputs are staged and committed together, rolled back on any failure, and a real kill at any point
of a swap leaves the complete previous set (restored by the next run). Real files, real processes, real
kill -9, a real DVC project."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT, clone_project, config, run_tool

from mrpo.errors import ConfigError, TrainingError
from mrpo.io import atomic_directory, recover_leftovers
from mrpo.staging import StagedOutputs, recover


def digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under `root` (paths relative), leaving out the top-level names in `skip`."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in skip
    }


def old_set(root: Path) -> list[Path]:
    """A policy-like directory, a metrics file, a curve: the previous outputs of a stage."""
    (root / "models/policy").mkdir(parents=True)
    (root / "models/policy/model.safetensors").write_bytes(b"old weights")
    (root / "models/policy/config.json").write_text('{"old": true}')
    (root / "metrics").mkdir()
    (root / "metrics/train.json").write_text('{"loss": 1.0}')
    (root / "plots").mkdir()
    (root / "plots/loss.png").write_bytes(b"old png")
    return [
        root / "models/policy",
        root / "metrics/train.json",
        root / "plots/loss.png",
        root / "plots/new.csv",
    ]


def stage_new(staged: StagedOutputs, finals: list[Path]) -> None:
    policy = staged.directory(finals[0])
    (policy / "model.safetensors").write_bytes(b"new weights")
    for final in finals[1:]:
        staged.file(final).write_bytes(b"new " + final.name.encode())


def hidden(root: Path) -> list[str]:
    """Every leftover of a swap (hidden temporaries, backups, scratch directories, journals) under `root`."""
    swap = re.compile(r"\..+\.(tmp|old|trash|scratch|commit)-\d+(\.json)?")
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if swap.fullmatch(p.name))


# ---------------------------------------------------------------- the commit set


def test_outputs_commit_together_and_any_failure_puts_back_every_byte(tmp_path):
    finals = old_set(tmp_path)
    before = digest(tmp_path)
    with pytest.raises(RuntimeError, match="tracking failed"), StagedOutputs() as staged:
        stage_new(staged, finals)
        staged.commit()
        assert (finals[0] / "model.safetensors").read_bytes() == b"new weights"
        assert not (finals[0] / "config.json").exists()  # the directory is replaced whole
        raise RuntimeError("tracking failed")  # e.g. the MLflow record, after the swap
    assert digest(tmp_path) == before and hidden(tmp_path) == []
    assert not finals[3].exists()  # an output that did not exist before is gone again

    with pytest.raises(RuntimeError, match="before the commit"), StagedOutputs() as staged:
        stage_new(staged, finals)
        raise RuntimeError("before the commit")
    assert digest(tmp_path) == before and hidden(tmp_path) == []

    with StagedOutputs() as staged:
        stage_new(staged, finals)
    assert (finals[0] / "model.safetensors").read_bytes() == b"new weights"
    assert [f.read_bytes() for f in finals[1:]] == [b"new train.json", b"new loss.png", b"new new.csv"]
    assert hidden(tmp_path) == []


def test_a_directory_where_a_file_goes_fails_before_anything_moves(tmp_path):
    finals = old_set(tmp_path)
    (tmp_path / "plots/loss.png").unlink()
    (tmp_path / "plots/loss.png").mkdir()
    (tmp_path / "plots/loss.png/mine.txt").write_text("keep me")
    before = digest(tmp_path)
    with pytest.raises(Exception, match=r"loss\.png is a directory, but the new output is a file"):
        with StagedOutputs() as staged:
            stage_new(staged, finals)
    assert digest(tmp_path) == before and hidden(tmp_path) == []


_CHILD = """
import os, signal, sys
from pathlib import Path
import mrpo.io, mrpo.staging
from mrpo.staging import StagedOutputs
root, kill_at, exchange = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
real_replace, calls = os.replace, [0]
def replace(a, b):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9, at this exact rename
    real_replace(a, b)
mrpo.staging.os.replace = mrpo.io.os.replace = replace
if not exchange:
    mrpo.io._exchange = lambda a, b: False
finals = [root / p for p in ("models/policy", "metrics/train.json", "plots/loss.png", "plots/new.csv")]
if sys.argv[4] == "staged":
    with StagedOutputs() as staged:
        policy = staged.directory(finals[0])
        (policy / "model.safetensors").write_bytes(b"new weights")
        for final in finals[1:]:
            staged.file(final).write_bytes(b"new")
        staged.commit()
        print("committed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # killed while recording the run, after the swap
else:
    with mrpo.io.atomic_directory(finals[0]) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new weights")
"""


@pytest.mark.parametrize("kill_at", range(1, 9))
def test_a_kill_at_any_rename_of_a_commit_leaves_the_previous_set_for_the_next_run(tmp_path, kill_at):
    finals = old_set(tmp_path)
    before = digest(tmp_path)
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), str(kill_at), "1", "staged"],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert hidden(tmp_path), "the kill left its journal and temporaries"
    recover(finals)  # what the next run of the stage does first
    assert digest(tmp_path) == before and hidden(tmp_path) == []


def test_a_kill_between_the_two_renames_of_a_directory_swap_never_loses_the_directory(tmp_path):
    finals = old_set(tmp_path)
    for exchange in ("1", "0"):
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(tmp_path), "2", exchange, "swap"],
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            text=True,
        )
        if exchange == "1":  # one atomic exchange: there is no second rename to die at
            assert child.returncode == 0, child.stderr
            assert (finals[0] / "model.safetensors").read_bytes() == b"new weights"
            assert hidden(tmp_path) == []
            (finals[0] / "model.safetensors").write_bytes(b"old weights")
            (finals[0] / "config.json").write_text('{"old": true}')
            continue
        assert child.returncode == -signal.SIGKILL, child.stderr
        assert not finals[0].exists()  # killed between "final -> old" and "tmp -> final"
        assert hidden(tmp_path / "models") != []
        with atomic_directory(finals[0]) as tmp:  # the next swap recovers first, then swaps
            assert (finals[0] / "config.json").is_file()  # the previous version is back
            assert hidden(tmp_path / "models") == [f".policy.tmp-{os.getpid()}"]
            (tmp / "model.safetensors").write_bytes(b"next")
        assert (finals[0] / "model.safetensors").read_bytes() == b"next" and hidden(tmp_path) == []


def test_leftovers_of_an_interrupted_swap_on_disk_are_recovered_or_removed(tmp_path):
    final = tmp_path / "policy"
    dead = 2**22 + 12345  # above pid_max's default: no such process
    (tmp_path / f".policy.old-{dead}").mkdir()
    (tmp_path / f".policy.old-{dead}/model.safetensors").write_bytes(b"old")
    (tmp_path / f".policy.tmp-{dead}").mkdir()
    (tmp_path / f".policy.tmp-{dead}/model.safetensors").write_bytes(b"half new")
    live = tmp_path / f".policy.tmp-{os.getppid()}"  # another running process's swap: left alone
    live.mkdir()
    recover_leftovers(final)
    assert (final / "model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["policy", live.name])
    # once the final directory exists, a backup left by a swap that finished is only deleted
    (tmp_path / f".policy.old-{dead}").mkdir()
    recover_leftovers(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["policy", live.name])


def test_a_journal_cut_short_by_a_kill_moved_nothing_and_is_removed(tmp_path):
    finals = old_set(tmp_path)
    before = digest(tmp_path)
    dead = 2**22 + 12345
    (tmp_path / f"models/.policy.tmp-{dead}").mkdir()
    (tmp_path / f"models/.policy.tmp-{dead}/model.safetensors").write_bytes(b"new")
    (tmp_path / f"metrics/.train.json.tmp-{dead}").write_bytes(b"new")
    (tmp_path / f"models/.policy.commit-{dead}.json").write_text('{"swaps": [{"final": "/')
    recover(finals)
    assert digest(tmp_path) == before and hidden(tmp_path) == []


# ---------------------------------------------------------------- output paths, on a real project


PATH_CASES = [
    ("train.output_dir=models", "train.output_dir: got 'models'; it holds zoo.output_dir ('models/zoo')"),
    ("train.checkpoint_dir=models/zoo", "train.checkpoint_dir: got 'models/zoo'; that is zoo.output_dir"),
    (
        "evaluate.results_dir=models/policy",
        "evaluate.results_dir: got 'models/policy'; that is train.output_dir",
    ),
    ("train.output_dir=.", "train.output_dir: got '.'; that is the project root"),
    ("train.output_dir=models/..", "train.output_dir: got 'models/..'; that is the project root"),
    ("train.output_dir=/", "train.output_dir: got '/'; that is the project root"),
    ("data.output_dir=data", "data.output_dir: got 'data'; it holds score.output_dir ('data/scores')"),
    (
        "zoo.output_dir=models/policy/zoo",
        "zoo.output_dir: got 'models/policy/zoo'; it lies inside train.output_dir",
    ),
    (
        "evaluate.results_dir=evaluation",
        "evaluate.results_dir: got 'evaluation'; it holds evaluate.cache_dir",
    ),
    (
        "train.metrics_file=params.yaml",
        "train.metrics_file: got 'params.yaml'; it is the project's params.yaml",
    ),
    (
        "train.output_dir=models/zoo/anchor",
        "train.output_dir: got 'models/zoo/anchor'; it lies inside zoo.output_dir",
    ),
]


@pytest.mark.parametrize(("setting", "line"), PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_each_bad_output_path_is_one_configuration_error_naming_both_keys(monkeypatch, setting, line):
    from mrpo.config.load import load_config

    monkeypatch.chdir(REPO_ROOT)  # stages resolve paths from the project root, where DVC runs them
    key, value = setting.split("=")
    with pytest.raises(ConfigError) as info:
        load_config(REPO_ROOT / "params.yaml", {key: value})
    assert str(info.value).startswith(line)


@pytest.fixture(scope="module")
def reproduced_copy(tiny_reproduced, tmp_path_factory) -> Path:
    return clone_project(tiny_reproduced["path"], tmp_path_factory.mktemp("paths") / "project")


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "line"), PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_an_output_path_over_another_output_the_root_or_an_input_is_refused_before_anything_runs(
    reproduced_copy, setting, line
):
    before = digest(reproduced_copy, skip=(".git",))
    for stage in ("train", "evaluate"):
        proc = run_tool(["mrpo", stage, "--set", setting], reproduced_copy, check=False)
        assert proc.returncode == 2, proc.stdout
        assert proc.stdout.splitlines() == [proc.stdout.strip()] and "Traceback" not in proc.stdout
        assert proc.stdout.startswith(f"mrpo: configuration error: {line}"), proc.stdout
    assert digest(reproduced_copy, skip=(".git",)) == before
    status = run_tool([sys.executable, "-m", "dvc", "status"], reproduced_copy)
    assert "up to date" in status.stdout


def test_the_default_paths_and_files_inside_shared_directories_are_accepted(scored, tmp_path):
    cfg = config(scored, tmp_path, **{"score.output_dir": str(tmp_path)})  # score files beside train outputs
    assert cfg.score.output_dir == str(tmp_path)
    both = r"^train\.output_dir: got .*; that is train\.plots_dir \("  # both changed: declared order
    with pytest.raises(ConfigError, match=both):
        config(scored, tmp_path, **{"train.plots_dir": str(tmp_path / "policy")})


def test_a_disabled_sft_stage_declares_no_checkpoint_dir(scored, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs resolve here, as under a stage
    cfg = config(scored, tmp_path, **{"train.checkpoint_dir": "checkpoints"})  # over checkpoints/sft
    assert cfg.train.checkpoint_dir == "checkpoints" and not cfg.sft.enabled
    enabled = {"train.checkpoint_dir": "checkpoints", "sft.enabled": True, "sft.model": "org/model"}
    with pytest.raises(
        ConfigError, match=r"^train\.checkpoint_dir: got 'checkpoints'; it holds sft\.checkpoint_dir"
    ):
        config(scored, tmp_path, **enabled)


# ---------------------------------------------------------------- settings that used to fail late


def test_registered_model_names_mlflow_refuses_are_refused_up_front(scored, tmp_path):
    for bad in ("bad/name", "a:b", "50%", "..", "a\\b"):
        with pytest.raises(ConfigError, match=r"^tracking\.registered_model: got .*an MLflow model name"):
            config(scored, tmp_path, **{"tracking.registered_model": bad})
    assert config(scored, tmp_path, **{"tracking.registered_model": "mrpo-policy"})


def test_zero_epochs_with_max_steps_trains_max_steps(scored, tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.num_epochs: got 0; must be > 0"):
        config(scored, tmp_path, **{"train.num_epochs": 0, "train.max_steps": -1})
    cfg = config(scored, tmp_path, **{"train.num_epochs": 0, "train.max_steps": 2})
    from mrpo.stages.train import train

    assert train(cfg, track=False)["steps"] == 2


def test_train_refuses_a_directory_where_a_curve_goes_and_a_late_failure_keeps_every_output(
    scored, tmp_path, monkeypatch
):
    from transformers import TrainerCallback

    from mrpo.stages.train import train, train_outputs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config(scored, tmp_path, **{"train.max_steps": 2})
    train(cfg)
    outputs = [p for p in train_outputs(cfg) if p.exists()]
    before = {str(p): digest(p) if p.is_dir() else hashlib.sha256(p.read_bytes()).digest() for p in outputs}

    def unchanged() -> bool:
        now = {str(p): digest(p) if p.is_dir() else hashlib.sha256(p.read_bytes()).digest() for p in outputs}
        return now == before and hidden(tmp_path) == []

    png = Path(cfg.train.plots_dir) / "loss.png"
    png.rename(tmp_path / "loss.png")
    png.mkdir()
    with pytest.raises(ConfigError, match=r"^train\.plots_dir: '.*loss\.png' is a directory"):
        train(cfg)
    png.rmdir()
    (tmp_path / "loss.png").rename(png)
    assert unchanged()

    class BreakWeights(TrainerCallback):  # training ends with a weight that is no number
        def on_train_end(self, args, state, control, model=None, **kwargs):
            import torch

            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")

    with pytest.raises(TrainingError, match=r"the trained weights hold NaN or inf"):
        train(config(scored, tmp_path, **{"train.max_steps": 3}), callbacks=[BreakWeights()])
    assert unchanged()


def test_evaluate_refuses_a_missing_or_non_finite_policy_in_one_line(tmp_path, monkeypatch, capsys):
    import torch
    from safetensors.torch import save_file

    from mrpo.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    assert main(["evaluate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "mrpo evaluate: no trained policy in models/policy (train.output_dir); "
        "run `mrpo train` (or `dvc repro train`) first"
    )
    policy = tmp_path / "models/policy"
    policy.mkdir(parents=True)
    weights = {"model.embed.weight": torch.zeros(4, 2), "model.layers.0.w": torch.tensor([1.0, float("nan")])}
    save_file(weights, policy / "model.safetensors")
    (policy / "config.json").write_text("{}")
    assert main(["evaluate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "mrpo evaluate: models/policy/model.safetensors: tensor 'model.layers.0.w' holds NaN or inf; "
        "the policy is damaged: re-run `mrpo train` (or `dvc repro -f train`)"
    )
    assert not (tmp_path / "evaluation").exists() and not (tmp_path / "metrics").exists()


@pytest.mark.slow
def test_evaluate_failing_after_its_outputs_are_staged_keeps_every_previous_output(reproduced_copy):
    project = clone_project(reproduced_copy, reproduced_copy.parent / "late")
    outputs = [project / "evaluation/results", project / "metrics/eval.json"]
    before = {str(p): digest(p) if p.is_dir() else hashlib.sha256(p.read_bytes()).digest() for p in outputs}
    # the anchor's results are staged first (from lm-eval's cache); the policy's tokenizer then fails to load
    (project / "models/policy/tokenizer.json").write_text("{not json")
    proc = run_tool(["mrpo", "evaluate"], project, check=False)
    assert proc.returncode != 0, proc.stdout
    after = {str(p): digest(p) if p.is_dir() else hashlib.sha256(p.read_bytes()).digest() for p in outputs}
    assert after == before
    assert hidden(project / "evaluation") == [] and hidden(project / "metrics") == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "blocked", "outputs"),
    [
        (
            "prepare",
            "data/prepared/report.json",
            ["data/prepared/train.parquet", "data/prepared/val.parquet", "data/prepared/test.parquet"],
        ),
        ("diagnose", "plots/diagnostics.png", ["metrics/diagnostics.json", "metrics/diagnostics.md"]),
    ],
)
def test_prepare_and_diagnose_swap_their_files_in_together(reproduced_copy, stage, blocked, outputs):
    """A directory where the stage's last file goes fails the stage before anything moves: the other new files
    never replace the previous ones."""
    project = clone_project(reproduced_copy, reproduced_copy.parent / f"together-{stage}")
    before = {name: (project / name).read_bytes() for name in outputs}
    (project / blocked).unlink()
    (project / blocked).mkdir()
    (project / blocked / "keep").write_text("a directory in the way")
    # a different seed: every file the stage writes would change
    proc = run_tool(["mrpo", stage, "--set", "seed=7", "--set", "diagnose.split=train"], project, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:]
    line = proc.stdout.strip().splitlines()[-1]  # prepare: at the swap; diagnose: its preflight, up front
    assert blocked in line and "is a directory" in line, line
    assert {name: (project / name).read_bytes() for name in outputs} == before
    assert hidden(project / Path(blocked).parent) == []
