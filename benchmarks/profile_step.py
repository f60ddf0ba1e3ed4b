"""Where a training step's time goes: policy forward + loss, backward, optimizer step, one reference forward.

    python benchmarks/profile_step.py --models smollm2

Explains the B2 ratio: with stored scores a K = 2 step is forward + backward +
optimizer; the live design adds K reference forwards. The FLOP bound of
ours/live is (fwd + bwd) / (fwd + bwd + K fwd) = 3 / 5 = 0.6 for K = 2 when the
backward costs two forwards, so fixed costs (the optimizer) decide which side
of 0.6 a model lands on. The optimizer is the one MRPOTrainer builds
(`Trainer.create_optimizer`: the fused torch AdamW by default). Medians over
`--steps` steps after one warm-up step.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def run_case(which: str, args) -> dict | None:
    """Phase medians (ms) for one model; None when it is not available."""
    import torch

    from mrpo.data.preference import PreferenceCollator
    from mrpo.modeling.logprobs import collate_responses, response_logps
    from mrpo.modeling.models import load_model, load_tokenizer

    batch_pairs = args.batch_pairs or (16 if which == "zoo" else 2)
    with tempfile.TemporaryDirectory() as tmp:
        found = C.policy_source(which, Path(tmp))
        if found is None:
            return None
        label, ref, cfg = found
        tokenizer = load_tokenizer(ref)
        pairs = C.prepared_pairs(cfg, "train", limit=4 * batch_pairs)
        examples = C.preference_examples(tokenizer, pairs, args.max_length, ref.chat_template, 2)[
            :batch_pairs
        ]
        batch = PreferenceCollator(tokenizer.pad_token_id)(examples)
        ref_batch = collate_responses(
            [e.chosen for e in examples] + [e.rejected for e in examples], tokenizer.pad_token_id
        )
        policy = load_model(ref, "cpu", torch.float32)
        policy.train()
        frozen = load_model(ref, "cpu", torch.float32)
        trainer = C.mrpo_trainer(policy, tokenizer, 2, Path(tmp), batch_size=batch_pairs)
        optimizer, optimizer_name = C.trainer_optimizer(trainer)
        phases: dict[str, list[float]] = {
            "forward+loss": [],
            "backward": [],
            "optimizer": [],
            "reference forward": [],
        }
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            loss = trainer.compute_loss(policy, batch)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            with torch.no_grad():
                response_logps(frozen, **ref_batch)
            t4 = time.perf_counter()
            if step:
                for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    phases[name].append(1000 * dt)
    ms = {k: C.median(v) for k, v in phases.items()}
    ours = ms["forward+loss"] + ms["backward"] + ms["optimizer"]
    live = ours + 2 * ms["reference forward"]
    row = {
        "case": label,
        "batch_pairs": batch_pairs,
        "optimizer": optimizer_name,
        "phase_ms": ms,
        "ours_k2_ms": ours,
        "live_k2_ms": live,
        "predicted_ratio": ours / live,
        "ratio_without_optimizer": (ours - ms["optimizer"]) / (live - ms["optimizer"]),
        "load_after": C.load_average()[0],
    }
    print(
        f"{label}: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
        + f" -> predicted ours/live x{row['predicted_ratio']:.3f} "
        f"(without optimizer x{row['ratio_without_optimizer']:.3f})",
        flush=True,
    )
    return row


def main() -> None:
    p = C.training_parser(__doc__, "profile_step")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    C.run_and_record("step profile", run_case, args)


if __name__ == "__main__":
    main()
