"""Sequence log-probs of many responses under one model: length-sorted batches within a token budget;
a shard of prepared pairs scored into the score file's rows."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from mrpo.data.shards import ScoringError, ShardStats, shard_table
from mrpo.data.tokenization import EncodedResponse, encode_response, render_prompt
from mrpo.modeling.logprobs import DEFAULT_CHUNK, collate_responses, forward_precision, response_logps

if TYPE_CHECKING:
    from tqdm import tqdm

    from mrpo.runtime import LogProgress


def plan_batches(
    lengths: Sequence[int], batch_tokens: int, batch_overhead_tokens: int = 128
) -> list[list[int]]:
    """Indices grouped into batches of similar length,
    each batch's padded size (count x longest) <= batch_tokens.

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


def score_sequences(
    model,
    encoded: Sequence[EncodedResponse],
    pad_token_id: int,
    batch_tokens: int,
    device: torch.device,
    progress: tqdm | LogProgress | None = None,  # mrpo.runtime.progress
    padding_side: str = "right",
    precision: torch.dtype = torch.float32,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[np.ndarray, ShardStats]:
    """log p(response | prompt) for each encoded sequence (NaN where it does not fit), and what it cost.

    `precision` is the forward's numerics over the model's (fp32) weights, as in training: see
    `mrpo.modeling.logprobs.forward_precision`. `chunk`: response positions per LM-head chunk
    (`mrpo.modeling.logprobs.response_logps`).
    """
    stats = ShardStats()
    out = np.full(len(encoded), np.nan, dtype=np.float64)
    todo = [i for i, e in enumerate(encoded) if e.fits]
    start = time.perf_counter()
    for batch in plan_batches([len(encoded[i].input_ids) for i in todo], batch_tokens):
        idx = [todo[j] for j in batch]
        inputs = collate_responses([encoded[i] for i in idx], pad_token_id, padding_side)
        with torch.inference_mode(), forward_precision(precision, device):
            logps = response_logps(model, **{k: v.to(device) for k, v in inputs.items()}, chunk=chunk)
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


def score_pairs(
    model, tokenizer, ref, pairs, s, device, progress, padding_side, precision
) -> tuple[pa.Table, ShardStats]:
    """One shard of prepared pairs (`pair_id`, `split`, `prompt`, `chosen`, `rejected`, `prompt_messages`)
    scored under the reference `ref` with the `score` settings `s`: its rows of the score file, and the
    cost."""
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
        model,
        encoded,
        tokenizer.pad_token_id,
        s.batch_tokens,
        device,
        progress,
        padding_side,
        precision,
        s.logprob_chunk,
    )
    progress.update(int(2 * (~fits).sum()))
    chosen, rejected = logps[: len(pairs)], logps[len(pairs) :]
    check_finite(chosen, fits, pairs, "chosen", ref.name)
    check_finite(rejected, fits, pairs, "rejected", ref.name)
    return shard_table(pairs, chosen, rejected, enc_chosen, enc_rejected), stats


def _unfit(e: EncodedResponse) -> EncodedResponse:
    return EncodedResponse(e.input_ids, e.prompt_length, e.response_length, e.prompt_truncated, False)


def check_finite(values: np.ndarray, fits: np.ndarray, pairs: Sequence, which: str, reference: str) -> None:
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
