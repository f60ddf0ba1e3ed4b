"""The `mrpo` command: user errors end with one line naming what to fix and exit code 2, never a traceback."""

import shutil
from pathlib import Path

import pytest

from mrpo.cli import main

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "train.beta=-1", "train"], "mrpo: configuration error: train.beta: got -1; must be > 0"),
        (["train"], "mrpo train: data/prepared/train.parquet: prepared data not found; run `mrpo prepare` first"),
        (["--set", "data.source=file", "--set", 'data.paths=["nope.jsonl"]', "prepare"],
         "mrpo prepare: nope.jsonl: file not found (check data.paths"),
        (["score", "--reference", "nobody"], "references: no reference named 'nobody'"),
    ],
)
def test_user_errors_exit_2_with_the_reason(project, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_show_config_prints_validated_values(project, capsys):
    assert main(["--set", "train.strategy=vdw", "show-config"]) == 0
    out = capsys.readouterr().out
    assert "train.strategy = 'vdw'" in out and "train.beta = 0.1" in out
