"""Causes that are the user's or the machine's end with one line naming the key or file, and exit code 2
(the flows do not retry it), never a traceback: a full disk, a `--set` that is not a plain YAML value, an
alias bomb in params.yaml, weights that are not what their name says, remote code, a tokenizer with no pad or
eos token. Real files, a real full file system, the real `mrpo` command."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from mrpo.cli import main

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # The command's own lines (a stage's log lines and library progress bars are not its message).
    lines = [line for line in err.splitlines() if line.startswith("mrpo")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- --set and params.yaml


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("!!python/object:os.system", "holds a YAML tag"),
        ("!!python/object/apply:os.system [echo hacked]", "holds a YAML tag"),
        ("[1, 2", "is not a YAML value"),
        ("{a: 1, a: 2}", "duplicate key 'a'"),
    ],
)
def test_a_set_value_that_is_not_plain_yaml_names_the_argument(project, capsys, value, says):
    assert main(["--set", f"train.beta={value}", "train"]) == 2
    line = one_line(capsys)
    assert line.startswith(f"mrpo: configuration error: --set {f'train.beta={value}'!r}: ")
    assert says in line


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("train:\n  beta: !!python/object/apply:os.system [id]\n", "bad.yaml: could not determine"),
        ("train:\n  beta: [1, 2\n", "bad.yaml: not valid YAML at line 3: expected ',' or ']'"),
    ],
)
def test_a_params_file_with_a_tag_or_broken_yaml_is_one_line_naming_it(project, capsys, text, says):
    (project / "bad.yaml").write_text(text)
    assert main(["--params", "bad.yaml", "train"]) == 2
    assert one_line(capsys).startswith(f"mrpo: configuration error: {says}")


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    return "\n".join(lines) + f"\ntrain:\n  beta: *a{levels}\n"


def test_an_alias_bomb_in_params_is_refused_in_one_short_line(project, capsys):
    (project / "bomb.yaml").write_text(billion_laughs())
    started = time.perf_counter()
    assert main(["--params", "bomb.yaml", "train"]) == 2
    assert time.perf_counter() - started < 10
    line = one_line(capsys)
    assert line.startswith("mrpo: configuration error: bomb.yaml: its aliases (*name) expand to more than")
    assert len(line) < 300


def test_a_huge_value_is_quoted_short(project, capsys):
    """Below the alias limit, a wrong value is still quoted in at most 200 characters."""
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("  beta: 0.1\n", f"  beta: {['x' * 50] * 300}\n", 1))
    assert main(["train"]) == 2
    line = one_line(capsys)
    assert line.startswith("mrpo: configuration error: train.beta: expected a finite number, got ['xxx")
    assert len(line) < 400


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def full_disk():
    """A real file system with no space left: a small tmpfs, filled (root only)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small file system needs root")
    mountpoint = Path(tempfile.mkdtemp(prefix="mrpo-full-"))
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mountpoint)]
    proc = subprocess.run(mount, capture_output=True)
    if proc.returncode != 0:
        mountpoint.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        (mountpoint / "out").mkdir()
        with pytest.raises(OSError), (mountpoint / "filler").open("wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
        yield mountpoint / "out"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
        mountpoint.rmdir()


def test_a_full_disk_is_one_line_naming_the_file(project, capsys, full_disk):
    argv = ["--set", f"data.output_dir={full_disk}/prepared", "--set", "data.synthetic_pairs=50", "prepare"]
    assert main(argv) == 2
    line = one_line(capsys)
    assert line.startswith(f"mrpo prepare: no space left on device writing {full_disk}/prepared/")
    assert f"df -h {full_disk}/prepared" in line
    assert list((full_disk / "prepared").iterdir()) == []  # nothing half-written left behind


def test_a_full_disk_while_saving_the_policy_is_one_line(scored, tmp_path, capsys, full_disk, monkeypatch):
    """safetensors' writer raises its own error, not an OSError: it is recognised by its words."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = {
        "train.max_steps": 1,
        "train.output_dir": full_disk / "policy",
        "train.checkpoint_dir": tmp_path / "checkpoints",
        "train.metrics_file": tmp_path / "metrics/train.json",
        "train.plots_file": tmp_path / "plots/train.csv",
        "train.plots_dir": tmp_path / "plots",
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    argv = ["--params", str(scored["params"])]
    for key, value in settings.items():
        argv += ["--set", f"{key}={value}"]
    assert main([*argv, "train"]) == 2
    line = one_line(capsys)
    assert line.startswith(f"mrpo train: no space left on the disk holding {full_disk} (train.output_dir)")
    assert list(full_disk.iterdir()) == []  # the half-written policy was removed, nothing swapped in


# ---------------------------------------------------------------- models: weights, remote code, tokenizer


@pytest.fixture
def model_copy(tiny_zoo, tmp_path) -> Path:
    """A copy of the tiny anchor reference that a test may break."""
    return Path(shutil.copytree(tiny_zoo["members"]["anchor"], tmp_path / "anchor"))


def score_with(scored, tmp_path, model: Path) -> list[str]:
    return [
        "--params",
        str(scored["params"]),
        "--set",
        f"references.anchor.model={model}",
        "--set",
        f"score.output_dir={tmp_path / 'scores'}",
        "--set",
        f"score.metrics_dir={tmp_path / 'metrics'}",
        "score",
        "--reference",
        "anchor",
    ]


@pytest.mark.parametrize("how", ["symlink-out", "symlink-in", "renamed"])
def test_weights_that_are_a_pickle_are_refused_naming_the_file(scored, tmp_path, model_copy, capsys, how):
    weights = model_copy / "model.safetensors"
    pickled = pickle.dumps({"weights": [1.0, 2.0]})
    weights.unlink()
    if how == "symlink-out":
        (tmp_path / "elsewhere.pkl").write_bytes(pickled)
        weights.symlink_to(tmp_path / "elsewhere.pkl")
    elif how == "symlink-in":
        (model_copy / "real.pkl").write_bytes(pickled)
        weights.symlink_to("real.pkl")
    else:
        weights.write_bytes(pickled)
    assert main(score_with(scored, tmp_path, model_copy)) == 2
    line = one_line(capsys)
    assert line.startswith(f"mrpo: configuration error: reference 'anchor': {weights} is ")
    if how == "symlink-out":
        assert f"a symlink to {tmp_path / 'elsewhere.pkl'}, outside the model directory" in line
    else:
        assert "is named safetensors but holds a pickle" in line


@pytest.mark.parametrize("outside", [False, True], ids=["in-the-directory", "outside-it"])
def test_a_gguf_that_is_a_symlink_to_a_pickle_is_refused(scored, tmp_path, capsys, outside):
    models = tmp_path / "models"
    models.mkdir()
    pickled = (tmp_path if outside else models) / "weights.pkl"
    pickled.write_bytes(pickle.dumps({"weights": [1.0]}))
    gguf = models / "model.gguf"
    gguf.symlink_to(pickled)
    assert main(score_with(scored, tmp_path, gguf)) == 2
    line = one_line(capsys)
    assert line.startswith(f"mrpo: configuration error: reference 'anchor': {gguf} is ")
    if outside:
        assert f"a symlink to {pickled}, outside the model directory" in line
    else:
        assert "is named gguf but holds a pickle" in line


def test_a_hugging_face_cache_snapshot_may_link_into_its_blobs(tiny_zoo, tmp_path):
    from mrpo.config.schema import ReferenceConfig
    from mrpo.modeling.trust import check_local_model

    repo = tmp_path / "hub/models--tiny--anchor"
    snapshot, blobs = repo / "snapshots/0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in Path(tiny_zoo["members"]["anchor"]).iterdir():
        shutil.copy(f, blobs / f.name)
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    check_local_model(ReferenceConfig("anchor", str(snapshot)), snapshot)


def test_a_model_that_needs_remote_code_is_refused(scored, tmp_path, model_copy, capsys):
    config = json.loads((model_copy / "config.json").read_text())
    config.update({"model_type": "mrpo_custom", "auto_map": {"AutoModelForCausalLM": "modeling.Custom"}})
    (model_copy / "config.json").write_text(json.dumps(config))
    assert main(score_with(scored, tmp_path, model_copy)) == 2
    line = one_line(capsys)
    where = f"reference 'anchor': {str(model_copy)!r}"
    assert line.startswith(f"mrpo: configuration error: {where} needs its own Python code to load")
    assert "never runs a model's remote code and has no setting that allows it" in line


def test_a_known_architecture_with_auto_map_still_loads(tiny_zoo, model_copy):
    from mrpo.config.schema import ReferenceConfig
    from mrpo.modeling.models import load_model

    config = json.loads((model_copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling.Custom"}
    (model_copy / "config.json").write_text(json.dumps(config))
    assert load_model(ReferenceConfig("anchor", str(model_copy))) is not None


def test_a_tokenizer_without_pad_or_eos_names_the_model_and_the_fix(scored, tmp_path, model_copy, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_copy)
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    tokenizer.save_pretrained(model_copy)
    assert main(score_with(scored, tmp_path, model_copy)) == 2
    line = one_line(capsys)
    where = f"reference 'anchor': the tokenizer of {str(model_copy)!r}"
    assert f"{where} has neither a pad nor an eos token" in line
    assert "references.anchor.tokenizer" in line
