"""Sequence log-probs of responses: THE computation scoring stores for every reference and training
computes for the policy, so at step 0 the policy's log-probs equal the anchor's stored scores exactly.

Batches of (prompt + response) sequences are padded on either side; positions come from the attention mask,
the log-softmax runs in fp32 over the response positions only, and the forward runs in the precision the
anchor was scored in (fp32 weights under autocast).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mrpo.data.tokenization import EncodedResponse

# Response positions projected through the LM head at a time: peak memory ~ chunk x vocabulary x 4 bytes
# (0.25 GB at 128k); the default of train.logprob_chunk and score.logprob_chunk.
DEFAULT_CHUNK = 512


@contextmanager
def forward_precision(dtype: torch.dtype, device: torch.device | str) -> Iterator[None]:
    """Run forwards in `dtype` numerics over fp32 weights: autocast for bfloat16/float16, nothing for float32.

    Training keeps fp32 master weights, so scoring the anchor the same way (fp32 weights under the same
    autocast) is what makes the policy's step-0 log-probs equal the stored scores in every precision.
    """
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype):
        yield


def collate_responses(
    encoded: Sequence[EncodedResponse], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad encoded (prompt + response) sequences into a batch.

    Returns int64 `input_ids` (B, T), `attention_mask` (B, T) and `response_mask`
    (B, T), where `response_mask` is 1 exactly on the response tokens (the tokens
    whose log-probs are summed). `padding_side` is "right" or "left"; scores do not
    depend on it because `response_logps` derives positions from the mask.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not encoded:
        raise ValueError("collate_responses: empty batch")
    width = max(len(e.input_ids) for e in encoded)
    n = len(encoded)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(encoded):
        length = len(e.input_ids)
        start = 0 if padding_side == "right" else width - length
        input_ids[i, start : start + length] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[i, start : start + length] = 1
        response_mask[i, start + e.prompt_length : start + length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only,
    so left padding does not shift them (GPT-2 has absolute positions)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


def token_logps_from_logits(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log p(label) in fp32, (B, T) -> (B, T), exactly 0 where `mask` is 0.

    `logits[:, t]` must already be the prediction for `labels[:, t]` (shifted by
    the caller). Only masked-in positions go through the fp32 log-softmax, which
    saves memory for large vocabularies; `torch.where`, not a product, so a NaN
    in a padded position cannot leak into the sum.
    """
    keep = mask.bool()
    out = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    if keep.any():
        selected = logits[keep].float()  # (N, V)
        out[keep] = -F.cross_entropy(selected, labels[keep], reduction="none")
    return out


@torch.no_grad()
def log_sum_sq_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log sum_v p_v^2 of each next-token distribution (WPO's weight alignment, mrpo.core.wpo.wpo_weights),
    (B, T, V) -> (B, T) fp32, 0 where `mask` is 0, without gradient."""
    keep = mask.bool()
    out = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    if keep.any():
        selected = logits[keep].float()  # (N, V)
        out[keep] = torch.logsumexp(2 * selected, dim=-1) - 2 * torch.logsumexp(selected, dim=-1)
    return out


def sequence_logps_from_logits(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Summed log-probs of the response tokens, (B,) fp32, from unshifted causal-LM logits (B, T, V)."""
    token_logps = token_logps_from_logits(logits[:, :-1], input_ids[:, 1:], response_mask[:, 1:])
    return token_logps.sum(-1)


def response_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
    packed: bool = False,
    pairs: bool = False,
) -> torch.Tensor:
    """log p(response | prompt) per row: the sum over response tokens of log p(token | prefix), (B,) fp32.

    Works under autograd (training) and under inference_mode (scoring). The model
    may run in bf16; the log-softmax always runs in fp32. Positions from the first response column on are
    projected through the LM head about `chunk` at a time (see `chunked_token_logps`; 0 = all their logits
    at once, the same numbers to fp32 rounding). `packed`: the rows run as one sequence
    without padding (see `_packed_tokens`); the same numbers where the attention supports it
    (`mrpo.training.batching.packing_supported`). `pairs`: rows i and i + B/2 are one pair's chosen and
    rejected sequences; packed, a pair's common prompt then runs once where the attention allows it
    (`mrpo.modeling.packing.shared_prompt_row`).
    """
    if packed:
        return _packed_tokens(model, input_ids, attention_mask, response_mask, chunk, False, pairs).logps
    return _response_tokens(model, input_ids, attention_mask, response_mask, chunk, False).logps


@dataclass(frozen=True)
class ResponseTokens:
    """What WPO weighting needs of one forward: per-token log-probs and log sum_v p_v^2 at the response
    positions (B, T'), and the mask of those positions (B, T')."""

    token_logps: torch.Tensor
    log_sum_sq_probs: torch.Tensor
    mask: torch.Tensor

    @property
    def logps(self) -> torch.Tensor:
        """(B,) exactly response_logps: the same per-token log-probs, summed the same way."""
        return self.token_logps.sum(-1)


def response_token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
    packed: bool = False,
    pairs: bool = False,
) -> ResponseTokens:
    """`response_logps` (the same forward and the same numbers) plus the per-token terms of WPO's weights."""
    if packed:
        return _packed_tokens(model, input_ids, attention_mask, response_mask, chunk, True, pairs)
    return _response_tokens(model, input_ids, attention_mask, response_mask, chunk, True)


def _response_tokens(
    model, input_ids, attention_mask, response_mask, chunk, sum_sq, position_ids=None, varlen=None
) -> ResponseTokens:
    """`varlen`: a packed row's sequence bounds (`mrpo.modeling.packing.varlen_kwargs`); then only its
    response positions go through the LM head, not the prompts of its later sequences."""
    head = chunkable_head(model) if chunk else None
    keep = _logit_positions_needed(response_mask) if _accepts_logits_to_keep(model) else 0
    width = keep or input_ids.shape[1]
    ids, mask = input_ids[:, -width:], response_mask[:, -width:]
    # Position t's logits predict token t + 1; the last position predicts nothing. Results are contiguous
    # (B, T' - 1) tensors: a sum over a strided view may round differently (parity with TRL is to 2 ulps).
    labels, label_mask = ids[:, 1:], mask[:, 1:]
    extra: dict[str, torch.Tensor] = {}
    if head is None:
        logits = _forward(model, input_ids, attention_mask, keep, position_ids, varlen)[:, :-1]
        token_logps = token_logps_from_logits(logits, labels, label_mask)
        if sum_sq:
            extra["sum_sq"] = log_sum_sq_probs(logits, label_mask)
    else:
        with _projecting_only(head, labels, label_mask, chunk, sum_sq, extra, compact=varlen is not None):
            token_logps = _forward(model, input_ids, attention_mask, keep, position_ids, varlen)
    return ResponseTokens(token_logps, extra["sum_sq"] if sum_sq else torch.zeros(0), label_mask)


def _packed_tokens(model, input_ids, attention_mask, response_mask, chunk, sum_sq, pairs) -> ResponseTokens:
    """`_response_tokens` of a padded batch run as ONE row of its real tokens: each sequence keeps its own
    positions and, with no attention mask, transformers' causal mask turns block-diagonal where positions
    restart (masking_utils.find_packed_sequence_indices); on SDPA each sequence attends on its own
    (`mrpo.modeling.packing`). Results come back in the padded batch's layout (B, T - 1)."""
    from mrpo.modeling import packing

    inner = unwrapped_model(model)
    packing.use_packed_attention(inner)
    head = chunkable_head(model) if chunk else None
    if pairs and head is not None and packing.shares_prompts(inner):
        row = packing.shared_prompt_row(input_ids, attention_mask, response_mask)
        if row is not None:
            return _shared_prompt_tokens(model, head, row, response_mask, chunk, sum_sq)
    real = attention_mask.bool()
    positions = position_ids_from_mask(attention_mask)[real][None]
    # A sequence's first token is never a label: the padded path cannot score it either.
    response = response_mask[real].masked_fill(positions[0] == 0, 0)[None]
    varlen = packing.varlen_kwargs(positions)
    row_mask = packing.row_mask(inner, input_ids.device)
    flat = _response_tokens(
        model, input_ids[real][None], row_mask, response, chunk, sum_sq, positions, varlen
    )

    def unpack(values: torch.Tensor) -> torch.Tensor:
        # The last W - 1 labels of the packed row (logits_to_keep cut the rest): move each to its token's
        # cell, then drop column 0 as the padded path does (its column t holds the label at token t + 1).
        per_token = F.pad(values[0], (positions.shape[1] - values.shape[1], 0))
        cells = torch.zeros(real.shape, dtype=torch.float32, device=real.device)
        return cells.index_put((real,), per_token)[:, 1:].contiguous()

    mask = torch.zeros_like(response_mask).index_put((real,), response[0])[:, 1:].contiguous()
    lss = unpack(flat.log_sum_sq_probs) if sum_sq else flat.log_sum_sq_probs
    return ResponseTokens(unpack(flat.token_logps), lss, mask)


def _shared_prompt_tokens(model, head, row, response_mask, chunk, sum_sq) -> ResponseTokens:
    """`_packed_tokens` of a `SharedPromptRow`: only the hidden states at `row.sources` go through the LM
    head, each for the token at its target."""
    from mrpo.modeling import packing

    labels = row.ids[:, row.targets]
    extra: dict[str, torch.Tensor] = {}
    attention = packing.row_mask(unwrapped_model(model), row.ids.device)
    with _projecting_only(head, labels, None, chunk, sum_sq, extra, sources=row.sources):
        flat = _forward(model, row.ids, attention, 0, row.positions, row.kwargs)
    cells = tuple(row.origin[row.targets].T)

    def unpack(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(response_mask.shape, dtype=torch.float32, device=values.device)
        return out.index_put(cells, values[0])[:, 1:].contiguous()

    mask = torch.zeros_like(response_mask).index_put(cells, response_mask.new_ones(labels.shape[1]))
    lss = unpack(extra["sum_sq"]) if sum_sq else torch.zeros(0)
    return ResponseTokens(unpack(flat), lss, mask[:, 1:].contiguous())


def _forward(model, input_ids, attention_mask, keep, position_ids=None, varlen=None) -> torch.Tensor:
    """The model's forward: what its LM head returns, from the first response position on."""
    kwargs = {"logits_to_keep": keep} if keep else {}
    kwargs.update(varlen or {})
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids if position_ids is not None else position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )
    return out.logits


@contextmanager
def _projecting_only(head, labels, mask, chunk, sum_sq, extra, compact=False, sources=None) -> Iterator[None]:
    """Within the block the LM head returns per-token log-probs of `labels` (B, T' - 1) instead of logits,
    so the computation stays inside the model's forward (DDP sees the head's weight used) and no (B, T', V)
    tensor exists; log sum_v p_v^2 (no gradient) lands in `extra["sum_sq"]`. `compact`: only the positions
    in `mask` are projected (one matmul row count per window, so rounding may differ from the full path's).
    `sources`: only the hidden states at these positions of a one-row batch, for `labels` (1, N) in order."""

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if sources is not None:
            ones = torch.ones_like(labels)
            logps, lss = chunked_token_logps(
                hidden[:, sources], labels, ones, head.weight, head.bias, chunk, sum_sq
            )
        elif not compact:
            logps, lss = chunked_token_logps(hidden, labels, mask, head.weight, head.bias, chunk, sum_sq)
        else:
            keep = mask.bool()
            picked = hidden[:, : labels.shape[1]][keep][None]
            ones = torch.ones_like(labels[keep])[None]
            logps, lss = chunked_token_logps(
                picked, labels[keep][None], ones, head.weight, head.bias, chunk, sum_sq
            )
            zeros = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
            logps, lss = zeros.masked_scatter(keep, logps), zeros.masked_scatter(keep, lss)
        if sum_sq:
            extra["sum_sq"] = lss
        return logps

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def chunked_token_logps(hidden, labels, mask, weight, bias, chunk: int, sum_sq: bool = False):
    """Per-token log p(label) (B, T' - 1) fp32 from final hidden states (B, T', H) and the LM head, 0 off
    `mask`, and log sum_v p_v^2 at the same positions (no gradient; zeros unless `sum_sq`).

    The head runs on windows of about `chunk` positions (chunk // B columns of every row); under autograd
    each window's logits are recomputed in backward instead of kept (torch.utils.checkpoint), so peak memory
    is chunk x vocabulary, whatever the batch. A batch within one chunk is one matmul over every position,
    as the full path's (`token_logps_from_logits`): bit-identical, which parity with TRL to 2 ulps needs
    (MKL may round a row differently with the matmul's row count).
    """
    rows, width = hidden.shape[0], hidden.shape[1]
    step = width if rows * width <= chunk else max(1, chunk // rows)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    pieces, squares = [], []
    for start in range(0, labels.shape[1], step):
        end = min(start + step, labels.shape[1])
        h = hidden[:, start : width if step == width else end]
        y, keep = labels[:, start:end], mask[:, start:end].bool()
        if grad:
            pieces.append(checkpoint(_window_logps, h, y, keep, weight, bias, use_reentrant=False))
        else:
            pieces.append(_window_logps(h, y, keep, weight, bias))
        if sum_sq:
            squares.append(_window_sum_sq(h, keep, weight, bias))
    empty = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    logps = torch.cat(pieces, dim=1) if pieces else empty
    return logps, (torch.cat(squares, dim=1) if squares else empty)


def _window_logps(hidden, labels, keep, weight, bias):
    logits = F.linear(hidden, weight, bias)[:, : labels.shape[1]]
    return token_logps_from_logits(logits, labels, keep)


@torch.no_grad()
def _window_sum_sq(hidden, keep, weight, bias):
    return log_sum_sq_probs(F.linear(hidden, weight, bias)[:, : keep.shape[1]], keep)


# Heads that are more than `lm_head(hidden)` (a scale or a soft cap on the logits) keep the full path: the
# chunked one would skip that step.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def chunkable_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The plain linear LM head the chunked path can call itself, or None (sharded weights under FSDP,
    an adapter on the head, a head that transforms its logits): then the full path runs."""
    inner = unwrapped_model(model)
    if not hasattr(inner, "get_output_embeddings") or _is_sharded(model):
        return None
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear or type(head.weight) is not torch.nn.Parameter:
        return None
    config = getattr(inner, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel) or any(
        type(m).__name__.startswith("FSDP") for m in model.modules()
    )


def _logit_positions_needed(response_mask: torch.Tensor) -> int:
    """How many trailing positions' logits cover every response token (the one before the first, onwards)."""
    columns = response_mask.any(dim=0).nonzero()
    if len(columns) == 0:
        return 0
    width = response_mask.shape[1]
    return min(width, width - int(columns[0]) + 1)


@functools.cache
def _forward_accepts_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return _forward_accepts_logits_to_keep(type(unwrapped_model(model)))


def unwrapped_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DistributedDataParallel and PEFT wrappers (PEFT passes keyword
    arguments through to it)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
