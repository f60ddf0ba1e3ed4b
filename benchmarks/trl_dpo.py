"""B3: our K = 1 training step against TRL's DPOTrainer,
with precomputed reference log-probs and with a live reference.

    python benchmarks/trl_dpo.py                     # zoo and SmolLM2-135M
    python benchmarks/trl_dpo.py --models zoo --rounds 5

Four full `Trainer.train()` loops on the same policy weights (each design
trains its own copy), data, batch size, optimizer settings and threads:
  ours      MRPOTrainer, objective mrpo with K = 1 stored reference (= DPO), fp32, no checkpointing
  trl-pre   trl.DPOTrainer(precompute_ref_log_probs=True), matched: bf16=False and no
            gradient checkpointing, as ours (the reference pass runs in its __init__, not timed)
  trl-live  trl.DPOTrainer with a ref_model copy run every step, matched as trl-pre
  trl-pre-defaults  trl-pre with DPOConfig's own defaults (TRL 1.16: bf16=True and gradient
            checkpointing=True even on CPU): reported beside, never the verdict
Each round trains `--steps` steps of each design in turn (order alternating);
a step is timed from `on_step_begin` to `on_step_end` (forward, loss, backward,
optimizer), the first step of each `train()` call is dropped, and the median is
kept. Targets (matched settings): ours / trl-pre <= 1.0, ours / trl-live <= 0.7.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def trl_dataset(pairs, conversational: bool):
    """The pairs in TRL's standard (strings) or conversational (messages) preference format."""
    import json

    from datasets import Dataset

    if conversational:
        rows = {
            "prompt": [json.loads(m) for m in pairs["prompt_messages"]],
            "chosen": [[{"role": "assistant", "content": c}] for c in pairs["chosen"]],
            "rejected": [[{"role": "assistant", "content": r}] for r in pairs["rejected"]],
        }
    else:
        rows = {
            "prompt": list(pairs["prompt"]),
            "chosen": list(pairs["chosen"]),
            "rejected": list(pairs["rejected"]),
        }
    return Dataset.from_dict(rows)


def run_case(which: str, args) -> dict | None:
    """Measure one model; None when it is not available."""
    import torch
    import trl
    from trl import DPOConfig, DPOTrainer

    from mrpo.data.preference import PreferenceDataset
    from mrpo.modeling.models import load_model, load_tokenizer

    batch_pairs = args.batch_pairs or (16 if which == "zoo" else 2)
    steps = args.steps or (11 if which == "zoo" else 2)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        found = C.policy_source(which, scratch)
        if found is None:
            print(f"{which}: not available; skipped", file=sys.stderr)
            return None
        label, ref, cfg = found
        tokenizer = load_tokenizer(ref)
        pairs = C.prepared_pairs(cfg, "train", limit=batch_pairs * (steps + 2))
        examples = C.preference_examples(tokenizer, pairs, args.max_length, ref.chat_template, 1)
        kept = pairs.set_index("pair_id").loc[[e.pair_id for e in examples]].reset_index()

        def policy():
            m = load_model(ref, "cpu", torch.float32)
            m.train()
            return m

        timers = {name: step_timer() for name in ("ours", "trl-pre", "trl-live", "trl-pre-defaults")}
        ours = C.mrpo_trainer(
            policy(),
            tokenizer,
            1,
            scratch,
            batch_size=batch_pairs,
            train_dataset=PreferenceDataset(examples, ["anchor"]),
            max_steps=steps,
        )
        ours.add_callback(timers["ours"])

        def dpo(name, precompute, matched=True):
            cfg_trl = DPOConfig(
                output_dir=str(scratch / name),
                per_device_train_batch_size=batch_pairs,
                max_steps=steps,
                learning_rate=5e-6,
                lr_scheduler_type="constant",
                beta=0.1,
                max_length=args.max_length,
                precompute_ref_log_probs=precompute,
                use_cpu=True,
                report_to="none",
                save_strategy="no",
                logging_steps=10**6,
                disable_tqdm=True,
                seed=0,
                dataset_num_proc=None,
                **(C.trl_precision_kwargs(bf16=False, checkpointing=False) if matched else {}),
            )
            trainer = DPOTrainer(
                model=policy(),
                ref_model=None if precompute else load_model(ref, "cpu", torch.float32),
                args=cfg_trl,
                train_dataset=trl_dataset(kept, ref.chat_template),
                processing_class=tokenizer,
            )
            trainer.add_callback(timers[name])
            return trainer

        start = time.perf_counter()
        trl_pre = dpo("trl-pre", True)
        trl_pre_init_s = time.perf_counter() - start
        trl_live = dpo("trl-live", False)
        trainers = {"ours": ours, "trl-pre": trl_pre, "trl-live": trl_live}
        defaults_note = None
        if which == "zoo" or C.native_bf16_matmul():
            trl_defaults = trainers["trl-pre-defaults"] = dpo("trl-pre-defaults", True, matched=False)
        else:
            defaults_note = "skipped: no native bf16 matmul on this CPU (a bf16 step would take many minutes)"

        def design(name):
            def run():
                timer = timers[name]
                timer.times.clear()
                trainers[name].train()
                return C.median(timer.times[1:])  # the first step pays for the dataloader and optimizer

            return run

        print(
            f"{label}: {len(examples)} pairs, batch {batch_pairs}, {steps} steps per round", file=sys.stderr
        )
        runs = C.interleaved({n: design(n) for n in trainers}, rounds=args.rounds, warmup=1)
        tokens_ours = int(ours.get_train_dataloader().__iter__().__next__()["attention_mask"].sum())
        batch_trl = next(iter(trl_pre.get_train_dataloader()))
        tokens_trl = int(batch_trl["attention_mask"].sum()) if "attention_mask" in batch_trl else None
    ms = {n: 1000 * C.median(v) for n, v in runs.items()}
    row = {
        "case": label,
        "trl_version": trl.__version__,
        "batch_pairs": batch_pairs,
        "steps_per_round": steps,
        "settings": "ours, trl-pre, trl-live: fp32, no gradient checkpointing; trl-pre-defaults: TRL's "
        "DPOConfig defaults (bf16=True, gradient checkpointing=True)",
        "trl_pre_defaults": defaults_note
        or {"bf16": trl_defaults.args.bf16, "checkpointing": trl_defaults.model.is_gradient_checkpointing},
        "trl_pre_matched_checks": {
            "bf16": trl_pre.args.bf16,
            "gradient_checkpointing": trl_pre.model.is_gradient_checkpointing,
        },
        "step_ms_median": ms,
        "ratio_ours_over_trl_pre": ms["ours"] / ms["trl-pre"],
        "ratio_ours_over_trl_live": ms["ours"] / ms["trl-live"],
        "paired_ratio_ours_over_trl_pre": C.paired_ratio(runs["ours"], runs["trl-pre"]),
        "paired_ratio_ours_over_trl_live": C.paired_ratio(runs["ours"], runs["trl-live"]),
        "first_batch_real_tokens": {"ours": tokens_ours, "trl": tokens_trl},
        "trl_pre_init_incl_precompute_s": trl_pre_init_s,
        "rounds": {n: C.spread(v) for n, v in runs.items()},
        "load_after": C.load_average()[0],
    }
    if "trl-pre-defaults" in runs:
        row["ratio_ours_over_trl_pre_defaults"] = ms["ours"] / ms["trl-pre-defaults"]
        paired = C.paired_ratio(runs["ours"], runs["trl-pre-defaults"])
        row["paired_ratio_ours_over_trl_pre_defaults"] = paired
    row["targets_met"] = {
        "ours/trl-pre<=1.0": row["ratio_ours_over_trl_pre"] <= 1.0,
        "ours/trl-live<=0.7": row["ratio_ours_over_trl_live"] <= 0.7,
    }
    print(
        f"{label}: step ms ours {ms['ours']:.1f}, trl-pre {ms['trl-pre']:.1f}, "
        f"trl-live {ms['trl-live']:.1f}, TRL's defaults {ms.get('trl-pre-defaults', float('nan')):.1f} -> "
        f"ours/trl-pre x{row['ratio_ours_over_trl_pre']:.3f}, "
        f"ours/trl-live x{row['ratio_ours_over_trl_live']:.3f} (matched); "
        f"ours/trl-pre-defaults x{row.get('ratio_ours_over_trl_pre_defaults', float('nan')):.3f}",
        flush=True,
    )
    return row


def main() -> None:
    p = C.training_parser(__doc__, "b3_trl_dpo")
    p.add_argument(
        "--steps", type=int, default=None, help="steps per design per round; default 11 (zoo), 2 (SmolLM2)"
    )
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()

    C.run_and_record("B3 TRL DPOTrainer", run_case, args)


if __name__ == "__main__":
    main()
