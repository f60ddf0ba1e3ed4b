"""Shared fixtures."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import (
    REFERENCES,
    REPO_ROOT,
    TINY_ZOO_TRAIN_STEPS,
    clone_project,
    make_tiny_project,
    run_tool,
    start_prefect_server,
    stop_group,
)


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """A committed git + DVC copy of the project with the tiny profile; nothing reproduced yet.
    Tests that change it must work on a copy (`clone_project`)."""
    return make_tiny_project(tmp_path_factory.mktemp("tiny") / "project")


@pytest.fixture(scope="session")
def tiny_reproduced(tiny_project, tmp_path_factory) -> dict:
    """A copy of `tiny_project` after one full `dvc repro` (outputs, dvc.lock and DVC cache present).
    Returns {"path", "seconds", "output"}; treat the project as read-only, copy it to change it."""
    path = clone_project(tiny_project, tmp_path_factory.mktemp("tiny_reproduced") / "project")
    start = time.perf_counter()
    proc = run_tool([sys.executable, "-m", "dvc", "repro"], path)
    return {"path": path, "seconds": time.perf_counter() - start, "output": proc.stdout}


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> dict:
    """The default profile's zoo (anchor: llama/bpe, gpt2_char: gpt2/char, llama_expert: llama/bpe), built
    once per session with only 40 SFT steps per member (a few seconds in all; too few to learn the facts,
    enough to learn the wordings) by the real `mrpo.stages.zoo.build_zoo`.

    Returns {"output_dir": Path of the zoo, "members": {name: Path of its checkpoint}, "cfg": a validated
    Config whose references point at these checkpoints (anchor first) and whose data/score outputs lie in a
    fresh temp dir, "seconds": build time}. Treat the checkpoints as read-only; copy one to change it.
    """
    from mrpo.config.load import parse_config
    from mrpo.stages.zoo import build_zoo

    root = tmp_path_factory.mktemp("tiny_zoo")
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    zoo_dir = root / "zoo"
    raw["zoo"].update({"output_dir": str(zoo_dir), "metrics_file": str(root / "metrics/zoo.json")})
    for member in raw["zoo"]["members"].values():
        member["train_steps"] = TINY_ZOO_TRAIN_STEPS
    raw["references"] = {name: {"model": str(zoo_dir / name)} for name in raw["zoo"]["members"]}
    raw["data"].update({"synthetic_pairs": 200, "output_dir": str(root / "data/prepared")})
    raw["score"].update(
        {
            "output_dir": str(root / "data/scores"),
            "metrics_dir": str(root / "metrics/score"),
            "max_length": 64,
            "device": "cpu",
        }
    )
    cfg = parse_config(raw)
    start = time.perf_counter()
    build_zoo(cfg)
    return {
        "output_dir": zoo_dir,
        "members": {m.name: zoo_dir / m.name for m in cfg.zoo.members},
        "cfg": cfg,
        "seconds": time.perf_counter() - start,
    }


@pytest.fixture(scope="session")
def scored(tiny_zoo, tmp_path_factory) -> dict:
    """Prepared data (800 pairs) and the three references' score files, made by the real prepare and score
    stages; read-only: train into your own dirs with `config(scored, tmp_path)`."""
    from mrpo.config.load import load_config
    from mrpo.stages.prepare import prepare
    from mrpo.stages.score import score_reference

    root = tmp_path_factory.mktemp("train_project")
    zoo_dir = Path(tiny_zoo["output_dir"]) if isinstance(tiny_zoo, dict) else Path(tiny_zoo)
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["data"].update({"synthetic_pairs": 800, "output_dir": str(root / "data/prepared")})
    raw["score"].update(
        {
            "output_dir": str(root / "data/scores"),
            "metrics_dir": str(root / "metrics/score"),
            "max_length": 64,
        }
    )
    raw["zoo"]["output_dir"] = str(zoo_dir)
    for name in REFERENCES:
        raw["references"][name]["model"] = str(zoo_dir / name)
    raw["train"].update(
        {
            "max_steps": 4,
            "batch_size": 8,
            "max_length": 64,
            # The objective's library defaults (the paper's epsilon, no SFT term), not the default profile's
            # (docs/default-task.md): the trainer tests compare against TRL's pure DPO loss and the authors'
            # code.
            "learning_rate": 5e-4,
            "epsilon": 0.1,
            "sft_weight": 0.0,
            "eval_steps": 1000,
            "save_steps": 1000,
            "logging_steps": 1,
            "window_size": 16,
            "device": "cpu",
        }
    )
    raw["score"]["device"] = "cpu"
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(params)
    prepare(cfg)
    for name in REFERENCES:
        score_reference(cfg, name)
    return {"root": root, "params": params}


@pytest.fixture(scope="session", autouse=True)
def _stop_prefect_ephemeral_servers():
    """Stop in-process Prefect servers while pytest still owns stdout;
    Prefect's atexit hook would log to a closed file."""
    yield
    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()


@pytest.fixture()
def prefect_server(tmp_path):
    """A real Prefect server on a free loopback port (`helpers.start_prefect_server`); yields the
    environment its clients need (PREFECT_API_URL, PREFECT_HOME, ...)."""
    env, proc = start_prefect_server(tmp_path)
    try:
        yield env
    finally:
        stop_group(proc)
