"""The `sft` stage on the tiny zoo: the loss falls on a memorisable set, only response tokens carry loss,
a resumed run equals an uninterrupted one, outputs swap in atomically, the output scores as a reference, bad
settings exit 2 naming the key, and sft.enabled false only writes a marker. Real models, real files, real
Trainer, real MLflow (a sqlite store per test)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from helpers import REPO_ROOT

from mrpo.config.load import parse_config

ROWS = [
    {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    {"question": "Tom has 4 apples and eats 1. How many are left?", "answer": "4 - 1 = <<4-1=3>>3\n#### 3"},
    {"question": "What is 6 times 7?", "answer": "6 * 7 = <<6*7=42>>42\n#### 42"},
    {"question": "Half of 10?", "answer": "10 / 2 = <<10/2=5>>5\n#### 5"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_raw(tiny_zoo: dict, root: Path, **sft) -> dict:
    """The default params with sft on: the tiny zoo's anchor fine-tuned on GSM8K-style rows under `root`."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    zoo_dir = Path(tiny_zoo["output_dir"])
    raw["zoo"]["output_dir"] = str(zoo_dir)
    raw["references"] = {name: {"model": str(path)} for name, path in tiny_zoo["members"].items()}
    raw["data"]["output_dir"] = str(root / "data/prepared")
    raw["tracking"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    data = write_jsonl(root / "gsm8k.jsonl", ROWS)
    raw["sft"].update(
        {
            "enabled": True,
            "model": str(tiny_zoo["members"]["anchor"]),
            "data": {"source": "gsm8k", "paths": [str(data)]},
            "output_dir": str(root / "models/sft"),
            "checkpoint_dir": str(root / "checkpoints/sft"),
            "metrics_file": str(root / "metrics/sft.json"),
            "plots_file": str(root / "plots/sft.csv"),
            "max_length": 64,
            "learning_rate": 3e-3,
            "max_steps": 30,
            "batch_size": 4,
            "logging_steps": 1,
            "save_steps": 10,
            "device": "cpu",
        }
    )
    for key, value in sft.items():
        node = raw["sft"]
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


def test_loss_falls_and_a_loadable_merged_lora_model_is_written(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mrpo.stages.sft import sft

    cfg = parse_config(
        sft_raw(
            tiny_zoo, tmp_path, **{"lora.enabled": True, "lora.r": 8, "max_steps": 40, "learning_rate": 1e-2}
        )
    )
    metrics = sft(cfg, track=False)
    assert metrics["steps"] == 40 and metrics["train_rows"] == 4
    assert metrics["final_loss"] < 0.5 * metrics["first_loss"], metrics
    out = Path(cfg.sft.output_dir)
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert not (out / "adapter_config.json").exists()  # merged
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    AutoTokenizer.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert json.loads(Path(cfg.sft.metrics_file).read_text())["steps"] == 40
