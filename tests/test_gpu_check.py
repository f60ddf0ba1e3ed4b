"""benchmarks/gpu_check.py where no GPU is: one clear line and a non-zero exit;
its scratch config is the profile's."""

from __future__ import annotations

import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


def test_without_cuda_it_exits_with_one_line(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks/gpu_check.py"), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device visible"), proc.stderr
    assert "python benchmarks/gpu_check.py" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("k", [1, 4])
def test_scratch_config_is_the_smollm2_profile_on_cuda_in_bf16(tmp_path, k):
    import gpu_check

    args = Namespace(data=tmp_path / "gsm8k.jsonl", pairs=32, max_length=256, batch_pairs=4, steps=3)
    cfg = gpu_check.scratch_config(tmp_path, args, k)
    assert [r.name for r in cfg.references] == [
        "smollm2_chat",
        "smollm2_plain",
        "smollm2_chat_copy",
        "smollm2_plain_copy",
    ]
    assert [r.name for r in cfg.training_references()] == (
        ["smollm2_chat"] if k == 1 else [r.name for r in cfg.references]
    )
    assert cfg.references[2].chat_template and not cfg.references[3].chat_template
    assert (cfg.score.device, cfg.score.dtype, cfg.train.device) == ("cuda", "bfloat16", "cuda")
    assert cfg.train.objective == ("dpo" if k == 1 else "mrpo") and not cfg.train.lora.enabled
    assert cfg.train.disable_dropout and cfg.data.max_rows == 32 and cfg.data.source == "gsm8k"
    assert Path(cfg.score.output_dir).parent == tmp_path
