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

from mrpo.data.tokenization import EncodedResponse


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
) -> torch.Tensor:
    """log p(response | prompt) per row: the sum over response tokens of log p(token | prefix), (B,) fp32.

    Works under autograd (training) and under inference_mode (scoring). The model
    may run in bf16; the log-softmax always runs in fp32. Logits are computed only
    from the first response position on: with a 50k vocabulary the prompt's logits
    would otherwise dominate memory.
    """
    return sequence_logps_from_logits(*_response_logits(model, input_ids, attention_mask, response_mask))


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
) -> ResponseTokens:
    """`response_logps` (the same forward and the same numbers) plus the per-token terms of WPO's weights."""
    logits, ids, mask = _response_logits(model, input_ids, attention_mask, response_mask)
    logits, labels, mask = logits[:, :-1], ids[:, 1:], mask[:, 1:]
    return ResponseTokens(token_logps_from_logits(logits, labels, mask), log_sum_sq_probs(logits, mask), mask)


def _response_logits(model, input_ids, attention_mask, response_mask):
    """The forward: unshifted logits (B, T', V) from the first response position on, with the input ids and
    response mask cut to the same T' trailing positions."""
    keep = _logit_positions_needed(response_mask) if _accepts_logits_to_keep(model) else 0
    kwargs = {"logits_to_keep": keep} if keep else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )
    width = out.logits.shape[1]
    return out.logits, input_ids[:, -width:], response_mask[:, -width:]


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
    model = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(model, "get_base_model"):  # PEFT passes keyword arguments through to the base model
        model = model.get_base_model()
    return _forward_accepts_logits_to_keep(type(model))
