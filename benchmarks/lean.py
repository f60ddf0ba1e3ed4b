"""B7: padding, the vocabulary and precision: our training step against TRL's DPOTrainer at real lengths.

    python benchmarks/lean.py                         # default run (~8 min on 2 loaded cores)
    python benchmarks/lean.py --step-pairs 16 --rounds 3 --full-memory

Side by side in one run (designs alternate round by round, after a warm-up), on the first `--pairs`
HH-RLHF harmless-base pairs (../shared/data, prepared by `mrpo.stages.prepare.prepare`) with SmolLM2-135M
(the zoo anchor when SmolLM2 is not installed):

  padding share   of one epoch of the trainer's own batches at batch `--batch-pairs` (8), max_length 1024
                  and 384, for train.batching padded (today's collator: random batches), grouped (length-
                  grouped), packed: 1 - real tokens / positions the batches hold;
  training step   tokens/s of full `Trainer.train()` steps over the same `--step-pairs` pairs (batch
                  `--step-batch-pairs`), ours padded / grouped / packed against TRL DPOTrainer with
                  precompute_ref_log_probs (its reference pass untimed), matched: fp32 and no gradient
                  checkpointing on both sides; then a bf16 row (CPU autocast, fp32 master weights) for ours
                  (default batching) and TRL; and TRL with its own DPOConfig defaults (bf16 and gradient
                  checkpointing on), reported beside, never the verdict;
  memory          peak RSS increment of one training step at vocabulary 128,256 (a tiny Llama: hidden 256,
                  2 layers, untied head; 4 pairs x 512 tokens, 16-token and 256-token prompts), ours vs TRL
                  precomputed, each in a fresh process: one warm-up step (optimizer state), then the
                  resident-set peak over the second step minus the resident set before it; fp32, and bf16;
  matmul fraction this machine's measured torch.mm throughput (fp32, bf16; `--threads`), and the fraction
                  of it a training step and scoring achieve, counted on the work actually required (linear
                  layers on real tokens, the LM head on response positions, causal attention).

Times are process CPU seconds on CPU (robust to other jobs on the same cores; the load average is
recorded), wall seconds of synchronized steps on a GPU. A row whose library feature (train.batching,
train.logprob_chunk) is not in this checkout is skipped with a note. Results: benchmarks/results/b7_lean.json.
The last line printed is one JSON object with at least `padding_share`, `memory_ratio_vs_trl` (the worse
prompt mix) and `step_ratio_vs_trl` (matched settings).
Targets: padding share <= 0.10, memory ratio <= 0.4, step ratio <= 0.55.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

MODES = ("padded", "grouped", "packed")
VOCAB = 128_256
MEMORY_TOKENS = 512
MEMORY_PAIRS = 4
PARTS = ("padding", "step", "memory")
TARGETS = {"padding_share": 0.10, "memory_ratio_vs_trl": 0.4, "step_ratio_vs_trl": 0.55}


# ---------------------------------------------------------------- what this checkout offers


def library_features() -> dict:
    """Which of issue 23's knobs the installed mrpo has: MRPOTrainer keywords `batching` / `logprob_chunk`,
    `mrpo.training.batching`, and the config schema's train fields."""
    from mrpo.config.schema import TrainConfig
    from mrpo.training.trainer import MRPOTrainer

    params = inspect.signature(MRPOTrainer.__init__).parameters
    fields = getattr(TrainConfig, "__dataclass_fields__", {})
    try:
        import mrpo.training.batching as batching  # noqa: F401

        has_module = True
    except ImportError:
        has_module = False
    return {
        "batching_kwarg": "batching" in params,
        "logprob_chunk_kwarg": "logprob_chunk" in params,
        "batching_module": has_module,
        "train.batching": "batching" in fields,
        "train.logprob_chunk": "logprob_chunk" in fields,
        "default_batching": _field_default(fields, "batching"),
        "default_logprob_chunk": _field_default(fields, "logprob_chunk"),
    }


def _field_default(fields: dict, name: str):
    f = fields.get(name)
    return None if f is None else f.default


def mode_missing(mode: str, features: dict) -> str | None:
    """Why `mode` cannot run here, or None."""
    if mode == "padded" or features["batching_kwarg"]:
        return None
    return f"train.batching={mode}: not in this checkout (MRPOTrainer takes no `batching`); row skipped"


def ours_trainer(model, tokenizer, examples, scratch: Path, features: dict, *, batch: int, steps: int, **kw):
    """MRPOTrainer (K = 1 stored reference) with `mode` batching (default: the library's), `logprob_chunk`
    and `precision` where this checkout takes them."""
    import torch

    from mrpo.data.preference import PreferenceDataset

    extra = {"precision": kw.get("precision", torch.float32)}
    if features["batching_kwarg"]:
        extra["batching"] = kw.get("mode") or features["default_batching"] or "padded"
    if features["logprob_chunk_kwarg"] and kw.get("chunk") is not None:
        extra["logprob_chunk"] = kw["chunk"]
    return C.mrpo_trainer(
        model,
        tokenizer,
        1,
        scratch,
        batch_size=batch,
        train_dataset=PreferenceDataset(examples, ["anchor"]),
        trainer_kw=extra,
        max_steps=steps,
        use_cpu=kw.get("use_cpu", True),
    )


# ---------------------------------------------------------------- padding share


def padding_shares(tokenizer, model, pairs, ref, args, features: dict, scratch: Path) -> dict:
    """{max_length: {mode: share or note}} over one epoch of the trainer's own dataloader
    (`mrpo.training.batching.padding_share` of each batch's row lengths; a packed forward runs the real
    tokens only, so its share is 0 when the trainer keeps `packed`, else it is the fallback's, noted)."""
    from mrpo.training.batching import padding_share

    out = {}
    for max_length in (1024, 384):
        examples = C.preference_examples(tokenizer, pairs, max_length, ref.chat_template, 1)
        row = {"pairs": len(examples)}
        for mode in MODES:
            why = mode_missing(mode, features)
            if why:
                row[mode] = why
                continue
            trainer = ours_trainer(
                model, tokenizer, examples, scratch, features, batch=args.batch_pairs, steps=1, mode=mode
            )
            rows = [b["attention_mask"].sum(1).tolist() for b in trainer.get_train_dataloader()]
            row[mode] = 0.0 if trainer.batching == "packed" else padding_share(rows)
            if mode == "packed" and trainer.batching != "packed":
                row["packed_note"] = f"packing not exact for this model: ran as {trainer.batching}"
        out[str(max_length)] = row
        print(f"  padding share, max_length {max_length}: {row}", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------- training steps


def step_designs(
    model_fn, tokenizer, examples, kept, ref, args, features, scratch: Path
) -> tuple[dict, dict]:
    """{design: trainer}, {design: note} for the step comparison."""
    import torch
    from trl_dpo import trl_dataset

    steps = -(-len(examples) // args.step_batch_pairs)
    trainers, notes = {}, {}
    # one policy per library (weights' values do not change a step's cost; each Trainer keeps its own
    # optimizer state): seven fp32 SmolLM2 copies would not fit this machine's memory beside other jobs
    ours_model, trl_model = model_fn(), model_fn()
    bf16_mode = features["default_batching"] or "padded"
    plan = [(f"ours {m} fp32", m, torch.float32) for m in MODES] + [
        (f"ours {bf16_mode} bf16", bf16_mode, torch.bfloat16)
    ]
    trl_plan = [
        ("trl-pre fp32", C.trl_precision_kwargs(bf16=False, checkpointing=False)),
        ("trl-pre bf16", C.trl_precision_kwargs(bf16=True, checkpointing=False)),
        ("trl-pre defaults", {}),
    ]
    if args.skip_bf16:
        notes.update({n: args.skip_bf16 for n in (plan[-1][0], "trl-pre bf16", "trl-pre defaults")})
        plan, trl_plan = plan[:-1], trl_plan[:1]
    for name, mode, precision in plan:
        why = mode_missing(mode, features)
        if why:
            notes[name] = why
            continue
        trainers[name] = ours_trainer(
            ours_model,
            tokenizer,
            examples,
            scratch / name.replace(" ", "_"),
            features,
            batch=args.step_batch_pairs,
            steps=steps,
            mode=mode,
            precision=precision,
            use_cpu=args.device == "cpu",
        )
    for name, kw in trl_plan:
        data = trl_dataset(kept, ref.chat_template)
        trainers[name] = trl_trainer(
            trl_model, tokenizer, data, kw, steps, args.step_batch_pairs, args.max_length, args.device
        )
    return trainers, notes


def trl_trainer(
    model, tokenizer, dataset, precision_kw: dict, steps: int, batch: int, max_length: int, device
):
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="b7-trl-"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=5e-6,
        lr_scheduler_type="constant",
        beta=0.1,
        max_length=max_length,
        precompute_ref_log_probs=True,
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        seed=0,
        dataset_num_proc=None,
        **precision_kw,
    )
    return DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)


def clock() -> float:
    """Process CPU seconds on CPU (other jobs share this machine's cores: wall time would count their turns
    too), wall seconds around synchronized CUDA work on a GPU."""
    import torch

    return time.perf_counter() if torch.cuda.is_available() else time.process_time()


def synced_step_timer():
    """Each optimizer step's `clock()` seconds (on_step_begin -> on_step_end), waiting for the GPU at both
    ends when there is one."""
    import torch
    from transformers import TrainerCallback

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self._t = clock()

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.times.append(clock() - self._t)

    return StepTimer()


def attention(model, device: str):
    """flash_attention_2 on cuda when flash-attn is installed (else the model's default, sdpa); the name."""
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            model.set_attn_implementation("flash_attention_2")
        except (ImportError, ValueError, AttributeError) as e:
            print(f"  flash attention not used: {e}", file=sys.stderr)
    return model.config._attn_implementation


def time_steps(trainers: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of one epoch's optimizer steps (on_step_begin -> on_step_end, summed) per design per round,
    alternating; the warm-up round trains one step of each (optimizer state, first-call costs)."""
    timers = {}
    for name, trainer in trainers.items():
        timers[name] = synced_step_timer()
        trainer.add_callback(timers[name])
    full = {name: t.args.max_steps for name, t in trainers.items()}

    def design(name):
        def run():
            timers[name].times.clear()
            trainers[name].train()
            return sum(timers[name].times)

        return run

    for trainer in trainers.values():
        trainer.args.max_steps = 1
    C.interleaved({n: design(n) for n in trainers}, rounds=0, warmup=1)
    for name, trainer in trainers.items():
        trainer.args.max_steps = full[name]
    return C.interleaved({n: design(n) for n in trainers}, rounds=rounds, warmup=0)


# ---------------------------------------------------------------- FLOPs and matmul throughput


def matmul_gflops(dtype_name: str, device: str = "cpu", seconds: float = 1.0) -> float:
    """Sustained torch.mm GFLOP/s on these torch threads, SmolLM2's MLP shape (1024x576 @ 576x1536)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(1024, 576, device=device).to(dtype)
    b = torch.randn(576, 1536, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    inner = 10 if device == "cuda" else 1  # one emulated bf16 CPU matmul takes over a second
    n, start = 0, clock()
    while clock() - start < seconds:
        for _ in range(inner):
            a @ b
        n += inner
        sync()
    return 2 * 1024 * 576 * 1536 * n / (clock() - start) / 1e9


def forward_flops(model, examples) -> float:
    """FLOPs a forward over these examples requires: linear layers on every real token, the LM head only on
    the response positions, causal attention (QK^T and AV over the lower triangle)."""
    cfg = model.config
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - embed - (0 if cfg.tie_word_embeddings else head)
    total = 0.0
    for e in examples:
        for r in (e.chosen, e.rejected):
            n = len(r.input_ids)
            total += (
                2 * body * n
                + 2 * head * r.response_length
                + 2 * cfg.num_hidden_layers * n * n * cfg.hidden_size
            )
    return total


def scoring_seconds(model, tokenizer, examples, precision, device: str = "cpu") -> float:
    import torch

    from mrpo.modeling.scoring import score_sequences

    encoded = [e.chosen for e in examples] + [e.rejected for e in examples]
    start = clock()
    score_sequences(model, encoded, tokenizer.pad_token_id, 16384, torch.device(device), precision=precision)
    if device == "cuda":
        torch.cuda.synchronize()
    return clock() - start


# ---------------------------------------------------------------- memory at vocabulary 128k (child processes)


def word_tokenizer():
    """A word-level tokenizer with VOCAB ids ("w0" ... ), so TRL, which tokenizes text, sees the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<pad>": VOCAB - 2, "</s>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def tiny_llama(device: str = "cpu"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    attention(model, device)
    model.train()
    return model


def memory_pairs(prompt_tokens: int):
    """MEMORY_PAIRS pairs of MEMORY_TOKENS ids each (the last one EOS, as TRL appends), random words."""
    import numpy as np

    rng = np.random.default_rng(prompt_tokens)
    response = MEMORY_TOKENS - prompt_tokens - 1
    out = []
    for _ in range(MEMORY_PAIRS):
        prompt, chosen, rejected = (
            rng.integers(0, VOCAB - 2, n).tolist() for n in (prompt_tokens, response, response)
        )
        out.append((prompt, chosen, rejected))
    return out


def memory_examples(prompt_tokens: int):
    """(ours' PreferenceExamples, TRL's text Dataset) of the same MEMORY_PAIRS x MEMORY_TOKENS ids."""
    import numpy as np
    from datasets import Dataset

    from mrpo.data.preference import PreferenceExample
    from mrpo.data.tokenization import EncodedResponse

    pairs = memory_pairs(prompt_tokens)

    def enc(p, r):
        return EncodedResponse(p + r + [VOCAB - 1], len(p), len(r) + 1, False, True)

    ours = [
        PreferenceExample(str(i), enc(p, c), enc(p, r), np.zeros(1), np.zeros(1))
        for i, (p, c, r) in enumerate(pairs)
    ]

    def words(ids):
        return " ".join(f"w{i}" for i in ids)

    trl = Dataset.from_dict(
        {
            "prompt": [words(p) for p, _, _ in pairs],
            "chosen": [" " + words(c) for _, c, _ in pairs],
            "rejected": [" " + words(r) for _, _, r in pairs],
        }
    )
    return ours, trl


def step_memory(design: str, prompt_tokens: int, dtype: str, chunk: int | None, device: str = "cpu") -> dict:
    """Peak memory increment of the second training step of `design` (ours | trl) on the tiny 128k Llama:
    resident set on cpu (call in a fresh process), torch.cuda allocated memory on cuda."""
    import torch

    features = library_features()
    ours, trl = memory_examples(prompt_tokens)
    bf16 = dtype == "bfloat16"
    if design == "ours":
        trainer = ours_trainer(
            tiny_llama(device),
            word_tokenizer(),
            ours,
            Path(tempfile.mkdtemp(prefix="b7-mem-")),
            features,
            batch=MEMORY_PAIRS,
            steps=2,
            precision=torch.bfloat16 if bf16 else torch.float32,
            chunk=chunk,
            use_cpu=device == "cpu",
        )
    else:
        kw = C.trl_precision_kwargs(bf16=bf16, checkpointing=False)
        trainer = trl_trainer(tiny_llama(device), word_tokenizer(), trl, kw, 2, MEMORY_PAIRS, 1024, device)
    seen: dict = {}
    trainer.add_callback(second_step_meter(device, seen))
    trainer.train()
    return {
        "increment_mib": seen["peak"] - seen["start"],
        "before_step_mib": seen["start"],
        "peak_mib": seen["peak"],
        "measure": "process RSS (VmHWM after a reset)" if device == "cpu" else "torch.cuda allocated",
        "peak_reset": seen["reset"],
        "logprob_chunk": chunk if features["logprob_chunk_kwarg"] else "not in this checkout",
        "batching": getattr(trainer, "batching", None),
    }


def second_step_meter(device: str, seen: dict):
    """A callback that records, into `seen`, the memory before step 2 and its peak during it."""
    import ctypes

    import torch
    from gpu_check import reset_rss_peak, rss_peak_mib
    from transformers import TrainerCallback

    class Second(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step != 1:
                return
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                seen["reset"], seen["start"] = True, torch.cuda.memory_allocated() / 2**20
                return
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: the next peak is this step's
            seen["reset"], seen["start"] = reset_rss_peak(), C.current_rss_mib()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 2:
                if device == "cuda":
                    torch.cuda.synchronize()
                cuda = device == "cuda"
                seen["peak"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_peak_mib()

    return Second()


def memory_child(args) -> None:
    """One design's step in this (fresh) process; prints its step_memory JSON (and writes it to
    `--child-out` when given, for runs assembled from separately started processes: `--memory-from`)."""
    C.set_threads(args.threads)
    out = step_memory(args.memory_child, args.prompt_tokens, args.dtype, args.logprob_chunk)
    out |= {"design": args.memory_child, "prompt_tokens": args.prompt_tokens, "dtype": args.dtype}
    if args.child_out:
        Path(args.child_out).write_text(json.dumps(out) + "\n")
    print(json.dumps(out))


def memory_from(directory: Path) -> list[dict]:
    """Memory rows from the `--child-out` files of separately started memory processes in `directory`."""
    found = {}
    for f in sorted(directory.glob("*.json")):
        r = json.loads(f.read_text())
        found[(r["dtype"], r["prompt_tokens"], r["design"])] = r
    rows = []
    for dtype, prompt in sorted({(d, p) for d, p, _ in found}, key=lambda k: (k[0] != "float32", k[1])):
        if (dtype, prompt, "ours") in found and (dtype, prompt, "trl") in found:
            row = {"prompt_tokens": prompt, "dtype": dtype, "vocab": VOCAB}
            row["pairs_x_tokens"] = [MEMORY_PAIRS, MEMORY_TOKENS]
            row["ours"], row["trl"] = found[(dtype, prompt, "ours")], found[(dtype, prompt, "trl")]
            row["ratio_ours_over_trl"] = row["ours"]["increment_mib"] / row["trl"]["increment_mib"]
            row["measured_in"] = "separately started fresh processes (--memory-from)"
            rows.append(row)
    return rows


def memory_in_fresh_process(design: str, prompt: int, dtype: str, args) -> dict:
    """step_memory in a new interpreter on cpu (a process's RSS peak is its own); in this one on cuda."""
    if args.device == "cuda":
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
        return step_memory(design, prompt, dtype, args.logprob_chunk, "cuda")
    cmd = [sys.executable, __file__, "--memory-child", design, "--prompt-tokens", str(prompt)]
    cmd += ["--dtype", dtype, "--threads", str(args.threads)]
    if args.logprob_chunk is not None:
        cmd += ["--logprob-chunk", str(args.logprob_chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {design} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_rows(args) -> list[dict]:
    """ours / TRL precomputed peak-step increments per prompt mix and precision, each in a fresh process
    (`--memory-jobs` of them at once)."""
    from concurrent.futures import ThreadPoolExecutor

    cases = []
    for dtype in ("float32",) if getattr(args, "skip_bf16", None) else ("float32", "bfloat16"):
        full = dtype == "float32" or args.full_memory or args.device == "cuda"
        cases += [(dtype, prompt) for prompt in ((16, 256) if full else (16,))]
    jobs = [(d, p, design) for d, p in cases for design in ("ours", "trl")]
    workers = 1 if args.device == "cuda" else max(1, args.memory_jobs)
    with ThreadPoolExecutor(workers) as pool:
        measured = pool.map(lambda j: memory_in_fresh_process(j[2], j[1], j[0], args), jobs)
        done = dict(zip(jobs, measured, strict=True))
    rows = []
    for dtype, prompt in cases:
        row = {"prompt_tokens": prompt, "dtype": dtype, "vocab": VOCAB}
        row["pairs_x_tokens"] = [MEMORY_PAIRS, MEMORY_TOKENS]
        row["ours"], row["trl"] = done[(dtype, prompt, "ours")], done[(dtype, prompt, "trl")]
        row["ratio_ours_over_trl"] = row["ours"]["increment_mib"] / row["trl"]["increment_mib"]
        print(
            f"  memory {dtype}, {prompt}-token prompts: ours {row['ours']['increment_mib']:.0f} MiB, "
            f"TRL {row['trl']['increment_mib']:.0f} MiB -> x{row['ratio_ours_over_trl']:.3f}",
            file=sys.stderr,
            flush=True,
        )
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the run


def load_policy(args, scratch: Path):
    """(label, ReferenceConfig, tokenizer, model factory): SmolLM2, else the zoo anchor."""
    import torch

    from mrpo.modeling.models import load_model, load_tokenizer

    ref = None if args.zoo else C.smollm2_checkpoint()
    label = "SmolLM2-135M"
    if ref is None:
        label, ref, _ = C.policy_source("zoo", scratch)

    def model_fn():
        m = load_model(ref, "cpu", torch.float32)
        attention(m, args.device)
        m.train()
        return m

    return label, ref, load_tokenizer(ref), model_fn


def shared_prompt_tokens(examples) -> int:
    """Tokens that packed batches run once instead of twice: the prompt of each pair whose chosen and
    rejected encodings start with the same prompt ids (`mrpo.modeling.packing.shared_prompt_row`)."""
    same = [
        e.chosen.prompt_length
        for e in examples
        if e.chosen.input_ids[: e.chosen.prompt_length] == e.rejected.input_ids[: e.rejected.prompt_length]
    ]
    return sum(same)


def step_rows(label, ref, tokenizer, model_fn, pairs, args, features, scratch, flops_peak) -> dict:
    examples = C.preference_examples(tokenizer, pairs, args.max_length, ref.chat_template, 1)[
        : args.step_pairs
    ]
    kept = pairs.set_index("pair_id").loc[[e.pair_id for e in examples]].reset_index()
    trainers, notes = step_designs(model_fn, tokenizer, examples, kept, ref, args, features, scratch)
    tokens = sum(len(e.chosen.input_ids) + len(e.rejected.input_ids) for e in examples)
    shared = shared_prompt_tokens(examples)
    print(
        f"{label}: {len(examples)} pairs ({tokens} tokens, {shared} of them a prompt packing runs once), "
        f"designs {list(trainers)}",
        file=sys.stderr,
    )
    runs = time_steps(trainers, args.rounds)
    step_flops = 3 * forward_flops(trainers["trl-pre fp32"].model, examples)
    rows = {}
    for name, values in runs.items():
        seconds = C.median(values)
        peak = flops_peak["bfloat16" if ("bf16" in name or name == "trl-pre defaults") else "float32"]
        # packed runs a shared prompt once: its required work, to first order, scales with the tokens it runs
        work = step_flops * ((tokens - shared) / tokens if "packed" in name else 1.0)
        rows[name] = {
            "epoch_step_seconds": C.spread(values),
            "tokens_per_s": tokens / seconds,
            "ratio_vs_trl_pre_same_precision": C.paired_ratio(
                values, runs["trl-pre bf16" if "bf16" in name else "trl-pre fp32"]
            ),
            "matmul_fraction": work / seconds / (peak * 1e9),
        }
    return {
        "case": label,
        "pairs": len(examples),
        "batch_pairs": args.step_batch_pairs,
        "max_length": args.max_length,
        "real_tokens": tokens,
        "shared_prompt_tokens": shared,
        "required_training_tflop": step_flops / 1e12,
        "designs": rows,
        "skipped": notes,
        "examples": examples,
    }


def run(args) -> dict:

    features = library_features()
    C.set_threads(args.threads)
    result = {
        "benchmark": "B7 lean: padding, vocabulary, precision vs TRL",
        "command": " ".join(["python"] + sys.argv),
        "machine": C.machine_info(args.threads),
        "commit": C.git_commit(),
        "library_features": features,
    }
    peak = {d: matmul_gflops(d, args.device) for d in ("float32", "bfloat16")}
    result["matmul_gflops"] = peak
    print(f"  torch.mm GFLOP/s: {peak}", file=sys.stderr, flush=True)
    args.skip_bf16 = None
    if peak["bfloat16"] < peak["float32"] and not args.bf16:
        # no native bf16 matmul (e.g. a CPU without AVX-512 BF16/AMX): a bf16 step would run for many minutes
        args.skip_bf16 = (
            f"skipped: bf16 matmul here runs at {peak['bfloat16']:.1f} GFLOP/s against fp32's "
            f"{peak['float32']:.1f} (no native bf16 on this CPU); --bf16 runs it anyway"
        )
        result["bf16_skipped"] = args.skip_bf16
    memory = None
    if "memory" in args.parts and args.device == "cpu":
        # the fresh processes of the memory part run beside the HH-RLHF part (memory is not a timing)
        from concurrent.futures import ThreadPoolExecutor

        memory = ThreadPoolExecutor(1).submit(memory_rows, args)
    if "padding" in args.parts or "step" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            hh_parts(args, features, peak, result, Path(tmp))
        C.write_result(args.out, result)  # kept if a later part is stopped
    if "memory" in args.parts:
        result["memory"] = memory.result() if memory is not None else memory_rows(args)
    return result


def hh_parts(args, features: dict, peak: dict, result: dict, scratch: Path) -> None:
    """Padding share, training steps and scoring on the HH-RLHF pairs, into `result`."""
    import torch

    cfg = C.prepare_hh_rlhf(scratch, args.pairs, args.hh)
    if cfg is None:
        raise SystemExit(f"lean: {args.hh} not found (HH-RLHF harmless-base test split); pass --hh")
    pairs = C.prepared_pairs(cfg, "train")
    label, ref, tokenizer, model_fn = load_policy(args, scratch)
    result["model"] = label
    if "padding" in args.parts:
        result["padding_share"] = padding_shares(tokenizer, model_fn(), pairs, ref, args, features, scratch)
    if "step" not in args.parts:
        return
    steps = step_rows(label, ref, tokenizer, model_fn, pairs, args, features, scratch, peak)
    examples = steps.pop("examples")
    model = model_fn().to(args.device).eval()
    fwd = forward_flops(model, examples)
    result["scoring"] = {"pairs": len(examples), "required_forward_tflop": fwd / 1e12}
    for dtype in ("float32",) if args.skip_bf16 else ("float32", "bfloat16"):
        scoring_seconds(model, tokenizer, examples[:1], getattr(torch, dtype), args.device)  # warm-up
        s = scoring_seconds(model, tokenizer, examples, getattr(torch, dtype), args.device)
        result["scoring"][dtype] = {"seconds": s, "matmul_fraction": fwd / s / (peak[dtype] * 1e9)}
    result["step"] = steps


def summary(result: dict) -> dict:
    """The last line: the headline numbers (None where a part did not run or a row was skipped)."""
    default = result["library_features"]["default_batching"] or "padded"
    shares = result.get("padding_share", {}).get("1024", {})
    share = shares.get(default)
    designs = result.get("step", {}).get("designs", {})
    ours = designs.get(f"ours {default} fp32") or designs.get("ours padded fp32")
    memory = [r["ratio_ours_over_trl"] for r in result.get("memory", []) if r["dtype"] == "float32"]
    out = {
        "model": result.get("model"),
        "padding_share": share if isinstance(share, float) else None,
        "padding_share_by_mode": {m: v for m, v in shares.items() if isinstance(v, float)},
        "memory_ratio_vs_trl": max(memory) if memory else None,
        "step_ratio_vs_trl": ours["ratio_vs_trl_pre_same_precision"] if ours else None,
        "step_ratio_vs_trl_by_design": {n: d["ratio_vs_trl_pre_same_precision"] for n, d in designs.items()},
        "default_batching": default,
    }
    out["targets_met"] = {f"{k}<={v}": (out[k] is not None and out[k] <= v) for k, v in TARGETS.items()}
    return out


def parse_args(argv: list[str] | None = None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=256, help="HH-RLHF pairs prepared (padding share over all)")
    p.add_argument("--batch-pairs", type=int, default=8, help="batch of the padding-share epoch")
    p.add_argument("--step-pairs", type=int, default=4, help="pairs of the timed training epoch")
    p.add_argument("--step-batch-pairs", type=int, default=2)
    p.add_argument("--max-length", type=int, default=384, help="of the timed steps")
    p.add_argument("--rounds", type=int, default=1, help="timed rounds after the warm-up")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--zoo", action="store_true", help="the zoo anchor even when SmolLM2 is installed")
    p.add_argument("--bf16", action="store_true", help="the bf16 rows even where bf16 matmul is not native")
    p.add_argument("--memory-jobs", type=int, default=1, help="memory processes at once (each up to ~8 GB)")
    p.add_argument("--full-memory", action="store_true", help="bf16 memory for both prompt mixes too")
    p.add_argument(
        "--logprob-chunk", type=int, default=None, help="ours' train.logprob_chunk (default: the library's)"
    )
    p.add_argument(
        "--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to measure (default: all)"
    )
    p.add_argument("--hh", type=Path, default=C.HH_RLHF, help="HH-RLHF harmless-base jsonl(.gz)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: the same comparisons on a GPU (memory in-process, CUDA allocator peaks)",
    )
    p.add_argument("--out", default="b7_lean")
    p.add_argument("--memory-child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument(
        "--memory-from",
        type=Path,
        help="add memory rows from the files of separately started memory processes to --out's JSON",
    )
    p.add_argument("--prompt-tokens", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return 0
    if args.memory_from:
        path = C.RESULTS / f"{args.out}.json"
        result = json.loads(path.read_text())
        result["memory"] = memory_from(args.memory_from)
        result["summary"] = summary(result)
        print("wrote", C.write_result(args.out, result))
        print(json.dumps(result["summary"]))
        return 0
    result = run(args)
    result["summary"] = summary(result)
    print("wrote", C.write_result(args.out, result))
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
