"""B1: training step time and peak memory with K = 1, 2, 4 precomputed references, same policy and batch.

    python benchmarks/train_references.py                    # zoo anchor and SmolLM2-135M
    python benchmarks/train_references.py --models zoo --rounds 7

One step = `MRPOTrainer.compute_loss` (one policy forward over chosen + rejected,
the K stored reference log-probs from the batch, uniform weights, the MRPO loss)
+ backward + AdamW step. The K designs share one policy, optimizer and batch
(the batch differs only in its K reference columns) and alternate round by
round in this process; each round times `--steps` steps per design and keeps
the median. Peak memory: each K runs the same steps in a fresh process, whose
peak resident set (VmHWM, reset after loading) is read after the steps.
Target: step time K=4 / K=1 <= 1.05; peak memory equal within 5%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def setup(which: str, scratch: Path, ks: list[int], batch_pairs: int, max_length: int):
    """(label, policy, {k: trainer}, {k: batch}, optimizer) with one shared policy and optimizer."""
    import torch

    from mrpo.data.preference import PreferenceCollator, PreferenceExample
    from mrpo.modeling.models import load_model, load_tokenizer

    found = C.policy_source(which, scratch)
    if found is None:
        return None
    label, ref, cfg = found
    tokenizer = load_tokenizer(ref)
    pairs = C.prepared_pairs(cfg, "train", limit=4 * batch_pairs)
    examples = C.preference_examples(tokenizer, pairs, max_length, ref.chat_template, max(ks))[:batch_pairs]
    model = load_model(ref, "cpu", torch.float32)
    model.train()
    collate = PreferenceCollator(tokenizer.pad_token_id)
    batches, trainers = {}, {}
    for k in ks:
        sliced = [
            PreferenceExample(
                e.pair_id, e.chosen, e.rejected, e.ref_chosen_logps[:k], e.ref_rejected_logps[:k]
            )
            for e in examples
        ]
        batches[k] = collate(sliced)
        trainers[k] = C.mrpo_trainer(model, tokenizer, k, scratch, batch_size=batch_pairs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6)
    return label, model, trainers, batches, optimizer


def train_step(trainer, model, batch, optimizer) -> float:
    start = time.perf_counter()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def memory_probe(which: str, k: int, steps: int, batch_pairs: int, max_length: int, threads: int) -> dict:
    """In this (fresh) process: peak RSS over `steps` steps with K references, after loading everything."""
    C.set_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        _, model, trainers, batches, optimizer = setup(which, Path(tmp), [k], batch_pairs, max_length)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: loading the model is not the step's cost
        before = C.current_rss_mib()
        for _ in range(steps):
            train_step(trainers[k], model, batches[k], optimizer)
        peak = C.peak_rss_mib()
    return {
        "k": k,
        "rss_before_steps_mib": before,
        "peak_rss_mib": peak,
        "step_peak_above_start_mib": peak - before,
    }


def batch_for(which: str, args) -> int:
    return args.batch_pairs or (16 if which == "zoo" else 2)


def steps_for(which: str, args) -> int:
    return args.steps or (10 if which == "zoo" else 2)


def run_case(which: str, args) -> dict | None:
    """Measure one model; None when it is not available."""
    with tempfile.TemporaryDirectory() as tmp:
        built = setup(which, Path(tmp), args.k, batch_for(which, args), args.max_length)
        if built is None:
            print(f"{which}: not available; skipped", file=sys.stderr)
            return None
        label, model, trainers, batches, optimizer = built
        steps = steps_for(which, args)

        def design(k):
            return lambda: C.median(
                [train_step(trainers[k], model, batches[k], optimizer) for _ in range(steps)]
            )

        print(
            f"{label}: batch {batch_for(which, args)} pairs, {batches[args.k[0]]['input_ids'].shape} tokens",
            file=sys.stderr,
        )
        runs = C.interleaved({f"K={k}": design(k) for k in args.k}, rounds=args.rounds, warmup=1)
        shape = list(batches[args.k[0]]["input_ids"].shape)
    memory = {}
    for k in args.k:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--models",
                which,
                "--memory-probe",
                str(k),
                "--max-length",
                str(args.max_length),
                "--threads",
                str(args.threads),
                "--batch-pairs",
                str(batch_for(which, args)),
                "--steps",
                str(steps_for(which, args)),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        memory[k] = json.loads(out.stdout.strip().splitlines()[-1])
    step_ms = {k: 1000 * C.median(runs[f"K={k}"]) for k in args.k}
    k_lo, k_hi = min(args.k), max(args.k)
    row = {
        "case": label,
        "batch_pairs": batch_for(which, args),
        "batch_shape_2B_T": shape,
        "steps_per_round": steps,
        "step_ms_median": step_ms,
        "time_ratio_kmax_over_k1": step_ms[k_hi] / step_ms[k_lo],
        "paired_time_ratio_kmax_over_k1": C.paired_ratio(runs[f"K={k_hi}"], runs[f"K={k_lo}"]),
        "memory": memory,
        "peak_rss_ratio_kmax_over_k1": memory[k_hi]["peak_rss_mib"] / memory[k_lo]["peak_rss_mib"],
        "step_peak_ratio_kmax_over_k1": (
            memory[k_hi]["step_peak_above_start_mib"] / max(memory[k_lo]["step_peak_above_start_mib"], 1e-9)
        ),
        "rounds": {name: C.spread(v) for name, v in runs.items()},
        "load_after": C.load_average()[0],
    }
    row["targets_met"] = {
        "time<=1.05": row["time_ratio_kmax_over_k1"] <= 1.05,
        "memory_within_5%": abs(row["peak_rss_ratio_kmax_over_k1"] - 1) <= 0.05,
    }
    print(
        f"{label}: step ms "
        + ", ".join(f"K={k} {v:.1f}" for k, v in step_ms.items())
        + f"; K={k_hi}/K={k_lo} time x{row['time_ratio_kmax_over_k1']:.3f}, peak RSS x"
        f"{row['peak_rss_ratio_kmax_over_k1']:.3f} "
        f"(step peak above start x{row['step_peak_ratio_kmax_over_k1']:.3f})",
        flush=True,
    )
    return row


def main() -> None:
    p = C.training_parser(__doc__, "b1_train_references")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--steps", type=int, default=None, help="steps per design per round; default 10 (zoo), 2 (SmolLM2)"
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.memory_probe is not None:
        which = args.models[0]
        print(
            json.dumps(
                memory_probe(
                    which,
                    args.memory_probe,
                    steps_for(which, args) + 1,
                    batch_for(which, args),
                    args.max_length,
                    args.threads,
                )
            )
        )
        return

    C.run_and_record("B1 references K", run_case, args)


if __name__ == "__main__":
    main()
