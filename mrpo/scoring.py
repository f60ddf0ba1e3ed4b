"""The `score` stage: log p(chosen | prompt) and log p(rejected | prompt) of every prepared pair under one reference.

Each reference scores with its own tokenizer (and chat template when configured),
through the same `encode_response` + `response_logps` the trainer uses. Work is
cut into shards of `score.shard_size` pairs written as they finish under
`<score.output_dir>/.shards/<reference>/`, so a killed run resumes where it
stopped; a manifest (prepared-data digest, model fingerprint, settings) makes
stale shards be discarded rather than reused. Within a shard, sequences are
sorted by length and packed under `score.batch_tokens`, so there is little
padding.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from mrpo.data import SPLITS, prepared_digest
from mrpo.errors import MRPOError
from mrpo.io import atomic_file, write_json_atomically
from mrpo.models import (
    collate_responses,
    cpu_threads_for,
    forward_precision,
    load_model,
    load_tokenizer,
    model_fingerprint,
    response_logps,
    torch_threads,
)
from mrpo.preflight import check_stage
from mrpo.runtime import resolve_device, resolve_dtype
from mrpo.scorefile import METADATA_KEY, SCHEMA, score_metrics_path, score_path
from mrpo.tokenization import EncodedResponse, encode_response, render_prompt

log = logging.getLogger("mrpo")

SHARD_FORMAT = 2  # bump when the shard layout or the scoring computation changes (2: fp32 weights + autocast)
# The settings that change a score's numerics but not what is scored: shards made under other values are
# refused rather than mixed into one file (see _open_shard_dir).
NUMERICS_KEYS = ("device", "dtype", "batch_tokens", "padding_side")


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


@dataclass
class ShardStats:
    """What one shard cost: real tokens, padded tokens, seconds, sequences, prompts cut from the left."""

    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    sequences: int = 0
    prompts_truncated: int = 0

    def add(self, other: ShardStats) -> None:
        for key in ("tokens", "padded_tokens", "seconds", "sequences", "prompts_truncated"):
            setattr(self, key, getattr(self, key) + getattr(other, key))


# ---------------------------------------------------------------- pure helpers


def plan_batches(
    lengths: Sequence[int], batch_tokens: int, batch_overhead_tokens: int = 128
) -> list[list[int]]:
    """Indices grouped into batches of similar length, each batch's padded size (count x longest) <= batch_tokens.

    Sequences are sorted by length and the sorted run is cut where the total
    cost, padded tokens plus `batch_overhead_tokens` per forward call, is least
    (a dynamic programme over the distinct lengths), so there is little padding
    without many tiny batches. A sequence longer than batch_tokens gets a batch
    of its own.
    """
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    # Runs of equal length, ascending: (length, count).
    groups: list[list[int]] = []
    for i in order:
        if groups and groups[-1][0] == lengths[i]:
            groups[-1][1] += 1
        else:
            groups.append([lengths[i], 1])
    g = len(groups)
    prefix = [0]
    for _, count in groups:
        prefix.append(prefix[-1] + count)
    best = [0.0] + [math.inf] * g  # best[j]: least cost of the first j groups
    cut = [0] * (g + 1)
    for j in range(1, g + 1):
        longest = groups[j - 1][0]
        per_batch = max(1, batch_tokens // longest)
        for i in range(j - 1, -1, -1):
            count = prefix[j] - prefix[i]
            cost = best[i] + count * longest + math.ceil(count / per_batch) * batch_overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    spans = []
    j = g
    while j > 0:
        spans.append((prefix[cut[j]], prefix[j], groups[j - 1][0]))
        j = cut[j]
    batches: list[list[int]] = []
    for lo, hi, longest in reversed(spans):
        per_batch = max(1, batch_tokens // longest)
        members = order[lo:hi]
        batches.extend(members[k : k + per_batch] for k in range(0, len(members), per_batch))
    return batches


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
            f"reference {reference!r}: non-finite {which} log-prob {values[bad[0]]} for pair_id {pair.pair_id!r} "
            f"(split {pair.split}; {bad.size} such pair(s) in this shard). The model's weights or its dtype are broken: "
            "check the checkpoint, or score with score.dtype: float32"
        )


def check_enough_fit(
    reference: str, pairs: Sequence[PreparedPair], fits: np.ndarray, max_length: int
) -> None:
    """Refuse a scoring run after which nothing could be trained (no pair, or no train pair, fits); warn on any
    pair that does not fit, with the count: those pairs are left out of training."""
    fix = (
        f"raise score.max_length (now {max_length}; and train.max_length with it) or lower data.max_chars so "
        "fewer long pairs are kept"
    )
    if len(pairs) and not fits.any():
        raise ScoringError(
            f"reference {reference!r}: none of the {len(pairs)} pairs fits score.max_length={max_length} tokens "
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
            "score %s: %d of %d pairs (%d of %d train) do not fit score.max_length=%d and will be left out of "
            "training; to keep them, %s",
            reference,
            int((~fits).sum()),
            len(pairs),
            int((train & ~fits).sum()),
            int(train.sum()),
            max_length,
            fix,
        )


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


def score_sequences(
    model,
    encoded: Sequence[EncodedResponse],
    pad_token_id: int,
    batch_tokens: int,
    device: torch.device,
    progress: tqdm | None = None,
    padding_side: str = "right",
    precision: torch.dtype = torch.float32,
) -> tuple[np.ndarray, ShardStats]:
    """log p(response | prompt) for each encoded sequence (NaN where it does not fit), and what it cost.

    `precision` is the forward's numerics over the model's (fp32) weights, as in training: see
    `mrpo.models.forward_precision`.
    """
    stats = ShardStats()
    out = np.full(len(encoded), np.nan, dtype=np.float64)
    todo = [i for i, e in enumerate(encoded) if e.fits]
    start = time.perf_counter()
    for batch in plan_batches([len(encoded[i].input_ids) for i in todo], batch_tokens):
        idx = [todo[j] for j in batch]
        inputs = collate_responses([encoded[i] for i in idx], pad_token_id, padding_side)
        with torch.inference_mode(), forward_precision(precision, device):
            logps = response_logps(model, **{k: v.to(device) for k, v in inputs.items()})
        out[idx] = logps.double().cpu().numpy()
        real = int(inputs["attention_mask"].sum())
        stats.tokens += real
        stats.padded_tokens += inputs["input_ids"].numel()
        stats.sequences += len(idx)
        if progress is not None:
            progress.update(len(idx))
            elapsed = time.perf_counter() - start
            progress.set_postfix_str(f"{stats.tokens / max(elapsed, 1e-9):,.0f} tok/s", refresh=False)
    stats.seconds = time.perf_counter() - start
    stats.prompts_truncated = sum(e.prompt_truncated for e in encoded)
    return out, stats


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
                f"{shard_dir}: an interrupted run left shards scored in other numerics ({listing}); resuming would "
                "mix them into one score file. Resume with the same score.device, score.dtype and score.batch_tokens, "
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
    """Score every prepared pair under reference `name`; write `<score.output_dir>/<name>.parquet` and return its path.

    `on_shard(index, n_shards, path)` is called after each shard computed in this
    run (not for shards reused from an interrupted run).
    """
    ref = cfg.reference(name)
    check_stage(cfg, "score")
    s = cfg.score
    out_dir = Path(s.output_dir)
    out_path = score_path(out_dir, name)
    pairs = read_prepared(cfg.data.output_dir)
    digest = prepared_digest(cfg.data.output_dir)
    device = resolve_device(s.device)
    dtype = resolve_dtype(s.dtype, device)
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
    _open_shard_dir(shard_dir, key)

    bounds = shard_bounds(len(pairs), s.shard_size)
    shard_paths = [shard_dir / f"shard-{i:05d}.parquet" for i in range(len(bounds))]
    done: dict[int, tuple[pa.Table, ShardStats]] = {}
    for i, (lo, hi) in enumerate(bounds):
        loaded = _load_shard(shard_paths[i], pairs[lo:hi])
        if loaded is not None:
            done[i] = loaded
    if done:
        log.info("score %s: resuming, %d of %d shards already done", name, len(done), len(bounds))

    todo = [i for i in range(len(bounds)) if i not in done]
    if todo:
        tokenizer = load_tokenizer(ref)
        # fp32 weights, `dtype` autocast: the numerics of the policy's forward in training (fp32 master weights).
        model = load_model(ref, device, torch.float32)
        total = 2 * sum(bounds[i][1] - bounds[i][0] for i in todo)
        with (
            tqdm(total=total, desc=f"score {name}", unit="seq", dynamic_ncols=True) as progress,
            torch_threads(cpu_threads_for(model, device)),
        ):
            for i in todo:
                lo, hi = bounds[i]
                table, stats = _compute_shard(
                    model, tokenizer, ref, pairs[lo:hi], s, device, progress, padding_side, dtype
                )
                meta = {b"mrpo_shard": json.dumps(stats.__dict__).encode()}
                _write_parquet_atomically(table.replace_schema_metadata(meta), shard_paths[i])
                done[i] = (table, stats)
                if on_shard is not None:
                    on_shard(i, len(bounds), shard_paths[i])

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
    # stale) in a small metrics file of their own.
    timings = {
        "seconds": round(totals.seconds, 3),
        "pairs_per_second": round(len(pairs) / totals.seconds, 2) if totals.seconds else None,
        "tokens_per_second": round(totals.tokens / totals.seconds, 1) if totals.seconds else None,
    }
    write_json_atomically(score_metrics_path(s.metrics_dir, name), timings)
    shutil.rmtree(shard_dir, ignore_errors=True)
    log.info(
        "score %s: %d pairs (%d not fitting, %d prompts cut) -> %s; %.1f pairs/s, %.0f tokens/s, padding %.1f%%",
        name,
        len(pairs),
        not_fitting,
        totals.prompts_truncated,
        out_path,
        timings["pairs_per_second"] or math.nan,
        timings["tokens_per_second"] or math.nan,
        100 * padding_share,
    )
    return out_path


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
