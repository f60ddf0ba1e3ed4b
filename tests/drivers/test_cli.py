"""The `mrpo` command: user errors end with one line naming what to fix and exit code 2, never a traceback."""

import shutil
from pathlib import Path

import pytest

from mrpo.cli import main
from mrpo.pipeline import STAGE_NAMES

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "train.beta=-1", "train"], "mrpo: configuration error: train.beta: got -1; must be > 0"),
        (
            ["train"],
            "mrpo train: data/prepared/train.parquet: prepared data not found; run `mrpo prepare` first",
        ),
        (
            ["--set", "data.source=file", "--set", 'data.paths=["nope.jsonl"]', "prepare"],
            "mrpo prepare: nope.jsonl: file not found (check data.paths",
        ),
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


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- issue 11: bad knobs and outputs, exit 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "train=abc", "train"], "mrpo: configuration error: train: expected a mapping of settings"),
        (["--set", "data=5", "prepare"], "mrpo: configuration error: data: expected a mapping of settings"),
        (["--set", "train.beta.x=1", "train"], "--set train.beta.x: train.beta is 0.1, not a section"),
        (
            ["--set", "train.learning_rate=.inf", "train"],
            "train.learning_rate: got inf; must be a finite number",
        ),
        (["--set", "train.num_epochs=0", "train"], "train.num_epochs: got 0; must be > 0"),
        (
            ["--set", "train.lr_scheduler=bogus", "train"],
            "train.lr_scheduler: got 'bogus'; allowed: linear, cosine",
        ),
        (
            ["--set", "data.source=file", "--set", "data.paths=pairs.jsonl", "prepare"],
            "data.paths: expected a list of strings, e.g. [a, b], got 'pairs.jsonl'; "
            "a single value is written as a list: [pairs.jsonl]",
        ),
        (
            ["--set", "zoo.members.anchor.hidden_size=0", "zoo"],
            "zoo.members.anchor.hidden_size: got 0; must be >= 2",
        ),
        (
            ["--set", "train.fixed_weights=[1, 1, 1]", "train"],
            "train.fixed_weights: got [1, 1, 1]; only used by strategy 'fixed'",
        ),
    ],
)
def test_bad_knobs_exit_2_before_any_work(project, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (project / "data").exists() and not (project / "models").exists()  # nothing was started


@pytest.mark.skipif(torch_cuda_available(), reason="the machine has CUDA")
@pytest.mark.parametrize(
    ("stage", "key"),
    [(["score", "--reference", "anchor"], "score.device"), (["evaluate"], "evaluate.device")],
)
def test_cuda_on_a_machine_without_it_fails_naming_the_key(project, capsys, stage, key):
    assert main(["--set", f"{key}=cuda", *stage]) == 2
    err = capsys.readouterr().err
    assert f"mrpo: configuration error: {key}: got 'cuda', but this machine has no usable CUDA device" in err
    assert f"set {key}: auto or cpu" in err


def test_every_profile_and_params_yaml_show_config(capsys):
    for params in [PARAMS, *sorted((PARAMS.parent / "profiles").glob("*.yaml"))]:
        assert main(["--params", str(params), "show-config"]) == 0, params
        assert "train.beta = " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("stage", "key"),
    [
        (["zoo"], "zoo.output_dir"),
        (["zoo"], "zoo.metrics_file"),
        (["prepare"], "data.output_dir"),
        (["score", "--reference", "anchor"], "score.output_dir"),
        (["evaluate"], "evaluate.results_dir"),
        (["evaluate"], "evaluate.metrics_file"),
        (["score", "--reference", "anchor"], "score.metrics_dir"),
        (["summary"], "summary.file"),
    ],
)
def test_an_output_under_a_file_fails_naming_the_key_before_any_work(project, capsys, stage, key):
    (project / "blocker").write_text("a file, not a directory\n")
    assert main(["--set", f"{key}=blocker/out", *stage]) == 2
    err = capsys.readouterr().err
    assert (
        f"mrpo: configuration error: {key}: cannot write 'blocker/out': 'blocker' is a file, "
        f"not a directory; choose a writable location for {key}"
    ) in err
    assert sorted(p.name for p in project.iterdir()) == ["blocker", "params.yaml"]  # nothing was started


def test_a_read_only_output_dir_fails_naming_the_key(project, capsys):
    readonly = project / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        if _can_write(readonly):
            pytest.skip(
                "running as root: modes do not stop writes (the /sys probe below covers a real refusal)"
            )
        assert main(["--set", "data.output_dir=readonly/out", "prepare"]) == 2
    finally:
        readonly.chmod(0o755)
    err = capsys.readouterr().err
    assert (
        "data.output_dir: cannot write 'readonly/out': 'readonly' is not writable (Permission denied)" in err
    )


def test_check_writable_probes_for_real_where_modes_do_not_tell(tmp_path):
    from mrpo.config.schema import ConfigError
    from mrpo.preflight import check_writable

    check_writable(tmp_path / "new" / "dir", "data.output_dir")  # creatable: fine, and nothing is created
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="train.output_dir: cannot write .*: it exists and is a file"):
        check_writable(tmp_path / "f", "train.output_dir")
    with pytest.raises(
        ConfigError, match="train.metrics_file: cannot write .*: it exists and is a directory"
    ):
        check_writable(tmp_path, "train.metrics_file", kind="file")
    if Path("/sys").is_dir() and not _can_write(Path("/sys")):  # sysfs refuses new files even to root
        with pytest.raises(
            ConfigError,
            match=r"score.output_dir: cannot write '/sys/mrpo/scores': '/sys' is not "
            r"writable \(",
        ):
            check_writable("/sys/mrpo/scores", "score.output_dir")


def _can_write(directory: Path) -> bool:
    try:
        (directory / ".probe").write_text("")
    except OSError:
        return False
    (directory / ".probe").unlink()
    return True


# ---------------------------------------------------------------- issue 15: stage help, options after the
# stage


def dvc_params(stage: str) -> set[str]:
    import yaml

    spec = yaml.safe_load((PARAMS.parent / "dvc.yaml").read_text())["stages"][stage]
    return {p.replace("${key}", "<name>") for p in spec.get("do", spec)["params"]}


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_stage_help_says_what_it_reads_writes_and_the_params_dvc_declares(stage, capsys):
    from mrpo.pipeline import stage as pipeline_stage

    with pytest.raises(SystemExit) as exit_:
        main([stage, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps; compare the words
    assert f"mrpo {stage}: " in out and "reads: " in out and "writes: " in out and "params: " in out
    assert set(pipeline_stage(stage).params) == dvc_params(stage)  # the help lists exactly what DVC tracks
    for key in pipeline_stage(stage).params:
        assert key.rpartition(".")[2] in out, key
    assert "--set KEY=VALUE" in out


def test_train_help_names_its_outputs_and_what_does_not_retrain(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for key in ("train.output_dir", "train.metrics_file", "train.plots_file", "train.checkpoint_dir"):
        assert key in out
    assert "logging_steps and save_steps are left out" in out


def test_set_and_params_work_after_the_stage_name_too(project, capsys, tmp_path):
    assert main(["show-config", "--set", "train.beta=0.3", "train"]) == 0
    assert "train.beta = 0.3" in capsys.readouterr().out
    # both places at once: all overrides apply, the later wins for the same key
    assert main(["--set", "train.beta=0.2", "show-config", "--set", "train.epsilon=0.5"]) == 0
    out = capsys.readouterr().out
    assert "train.beta = 0.2" in out and "train.epsilon = 0.5" in out
    assert main(["--set", "train.beta=0.2", "show-config", "--set", "train.beta=0.4", "train"]) == 0
    assert "train.beta = 0.4" in capsys.readouterr().out
    other = tmp_path / "other.yaml"
    other.write_text((project / "params.yaml").read_text().replace("seed: 0", "seed: 7"))
    assert main(["show-config", "--params", str(other), "seed"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "seed = 7"
    # a bad override after the stage is the same user error as before it
    assert main(["train", "--set", "train.beta=-1"]) == 2
    assert "mrpo: configuration error: train.beta: got -1; must be > 0" in capsys.readouterr().err


def test_show_config_filters_by_section_and_names_the_sections_when_unknown(project, capsys):
    assert main(["show-config", "train.lora"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("    ")]  # no help
    assert lines and all(line.startswith("train.lora.") for line in lines)
    assert "train.lora.r = 8" in lines
    assert main(["show-config", "score"]) == 0
    out = capsys.readouterr().out
    assert "score.metrics_dir = 'logs/score'" in out and "train." not in out
    assert main(["show-config", "trian"]) == 2
    err = capsys.readouterr().err
    assert (
        "show-config 'trian': no such section or key; "
        "sections: compare, data, diagnose, evaluate, references, score" in err
    )


# ---------------------------------------------------------------- issue 21: one stage registry


def test_every_registered_stage_has_a_command_and_an_entry_point(capsys):
    from mrpo.pipeline import STAGES

    for stage in STAGES:
        assert callable(stage.entry_point()), stage.name
        with pytest.raises(SystemExit):
            main([stage.name, "--help"])
        assert f"mrpo {stage.name}: {stage.what}" in " ".join(capsys.readouterr().out.split())


def stage_imports(path: Path) -> list[str]:
    """The mrpo.stages modules `path` imports anywhere in its text (function-level imports included)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [n for n in names if n == "mrpo.stages" or n.startswith("mrpo.stages.")]
    return found


def test_nothing_in_the_library_imports_a_stage():
    """Stages are recipes: what two of them share lives in a library package. Only the command line runs
    them (through the registry's lazy entry points)."""
    root = Path(__file__).resolve().parents[2]
    allowed = {root / "mrpo" / "cli.py"}
    offenders = {
        str(path.relative_to(root)): imports
        for path in sorted((root / "mrpo").rglob("*.py"))
        if path not in allowed and (imports := stage_imports(path))
    }
    assert offenders == {}
