"""B7 micro: the policy's forward + backward (`response_token_logps`) of one training batch, alone.

    python benchmarks/lean_micro.py --hh /work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz

The first `--pairs` HH-RLHF harmless-base pairs that fit `--max-length` (chosen and rejected of each: the
sequences of one B7 training step at batch `--pairs`), per model (`--models`: SmolLM2-135M, the zoo anchor),
fp32, process CPU seconds on `--threads` threads, designs alternating round by round after a warm-up:

  packing   the batch padded to its longest sequence (what a length-grouped batch runs) against packed (one
            row of the real tokens, each sequence attending on its own: mrpo.modeling.packing) and packed
            through transformers' own SDPA path (the dense block-diagonal (T x T) mask it builds from
            restarting positions: how packing ran before);
  chunk     the padded batch at logprob_chunk 1024, 512 and 256 (LM-head windows; memory in B7's memory part).

Results: benchmarks/results/<--out>.json (per design: spread of seconds, median ratio to the first design,
paired by round).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def batch_of(tokenizer, pairs, args, chat_template: bool) -> dict:
    from mrpo.modeling.logprobs import collate_responses

    chosen, rejected = C.encode_pairs(tokenizer, pairs, args.max_length, chat_template)
    fit = [(w, r) for w, r in zip(chosen, rejected, strict=True) if w.fits and r.fits][: args.pairs]
    return collate_responses([e for pair in fit for e in pair], tokenizer.pad_token_id)


def step_seconds(model, batch: dict, **kwargs):
    """A design: one forward + backward of the batch's summed log-probs, in CPU seconds."""
    from mrpo.modeling.logprobs import response_token_logps

    def run() -> float:
        start = time.process_time()
        model.zero_grad(set_to_none=True)
        response_token_logps(model, **batch, **kwargs).logps.sum().backward()
        return time.process_time() - start

    return run


def dense_packed(model, batch: dict):
    """Packed, with the attention transformers' SDPA path gives a packed row (its dense block mask)."""
    from mrpo.modeling import packing

    packed = step_seconds(model, batch, packed=True)

    def run() -> float:
        switch = packing.use_packed_attention
        model.set_attn_implementation("sdpa")
        packing.use_packed_attention = lambda m: None
        try:
            return packed()
        finally:
            packing.use_packed_attention = switch
            model.set_attn_implementation(packing.NAME)

    return run


def case(which: str, args, scratch: Path) -> dict | None:
    from mrpo.modeling.models import load_model, load_tokenizer

    if which == "smollm2":
        label, ref = "SmolLM2-135M", C.smollm2_checkpoint()
    else:
        label, ref = "zoo anchor", C.zoo_project(scratch / "zoo_project", need_scores=False).anchor
    if ref is None:
        return None
    tokenizer, model = load_tokenizer(ref), load_model(ref)
    model.train()
    pairs = C.prepared_pairs(C.prepare_hh_rlhf(scratch, args.rows, args.hh))
    batch = batch_of(tokenizer, pairs, args, bool(getattr(ref, "chat_template", False)))
    real = int(batch["attention_mask"].sum())
    row = {
        "model": label,
        "sequences": batch["input_ids"].shape[0],
        "padded_shape": list(batch["input_ids"].shape),
    }
    row |= {"real_tokens": real, "response_tokens": int(batch["response_mask"].sum())}
    designs = {}
    if "packing" in args.parts:
        step_seconds(model, batch, packed=True)()  # switches the model to packed attention once
        designs["packing"] = {
            "padded (grouped batch)": step_seconds(model, batch),
            "packed": step_seconds(model, batch, packed=True),
            "packed, transformers' dense mask": dense_packed(model, batch),
        }
    if "chunk" in args.parts:
        designs["chunk"] = {
            f"logprob_chunk {c}": step_seconds(model, batch, chunk=c) for c in (1024, 512, 256)
        }
    for part, runs in designs.items():
        print(f"{label}: {part}", file=sys.stderr)
        seconds = C.interleaved(runs, args.rounds, warmup=1)
        first = next(iter(seconds.values()))
        row[part] = {
            name: {"seconds": C.spread(v), "ratio_to_first": C.paired_ratio(v, first)}
            for name, v in seconds.items()
        }
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "zoo"], choices=["zoo", "smollm2"])
    p.add_argument("--parts", nargs="+", default=["packing", "chunk"], choices=["packing", "chunk"])
    p.add_argument("--pairs", type=int, default=2, help="pairs in the batch (B7's step batch)")
    p.add_argument("--rows", type=int, default=16, help="HH-RLHF rows prepared to find them")
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hh", type=Path, default=C.HH_RLHF, help="HH-RLHF harmless-base jsonl(.gz)")
    p.add_argument("--out", default="b7_micro")
    args = p.parse_args(argv)
    if not args.hh.is_file():
        raise SystemExit(f"lean_micro: {args.hh} not found (HH-RLHF harmless-base test split); pass --hh")
    C.set_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        rows = [r for r in (case(w, args, Path(scratch)) for w in args.models) if r is not None]
    payload = {
        "benchmark": "B7 micro",
        "command": " ".join(["python"] + sys.argv),
        "machine": C.machine_info(args.threads),
        "commit": C.git_commit(),
        "rows": rows,
    }
    print("wrote", C.write_result(args.out, payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
