"""The `check` stage (issue 24, bug 3): a mistyped or invalid params key that no stage declares stops
`dvc repro` with mrpo's one-line message instead of passing as "up to date"; a valid edit re-runs only the
check."""

from __future__ import annotations

import shutil
import sys

import pytest
import yaml
from helpers import REPO_ROOT, STAGES, clone_project, run_tool

from mrpo.cli import main
from mrpo.stages.check import CHECKED, MARKER


@pytest.mark.parametrize(
    ("edit", "line"),
    [
        ({"learnig_rate": 0.1}, "train.learnig_rate: unknown key"),
        ({"logging_steps": 0}, "train.logging_steps: got 0"),
        ({"save_steps": 0}, "train.save_steps: got 0"),
    ],
)
def test_mrpo_check_refuses_a_bad_train_key_with_one_line(tmp_path, monkeypatch, capsys, edit, line):
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["train"].update(edit)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0]
    assert not (tmp_path / CHECKED).exists()


def test_mrpo_check_writes_the_same_marker_for_every_valid_params_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for beta in (0.1, 0.2):
        raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
        raw["train"]["beta"] = beta
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        assert main(["check"]) == 0
        assert (tmp_path / CHECKED).read_text() == MARKER


def test_check_runs_first_and_every_other_stage_depends_on_its_marker():
    assert STAGES[0] == "check"
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert (
        spec["check"]["outs"] == [{str(CHECKED): {"persist": True}}]
        and "params.yaml" in spec["check"]["deps"]
    )
    for name, stage in spec.items():
        if name != "check":
            assert str(CHECKED) in stage.get("do", stage)["deps"], name


@pytest.mark.slow
def test_dvc_repro_stops_at_a_mistyped_key_and_reruns_only_the_check_for_a_valid_edit(
    tiny_reproduced, tmp_path
):
    project = clone_project(tiny_reproduced["path"], tmp_path / "p")
    dvc = [sys.executable, "-m", "dvc"]
    lock = (project / "dvc.lock").read_text()
    params = project / "params.yaml"
    good = params.read_text()
    raw = yaml.safe_load(good)
    raw["train"]["learnig_rate"] = 0.1
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = run_tool([*dvc, "repro"], project, check=False)
    assert proc.returncode != 0 and "train.learnig_rate: unknown key" in proc.stdout, proc.stdout[-3000:]
    assert "Running stage 'train'" not in proc.stdout
    assert (project / "dvc.lock").read_text() == lock

    raw = yaml.safe_load(good)
    raw["train"]["logging_steps"] = 3
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = run_tool([*dvc, "repro"], project).stdout
    assert "Running stage 'check'" in out
    assert [s for s in STAGES if f"Running stage '{s}'" in out] == ["check"], out[-3000:]
    shutil.rmtree(project)
