"""The `score` stage: log p(chosen | prompt) and log p(rejected | prompt) of every prepared pair
under one reference.

Each reference scores with its own tokenizer (and chat template when configured),
through the same `encode_response` + `response_logps` the trainer uses. Work is
cut into shards of `score.shard_size` pairs written as they finish under
`<score.output_dir>/.shards/<reference>/`, so a killed run resumes where it
stopped; a manifest (prepared-data digest, model fingerprint, settings) makes
stale shards be discarded rather than reused. Within a shard, sequences are
sorted by length and packed under `score.batch_tokens`, so there is little
padding.

Under `torchrun` or `accelerate launch` (WORLD_SIZE > 1) the unfinished shards are
dealt round-robin to the ranks (gloo on CPU, nccl on CUDA, one GPU per rank): each
rank writes its own shards into the same shard directory, and rank 0 assembles the
file after a barrier. Shard boundaries and each shard's batches do not depend on the
number of ranks, so the file is the one a single process writes, and a re-run with
any number of ranks reuses every finished shard.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from mrpo.data.prepared import SPLITS, prepared_digest
from mrpo.data.scorefile import METADATA_KEY, SCHEMA, score_metrics_path, score_path
from mrpo.data.tokenization import EncodedResponse, encode_response, render_prompt
from mrpo.errors import ConfigError, MRPOError
from mrpo.io import atomic_file, write_json_atomically
from mrpo.modeling.models import (
    cpu_threads_for,
    load_model,
    load_tokenizer,
    model_fingerprint,
    placement_kwargs,
    placement_summary,
    torch_threads,
)
from mrpo.modeling.scoring import ShardStats, score_sequences
from mrpo.preflight import check_stage
from mrpo.runtime import resolve_device, resolve_dtype

log = logging.getLogger("mrpo")

SHARD_FORMAT = 2  # bump when the shard layout or the scoring computation changes (2: fp32 weights + autocast)
# The settings that change a score's numerics but not what is scored: shards made under other values are
# refused rather than mixed into one file (see _open_shard_dir).
NUMERICS_KEYS = ("device", "dtype", "batch_tokens", "padding_side")
# A rank that has finished its shards waits at a barrier for the slowest rank's shards, which for a large
# reference can take hours; the launcher (torchrun) still stops every rank as soon as one of them dies.
BARRIER_TIMEOUT = timedelta(hours=48)


class ScoringError(MRPOError, RuntimeError):
    """Scoring cannot go on: missing prepared data, or a reference produced a non-finite score."""


@dataclass(frozen=True)
class PreparedPair:
    split: str
    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    prompt_messages: str | None


# ---------------------------------------------------------------- pure helpers


def shard_bounds(n_pairs: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, n_pairs)) for start in range(0, n_pairs, shard_size)]


def check_finite(
    values: np.ndarray, fits: np.ndarray, pairs: Sequence[PreparedPair], which: str, reference: str
) -> None:
    """Raise naming the reference and the pair when a fitting pair's score is NaN or infinite."""
    bad = np.flatnonzero(fits & ~np.isfinite(values))
    if bad.size:
        pair = pairs[int(bad[0])]
        raise ScoringError(
            f"reference {reference!r}: non-finite {which} log-prob {values[bad[0]]} "
            f"for pair_id {pair.pair_id!r} (split {pair.split}; {bad.size} such pair(s) in this shard). "
            "The model's weights or its dtype are broken: "
            "check the checkpoint, or score with score.dtype: float32"
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


# ---------------------------------------------------------------- ranks


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun / accelerate launch job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this machine

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        return cls(
            int(env.get("RANK", 0)),
            world,
            int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", world)),
        )

    def mine(self, shards: Sequence[int]) -> list[int]:
        """This rank's share of the shards to compute: every world-th one, from its own rank on."""
        return list(shards[self.rank :: self.world])


def rank_gpus(n_gpus: int, local_rank: int, local_world: int, reference: str) -> list[int]:
    """The GPUs one rank spreads its copy of a large reference over: this machine's GPUs cut into
    `local_world` equal runs of consecutive indices (8 GPUs, 4 ranks: [0, 1], [2, 3], ...); leftovers
    unused."""
    per_rank = n_gpus // local_world
    if per_rank < 1:
        raise ConfigError(
            f"references.{reference}.device_map: {local_world} ranks on this machine share {n_gpus} visible "
            f"GPU(s), and each rank's copy needs at least one; launch at most {n_gpus} ranks per machine"
        )
    return list(range(local_rank * per_rank, (local_rank + 1) * per_rank))


@contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Join the launcher's process group for the block (gloo on CPU, nccl on CUDA) unless alone or already in
    one."""
    if ranks.world == 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _from_rank0(ranks: Ranks, value):
    """`value` as rank 0 has it, on every rank."""
    if ranks.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


# ---------------------------------------------------------------- reading


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


# ---------------------------------------------------------------- computing


def _shard_table(pairs, chosen, rejected, enc_chosen, enc_rejected) -> pa.Table:
    return pa.table(
        {
            "pair_id": [p.pair_id for p in pairs],
            "split": [p.split for p in pairs],
            "chosen_logp": chosen,
            "rejected_logp": rejected,
            "chosen_tokens": [e.response_length for e in enc_chosen],
            "rejected_tokens": [e.response_length for e in enc_rejected],
            "fits": [c.fits and r.fits for c, r in zip(enc_chosen, enc_rejected, strict=True)],
        },
        schema=SCHEMA,
    )


def _write_parquet_atomically(table: pa.Table, path: Path) -> None:
    with atomic_file(path) as tmp:  # readers see the old file or the new one, never half of one
        pq.write_table(table, tmp)


def _load_shard(path: Path, pairs: Sequence[PreparedPair]) -> tuple[pa.Table, ShardStats] | None:
    """A finished shard, or None when it is missing, unreadable or for other pairs (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        stats = ShardStats(**json.loads(table.schema.metadata[b"mrpo_shard"]))
    except Exception as exc:  # a half-written or foreign file: recompute rather than trust it
        log.warning("score: ignoring unreadable shard %s (%s)", path, exc)
        return None
    if table.column("pair_id").to_pylist() != [p.pair_id for p in pairs]:
        log.warning("score: shard %s holds other pairs; recomputing it", path)
        return None
    return table.replace_schema_metadata(None), stats


def numerics_mismatch(old: dict, new: dict) -> dict[str, tuple]:
    """{key: (old, new)} for the NUMERICS_KEYS whose values differ between two shard manifests."""
    return {k: (old.get(k), new.get(k)) for k in NUMERICS_KEYS if old.get(k) != new.get(k)}


def _open_shard_dir(shard_dir: Path, key: dict) -> None:
    """Keep the shards only when they were made with exactly this key (data, model, settings).

    Shards of other data or another model are stale and discarded. Shards of the same data and model
    computed in other numerics (device, dtype, batch packing, padding side) are refused: finishing
    them here would mix numerics within one score file, and discarding them may throw away hours of
    accelerator time, so the user decides.
    """
    manifest = shard_dir / "manifest.json"
    if shard_dir.exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = None
        same_work = old is not None and all(old.get(k) == v for k, v in key.items() if k not in NUMERICS_KEYS)
        differs = numerics_mismatch(old, key) if same_work else {}
        if differs:
            listing = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in differs.items())
            raise ScoringError(
                f"{shard_dir}: an interrupted run left shards scored in other numerics ({listing}); "
                "resuming would mix them into one score file. "
                "Resume with the same score.device, score.dtype and score.batch_tokens, "
                f"or delete {shard_dir} to score from scratch"
            )
        if old != key:
            log.info(
                "score: discarding stale shards in %s (prepared data, model or settings changed)", shard_dir
            )
            shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    if not manifest.is_file():
        manifest.write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")


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
    started = time.perf_counter()
    s = cfg.score
    out_dir = Path(s.output_dir)
    out_path = score_path(out_dir, name)
    pairs = read_prepared(cfg.data.output_dir)
    digest = prepared_digest(cfg.data.output_dir)
    ranks = Ranks.from_env()
    device = resolve_device(s.device)
    gpus = None  # a spread reference's GPUs for this rank, when several ranks each spread a copy
    if ranks.world > 1 and device.type == "cuda":
        if ref.device_map is not None:
            gpus = rank_gpus(torch.cuda.device_count(), ranks.local_rank, ranks.local_world, name)
            device = torch.device("cuda", gpus[0])
        else:
            device = torch.device("cuda", ranks.local_rank)  # one GPU per rank
    dtype = resolve_dtype(s.dtype, device)
    placement = {"gpus": gpus, "rank": ranks.rank if ranks.world > 1 else None}
    # Refuses bitsandbytes on CPU (or without the package) before any work.
    placement_kwargs(ref, device, **placement)
    fingerprint = model_fingerprint(ref)
    tokenizer_name = ref.tokenizer or (ref.gguf_file and f"{ref.model}:{ref.gguf_file}") or ref.model
    settings = {
        "reference": name,
        "model": ref.model,
        **fingerprint,
        "tokenizer": tokenizer_name,
        "chat_template": ref.chat_template,
        "dtype": str(dtype).removeprefix("torch."),
        "max_length": s.max_length,
        "prepared_digest": digest,
        # Quantized weights change the scores; spreading or offloading them (device_map) does not.
        **({"quantization": ref.quantization} if ref.quantization else {}),
    }
    key = {
        **settings,
        "gguf_file": ref.gguf_file,
        "shard_size": s.shard_size,
        "pairs": len(pairs),
        "shard_format": SHARD_FORMAT,
        "device": device.type,
        "batch_tokens": s.batch_tokens,
        "padding_side": padding_side,
    }
    shard_dir = out_dir / ".shards" / name
    bounds = shard_bounds(len(pairs), s.shard_size)
    shard_paths = [shard_dir / f"shard-{i:05d}.parquet" for i in range(len(bounds))]
    done: dict[int, tuple[pa.Table, ShardStats]] = {}
    with process_group(ranks, device):
        # Rank 0 alone discards stale shards and finds the finished ones; every rank then acts on its verdict.
        verdict: tuple[list[int] | None, str | None] = (None, None)
        if ranks.rank == 0:
            try:
                _open_shard_dir(shard_dir, key)
                for i, (lo, hi) in enumerate(bounds):
                    loaded = _load_shard(shard_paths[i], pairs[lo:hi])
                    if loaded is not None:
                        done[i] = loaded
                verdict = ([i for i in range(len(bounds)) if i not in done], None)
            except ScoringError as exc:
                verdict = (None, str(exc))
        todo, error = _from_rank0(ranks, verdict)
        if error is not None:
            raise ScoringError(error)
        if done:
            log.info("score %s: resuming, %d of %d shards already done", name, len(done), len(bounds))
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
            _compute_shards(
                ref,
                mine,
                bounds,
                shard_paths,
                pairs,
                s,
                device,
                dtype,
                padding_side,
                on_shard,
                ranks,
                placement,
            )
        _barrier(ranks)  # every rank's shards are on disk
        if ranks.rank == 0:
            for i in todo:
                lo, hi = bounds[i]
                loaded = _load_shard(shard_paths[i], pairs[lo:hi])
                if loaded is None:
                    raise ScoringError(
                        f"{shard_paths[i]}: shard missing after every rank finished; re-run the stage"
                    )
                done[i] = loaded
            run = {"ranks": ranks.world, "wall_seconds": time.perf_counter() - started}
            _assemble(
                cfg, name, pairs, bounds, done, settings, device, padding_side, out_path, shard_dir, run
            )
        _barrier(ranks)  # the file is written before any rank reports success
    return out_path


def _compute_shards(
    ref, indices, bounds, shard_paths, pairs, s, device, dtype, padding_side, on_shard, ranks, placement
):
    """Score the shards `indices` of this rank, writing each as it finishes."""
    tokenizer = load_tokenizer(ref)
    # fp32 weights, `dtype` autocast: the numerics of the policy's forward in training (fp32 master weights).
    model = load_model(ref, device, torch.float32, placement=True, **placement)
    if getattr(model, "hf_device_map", None):
        rank = f" rank {ranks.rank}" if ranks.world > 1 else ""
        log.info("score %s%s: modules %s", ref.name, rank, placement_summary(model.hf_device_map))
    total = 2 * sum(bounds[i][1] - bounds[i][0] for i in indices)
    desc = f"score {ref.name}" + (f" [rank {ranks.rank}]" if ranks.world > 1 else "")
    with (
        tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True) as progress,
        torch_threads(cpu_threads_for(model, device)),
    ):
        for i in indices:
            lo, hi = bounds[i]
            table, stats = _compute_shard(
                model, tokenizer, ref, pairs[lo:hi], s, device, progress, padding_side, dtype
            )
            meta = {b"mrpo_shard": json.dumps(stats.__dict__).encode()}
            _write_parquet_atomically(table.replace_schema_metadata(meta), shard_paths[i])
            if on_shard is not None:
                on_shard(i, len(bounds), shard_paths[i])


def _assemble(
    cfg, name, pairs, bounds, done, settings, device, padding_side, out_path, shard_dir, run
) -> None:
    """The score file from every shard, in order, written atomically; the shards are removed after.
    `run`: this run's rank count and wall seconds so far, for the timings file."""
    s = cfg.score
    out_dir = Path(s.output_dir)
    totals = ShardStats()
    for i in range(len(bounds)):
        totals.add(done[i][1])
    tables = [done[i][0] for i in range(len(bounds))]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    fits = np.asarray(table.column("fits").to_pylist(), dtype=bool)
    not_fitting = int(len(pairs) - fits.sum())
    check_enough_fit(name, pairs, fits, s.max_length)
    padding_share = 1 - totals.tokens / totals.padded_tokens if totals.padded_tokens else 0.0
    metadata = {
        **settings,
        "device": device.type,
        "pairs": len(pairs),
        "pairs_not_fitting": not_fitting,
        "prompts_truncated": totals.prompts_truncated,
        "scored_tokens": totals.tokens,
        "padding_share": round(padding_share, 6),
        "batch_tokens": s.batch_tokens,
        "shard_size": s.shard_size,
        "padding_side": padding_side,
        # `dtype` is the forward's autocast precision over these weights; training reads it to match.
        "weights_dtype": "float32",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_parquet_atomically(
        table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()}), out_path
    )
    # Timings vary run to run: kept out of the score file (whose hash decides whether train and evaluate are
    # stale) in a small metrics file of their own. `seconds` is forward time summed over every shard (and so
    # over ranks, and over earlier runs when resumed): the rates are per device, the wall is this run's.
    timings = {
        "seconds": round(totals.seconds, 3),
        "pairs_per_second": round(len(pairs) / totals.seconds, 2) if totals.seconds else None,
        "tokens_per_second": round(totals.tokens / totals.seconds, 1) if totals.seconds else None,
        "ranks": run["ranks"],
        "wall_seconds": round(run["wall_seconds"], 3),
    }
    write_json_atomically(score_metrics_path(s.metrics_dir, name), timings)
    shutil.rmtree(shard_dir, ignore_errors=True)
    log.info(
        "score %s: %d pairs (%d not fitting, %d prompts cut) -> %s; "
        "%.1f pairs/s, %.0f tokens/s per %s, padding %.1f%%; %.1f s wall on %d rank(s)",
        name,
        len(pairs),
        not_fitting,
        totals.prompts_truncated,
        out_path,
        timings["pairs_per_second"] or math.nan,
        timings["tokens_per_second"] or math.nan,
        device.type.replace("cuda", "GPU").replace("cpu", "process"),
        100 * padding_share,
        timings["wall_seconds"],
        run["ranks"],
    )


def _compute_shard(
    model, tokenizer, ref, pairs, s, device, progress, padding_side, precision
) -> tuple[pa.Table, ShardStats]:
    enc_chosen, enc_rejected = [], []
    for p in pairs:
        prompt_text = render_prompt(tokenizer, p.prompt, p.prompt_messages, ref.chat_template)
        enc_chosen.append(
            encode_response(tokenizer, prompt_text, p.chosen, s.max_length, chat_template=ref.chat_template)
        )
        enc_rejected.append(
            encode_response(tokenizer, prompt_text, p.rejected, s.max_length, chat_template=ref.chat_template)
        )
    # Chosen and rejected of a pair are scored only if both fit: a pair is usable whole or not at all.
    fits = np.array([c.fits and r.fits for c, r in zip(enc_chosen, enc_rejected, strict=True)], dtype=bool)
    encoded = [
        e if f else _unfit(e)
        for e, f in zip(enc_chosen + enc_rejected, np.concatenate([fits, fits]), strict=True)
    ]
    logps, stats = score_sequences(
        model, encoded, tokenizer.pad_token_id, s.batch_tokens, device, progress, padding_side, precision
    )
    progress.update(int(2 * (~fits).sum()))
    chosen, rejected = logps[: len(pairs)], logps[len(pairs) :]
    check_finite(chosen, fits, pairs, "chosen", ref.name)
    check_finite(rejected, fits, pairs, "rejected", ref.name)
    return _shard_table(pairs, chosen, rejected, enc_chosen, enc_rejected), stats


def _unfit(e: EncodedResponse) -> EncodedResponse:
    return EncodedResponse(e.input_ids, e.prompt_length, e.response_length, e.prompt_truncated, False)
