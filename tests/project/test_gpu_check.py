"""benchmarks/gpu_check.py where no GPU is: one clear line and a non-zero exit;
its scratch config is the profile's."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
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


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("k", [1, 4])
def test_scratch_config_is_the_smollm2_profile_in_bf16(tmp_path, k, device):
    import gpu_check

    args = Namespace(
        data=tmp_path / "gsm8k.jsonl", pairs=32, max_length=256, batch_pairs=4, steps=3, device=device
    )
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
    assert (cfg.score.device, cfg.score.dtype, cfg.train.device) == (device, "bfloat16", device)
    assert cfg.train.objective == ("dpo" if k == 1 else "mrpo") and not cfg.train.lora.enabled
    assert cfg.train.disable_dropout and cfg.data.max_rows == 32 and cfg.data.source == "gsm8k"
    assert Path(cfg.score.output_dir).parent == tmp_path
    # the float32 step-0 control scores into its own files: the bf16 ones stay what training reads
    control = gpu_check.scratch_config(tmp_path, args, k, dtype="float32")
    assert control.score.dtype == "float32" and control.data.output_dir == cfg.data.output_dir
    assert control.score.output_dir != cfg.score.output_dir
    assert control.train.checkpoint_dir != cfg.train.checkpoint_dir


def test_cpu_rehearsal_passes_the_gpu_gate_and_writes_its_own_file(tmp_path, capsys):
    import gpu_check

    assert gpu_check.no_gpu_message("cpu") is None
    assert gpu_check.default_out("cpu").name == "gpu_check_cpu_rehearsal.json"
    assert gpu_check.default_out("cuda").name == "gpu_check.json"
    # past the gate, the next check runs: the data file (missing here)
    missing = tmp_path / "missing.jsonl"
    assert gpu_check.main(["--device", "cpu", "--data", str(missing), "--out", str(tmp_path / "o.json")]) == 1
    assert f"{missing} not found" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_cpu_peak_memory_is_the_process_rss_peak_of_the_phase():
    import gpu_check

    if not gpu_check.reset_rss_peak():
        pytest.skip("this kernel refuses to reset the RSS peak (/proc/self/clear_refs)")
    before = gpu_check.rss_peak_mib()

    held = []

    def touch_256_mib():
        # fresh anonymous pages, every one written, so resident: a malloc'd block may reuse memory
        # the process already holds (after other tests it did, and the RSS did not move); held until the
        # peak is read
        block = mmap.mmap(-1, 256 * 2**20)
        for offset in range(0, len(block), mmap.PAGESIZE):
            block[offset] = 1
        held.append(block)
        return len(block)

    out, memory = gpu_check.peak_memory(touch_256_mib, "cpu")
    held.pop().close()
    assert out == 256 * 2**20 and sorted(memory) == ["peak_rss_mib", "rss_at_start_mib"]
    assert memory["rss_at_start_mib"] < memory["peak_rss_mib"] - 200
    assert memory["peak_rss_mib"] >= before + 200
    # reset: a phase that allocates nothing reports about the resident set, not the earlier peak
    _, quiet = gpu_check.peak_memory(lambda: None, "cpu")
    assert quiet["peak_rss_mib"] < memory["peak_rss_mib"] - 200
