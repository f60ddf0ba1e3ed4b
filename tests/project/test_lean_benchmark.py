"""benchmarks/lean.py (B7): its CPU-safe parts, without running the benchmark."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


def test_help_exits_zero():
    script = str(REPO_ROOT / "benchmarks/lean.py")
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--step-pairs" in proc.stdout and "--device" in proc.stdout


def test_summary_names_the_headline_numbers_and_the_targets():
    import lean

    result = {
        "library_features": {"default_batching": "grouped"},
        "model": "SmolLM2-135M",
        "padding_share": {"1024": {"pairs": 8, "padded": 0.5, "grouped": 0.08, "packed": 0.0}},
        "step": {
            "designs": {
                "ours grouped fp32": {"ratio_vs_trl_pre_same_precision": 0.6},
                "trl-pre fp32": {"ratio_vs_trl_pre_same_precision": 1.0},
            }
        },
        "memory": [
            {"dtype": "float32", "ratio_ours_over_trl": 0.3},
            {"dtype": "float32", "ratio_ours_over_trl": 0.35},
            {"dtype": "bfloat16", "ratio_ours_over_trl": 0.9},
        ],
    }
    s = lean.summary(result)
    assert (s["padding_share"], s["memory_ratio_vs_trl"], s["step_ratio_vs_trl"]) == (0.08, 0.35, 0.6)
    assert s["targets_met"] == {
        "padding_share<=0.1": True,
        "memory_ratio_vs_trl<=0.4": True,
        "step_ratio_vs_trl<=0.55": False,
    }


def test_a_part_left_out_is_none_in_the_summary():
    import lean

    s = lean.summary({"library_features": {"default_batching": None}})
    assert s["padding_share"] is None and s["memory_ratio_vs_trl"] is None and s["step_ratio_vs_trl"] is None
    assert not any(s["targets_met"].values())


def test_the_memory_pairs_are_the_same_ids_for_ours_and_trl():
    import lean

    ours, trl = lean.memory_examples(16)
    assert len(ours) == len(trl) == lean.MEMORY_PAIRS
    e = ours[0]
    assert len(e.chosen.input_ids) == lean.MEMORY_TOKENS and e.chosen.prompt_length == 16
    words = (trl[0]["prompt"] + trl[0]["chosen"]).split()
    assert [int(w[1:]) for w in words] + [lean.VOCAB - 1] == e.chosen.input_ids


def test_micro_help_exits_zero_and_report_renders_its_json():
    script = str(REPO_ROOT / "benchmarks/lean_micro.py")
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--parts" in proc.stdout and "--hh" in proc.stdout
    import report

    design = {"seconds": {"median": 1.5, "min": 1.0, "max": 2.0}, "ratio_to_first": 0.75}
    res = {
        "command": "python benchmarks/lean_micro.py",
        "machine": {"date": "d", "device": "cpu", "torch_threads": 1, "load_average_1_5_15": [1, 1, 1]},
        "rows": [
            {
                "model": "zoo anchor",
                "sequences": 4,
                "padded_shape": [4, 300],
                "real_tokens": 1000,
                "response_tokens": 400,
                "packing": {"packed": design},
                "chunk": {"logprob_chunk 512": design},
            }
        ],
    }
    lines = report.b7_micro(res)
    assert "| packed | 1.500 | 1.000-2.000 | x0.750 |" in lines
    assert "| logprob_chunk 512 | 1.500 | 1.000-2.000 | x0.750 |" in lines
