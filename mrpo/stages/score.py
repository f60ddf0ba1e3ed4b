"""The `score` stage: log p(chosen | prompt) and log p(rejected | prompt) of every prepared pair
under one reference.

Each reference scores with its own tokenizer (and chat template when configured),
through the same `encode_response` + `response_logps` the trainer uses. Work is
cut into shards of `score.shard_size` pairs written as they finish under
`<score.output_dir>/.shards/<reference>/` (mrpo.data.shards), so a killed run
resumes where it stopped. Within a shard, sequences are sorted by length and
packed under `score.batch_tokens`, so there is little padding.

Under `torchrun` or `accelerate launch` (WORLD_SIZE > 1) the unfinished shards are
dealt round-robin to the ranks (mrpo.modeling.ranks): each rank writes its own shards
into the same shard directory, and rank 0 assembles the file after a barrier. Shard
boundaries and each shard's batches do not depend on the number of ranks, so the file
is the one a single process writes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mrpo.config.inputs import check_declared
from mrpo.data.prepared import SPLITS, prepared_digest
from mrpo.data.provenance import model_stat, remember_model
from mrpo.data.scorefile import (
    METADATA_KEY,
    ROW_DIGEST,
    SCHEMA,
    score_metrics_path,
    score_path,
    with_row_digests,
)
from mrpo.data.shards import SHARD_FORMAT, ScoringError, ShardDir, ShardStats, write_parquet_atomically
from mrpo.io import write_json_atomically
from mrpo.modeling.models import (
    cpu_threads_for,
    load_model,
    load_tokenizer,
    model_fingerprint,
    placement_kwargs,
    placement_summary,
    torch_threads,
)
from mrpo.modeling.ranks import Ranks, barrier, from_rank0, process_group, rank_device
from mrpo.modeling.scoring import score_pairs
from mrpo.preflight import check_stage
from mrpo.runtime import progress, resolve_device, resolve_dtype

log = logging.getLogger("mrpo")


@dataclass(frozen=True)
class PreparedPair:
    split: str
    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    prompt_messages: str | None


@dataclass(frozen=True)
class ScoringRun:
    """What every step of one rank's scoring run needs: the reference, its settings, where it runs, the
    pairs and their shards."""

    ref: object
    s: object  # cfg.score
    pairs: list[PreparedPair]
    shards: ShardDir
    ranks: Ranks
    device: torch.device
    dtype: torch.dtype
    placement: dict
    padding_side: str


def score_reference(
    cfg,
    name: str,
    *,
    on_shard: Callable[[int, int, Path], None] | None = None,
    padding_side: str = "right",
) -> Path:
    """Score every prepared pair under reference `name`;
    write `<score.output_dir>/<name>.parquet` and return its path.

    `on_shard(index, n_shards, path)` is called after each shard computed in this
    run (not for shards reused from an interrupted run).
    """
    ref = cfg.reference(name)
    check_stage(cfg, "score")
    check_declared(cfg, "score")  # under DVC: dvc.yaml lists local references as deps
    started = time.perf_counter()
    s = cfg.score
    pairs = read_prepared(cfg.data.output_dir)
    ranks = Ranks.from_env()
    device, gpus = rank_device(ranks, resolve_device(s.device), ref)
    dtype = resolve_dtype(s.dtype, device)
    placement = {"gpus": gpus, "rank": ranks.rank if ranks.world > 1 else None}
    placement_kwargs(ref, device, **placement)  # refuses bitsandbytes on CPU (or without it) before any work
    shards = ShardDir.of(s.output_dir, name, len(pairs), s.shard_size)
    run = ScoringRun(ref, s, pairs, shards, ranks, device, dtype, placement, padding_side)
    stat = model_stat(ref)  # before hashing: kept with the hash only if no file changed meanwhile
    settings = score_settings(cfg, ref, dtype)
    with process_group(ranks, device):
        done, todo = _finished_shards(run, _shard_key(run, settings))
        mine = ranks.mine(todo)
        if ranks.world > 1:
            log.info(
                "score %s: rank %d of %d scores %d of %d shards",
                name,
                ranks.rank,
                ranks.world,
                len(mine),
                len(todo),
            )
        if mine:
            _compute_shards(run, mine, on_shard)
        barrier(ranks)  # every rank's shards are on disk
        if ranks.rank == 0:
            done.update(_collect(run, todo))
            _assemble(
                run, done, settings, {"ranks": ranks.world, "wall_seconds": time.perf_counter() - started}
            )
            remember_model(cfg, ref, stat, settings.get("content_hash"))
        barrier(ranks)  # the file is written before any rank reports success
    return score_path(s.output_dir, name)


def score_settings(cfg, ref, dtype: torch.dtype) -> dict:
    """What decides the scores' content, as the score file records it."""
    tokenizer_name = ref.tokenizer or (ref.gguf_file and f"{ref.model}:{ref.gguf_file}") or ref.model
    return {
        "reference": ref.name,
        "model": ref.model,
        **model_fingerprint(ref),
        "tokenizer": tokenizer_name,
        "chat_template": ref.chat_template,
        "dtype": str(dtype).removeprefix("torch."),
        "max_length": cfg.score.max_length,
        "prepared_digest": prepared_digest(cfg.data.output_dir),
        # Quantized weights change the scores; spreading or offloading them (device_map) does not.
        **({"quantization": ref.quantization} if ref.quantization else {}),
    }


def _shard_key(run: ScoringRun, settings: dict) -> dict:
    """The shard manifest: shards made under another key are discarded or refused (mrpo.data.shards)."""
    return {
        **settings,
        "gguf_file": run.ref.gguf_file,
        "shard_size": run.s.shard_size,
        "pairs": len(run.pairs),
        "shard_format": SHARD_FORMAT,
        "device": run.device.type,
        "batch_tokens": run.s.batch_tokens,
        "padding_side": run.padding_side,
    }


def _finished_shards(run: ScoringRun, key: dict) -> tuple[dict[int, tuple[pa.Table, ShardStats]], list[int]]:
    """(the finished shards, the indices still to compute). Rank 0 alone discards stale shards and finds the
    finished ones; every rank then acts on its verdict."""
    done: dict[int, tuple[pa.Table, ShardStats]] = {}
    verdict: tuple[list[int] | None, str | None] = (None, None)
    if run.ranks.rank == 0:
        try:
            run.shards.open(key)
            for i in range(len(run.shards)):
                loaded = run.shards.load(i, run.pairs)
                if loaded is not None:
                    done[i] = loaded
            verdict = ([i for i in range(len(run.shards)) if i not in done], None)
        except ScoringError as exc:
            verdict = (None, str(exc))
    todo, error = from_rank0(run.ranks, verdict)
    if error is not None:
        raise ScoringError(error)
    if done:
        log.info("score %s: resuming, %d of %d shards already done", run.ref.name, len(done), len(run.shards))
    return done, todo


def _collect(run: ScoringRun, indices: list[int]) -> dict[int, tuple[pa.Table, ShardStats]]:
    """The shards every rank computed, read back by rank 0."""
    collected = {}
    for i in indices:
        loaded = run.shards.load(i, run.pairs)
        if loaded is None:
            raise ScoringError(
                f"{run.shards.shard_path(i)}: shard missing after every rank finished; re-run the stage"
            )
        collected[i] = loaded
    return collected


def read_prepared(output_dir: str | Path) -> list[PreparedPair]:
    """Every prepared pair, splits in order train, val, test, rows in file order."""
    pairs = []
    for split in SPLITS:
        path = Path(output_dir) / f"{split}.parquet"
        if not path.is_file():
            raise ScoringError(f"{path}: prepared data not found; run `mrpo prepare` first")
        table = pq.read_table(path)
        missing = {"pair_id", "prompt", "chosen", "rejected"} - set(table.column_names)
        if missing:
            raise ScoringError(f"{path}: missing column(s) {sorted(missing)}; re-run `mrpo prepare`")
        messages = (
            table.column("prompt_messages").to_pylist() if "prompt_messages" in table.column_names else None
        )
        cols = {c: table.column(c).to_pylist() for c in ("pair_id", "prompt", "chosen", "rejected")}
        for i in range(table.num_rows):
            pairs.append(
                PreparedPair(
                    split,
                    cols["pair_id"][i],
                    cols["prompt"][i],
                    cols["chosen"][i],
                    cols["rejected"][i],
                    messages[i] if messages else None,
                )
            )
    return pairs


def _compute_shards(run: ScoringRun, indices: list[int], on_shard) -> None:
    """Score the shards `indices` of this rank, writing each as it finishes."""
    ref, ranks, device = run.ref, run.ranks, run.device
    tokenizer = load_tokenizer(ref)
    # fp32 weights, `dtype` autocast: the numerics of the policy's forward in training (fp32 master weights).
    model = load_model(ref, device, torch.float32, placement=True, **run.placement)
    if getattr(model, "hf_device_map", None):
        rank = f" rank {ranks.rank}" if ranks.world > 1 else ""
        log.info("score %s%s: modules %s", ref.name, rank, placement_summary(model.hf_device_map))
    total = 2 * sum(run.shards.bounds[i][1] - run.shards.bounds[i][0] for i in indices)
    desc = f"score {ref.name}" + (f" [rank {ranks.rank}]" if ranks.world > 1 else "")
    with (
        progress(total=total, desc=desc, unit="seq") as bar,
        torch_threads(cpu_threads_for(model, device)),
    ):
        for i in indices:
            lo, hi = run.shards.bounds[i]
            table, stats = score_pairs(
                model, tokenizer, ref, run.pairs[lo:hi], run.s, device, bar, run.padding_side, run.dtype
            )
            run.shards.write(i, table, stats)
            if on_shard is not None:
                on_shard(i, len(run.shards), run.shards.shard_path(i))


def _assemble(run: ScoringRun, done: dict, settings: dict, wall: dict) -> None:
    """The score file from every shard, in order, written atomically; the shards are removed after.
    `wall`: this run's rank count and wall seconds so far, for the timings file."""
    s, name, pairs = run.s, run.ref.name, run.pairs
    totals = ShardStats()
    for i in range(len(run.shards)):
        totals.add(done[i][1])
    tables = [done[i][0] for i in range(len(run.shards))]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    fits = np.asarray(table.column("fits").to_pylist(), dtype=bool)
    check_enough_fit(name, pairs, fits, s.max_length)
    padding_share = 1 - totals.tokens / totals.padded_tokens if totals.padded_tokens else 0.0
    metadata = {
        **settings,
        "device": run.device.type,
        "pairs": len(pairs),
        "pairs_not_fitting": int(len(pairs) - fits.sum()),
        "prompts_truncated": totals.prompts_truncated,
        "scored_tokens": totals.tokens,
        "padding_share": round(padding_share, 6),
        "batch_tokens": s.batch_tokens,
        "shard_size": s.shard_size,
        "padding_side": run.padding_side,
        # `dtype` is the forward's autocast precision over these weights; training reads it to match.
        "weights_dtype": "float32",
        "row_digests": ROW_DIGEST,  # read_scores refuses rows edited after scoring
    }
    Path(s.output_dir).mkdir(parents=True, exist_ok=True)
    out_path = score_path(s.output_dir, name)
    write_parquet_atomically(
        with_row_digests(table).replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()}),
        out_path,
    )
    # Timings vary run to run: kept out of the score file (whose hash decides whether train and evaluate are
    # stale) in a small file of their own, git-ignored and no DVC output (score.metrics_dir). `seconds` is
    # forward time summed over every shard (and so over ranks, and over earlier runs when resumed): the rates
    # are per device, the wall is this run's.
    timings = {
        "seconds": round(totals.seconds, 3),
        "pairs_per_second": round(len(pairs) / totals.seconds, 2) if totals.seconds else None,
        "tokens_per_second": round(totals.tokens / totals.seconds, 1) if totals.seconds else None,
        "ranks": wall["ranks"],
        "wall_seconds": round(wall["wall_seconds"], 3),
    }
    write_json_atomically(score_metrics_path(s.metrics_dir, name), timings)
    run.shards.remove()
    _log_scored(run, metadata, timings, padding_share, out_path)


def _log_scored(run: ScoringRun, metadata: dict, timings: dict, padding_share: float, out_path: Path) -> None:
    log.info(
        "score %s: %d pairs (%d not fitting, %d prompts cut) -> %s; "
        "%.1f pairs/s, %.0f tokens/s per %s, padding %.1f%%; %.1f s wall on %d rank(s)",
        run.ref.name,
        metadata["pairs"],
        metadata["pairs_not_fitting"],
        metadata["prompts_truncated"],
        out_path,
        timings["pairs_per_second"] or math.nan,
        timings["tokens_per_second"] or math.nan,
        run.device.type.replace("cuda", "GPU").replace("cpu", "process"),
        100 * padding_share,
        timings["wall_seconds"],
        timings["ranks"],
    )


def check_enough_fit(
    reference: str, pairs: Sequence[PreparedPair], fits: np.ndarray, max_length: int
) -> None:
    """Refuse a scoring run after which nothing could be trained (no pair, or no train pair, fits);
    warn on any pair that does not fit, with the count: those pairs are left out of training."""
    fix = (
        f"raise score.max_length (now {max_length}; and train.max_length with it) or lower data.max_chars so "
        "fewer long pairs are kept"
    )
    if len(pairs) and not fits.any():
        raise ScoringError(
            f"reference {reference!r}: none of the {len(pairs)} pairs fits "
            f"score.max_length={max_length} tokens "
            f"(prompt plus the whole response), so there is nothing to train on; {fix}"
        )
    train = np.array([p.split == "train" for p in pairs], dtype=bool)
    if train.any() and not (fits & train).any():
        raise ScoringError(
            f"reference {reference!r}: none of the {int(train.sum())} train pairs fits score.max_length="
            f"{max_length} tokens, so there is nothing to train on; {fix}"
        )
    if not fits.all():
        log.warning(
            "score %s: %d of %d pairs (%d of %d train) do not fit score.max_length=%d "
            "and will be left out of training; to keep them, %s",
            reference,
            int((~fits).sum()),
            len(pairs),
            int((train & ~fits).sum()),
            int(train.sum()),
            max_length,
            fix,
        )
