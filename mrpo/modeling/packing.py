"""Attention of a packed row one sequence at a time (CPU and any device without a varlen kernel).

Given a packed row (position_ids restarting at 0, no attention mask) transformers' SDPA path separates the
sequences with a dense (T x T) block-diagonal mask, and SDPA then computes all T x T scores, the masked ones
too: for B sequences of length L that is B times the attention work of the padded batch (B x L x L), and the
reason packing used to run slower than grouped batching on CPU (B7). Here each sequence runs its own causal
SDPA call on its slice of the row: the padded batch's numbers to fp32 rounding, sum L_i^2 work.

A batch of preference pairs can also run each pair's prompt once (`shared_prompt_row`): the rejected
response continues the prompt its chosen response ran with, earlier in the row, and its SDPA call reads that
prompt's keys and values (`mrpo_prompts`), so the prompt's tokens run once instead of twice.

The sequence bounds travel as transformers' varlen keyword arguments (`cu_seq_lens_q`, ...), which
flash-attention implementations use directly, so a GPU model with flash attention packs without this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

NAME = "mrpo_packed_sdpa"


def packed_sdpa_attention(
    module, query, key, value, attention_mask, cu_seq_lens_q=None, mrpo_prompts=None, **kwargs
):
    """SDPA as transformers runs it, except for a packed row (`cu_seq_lens_q` given): per sequence, causal.
    A sequence given a prompt span (start, end) in `mrpo_prompts` continues that prompt, which ran earlier in
    the row (a pair's shared prompt, `shared_prompt_row`): it attends to the prompt and causally to itself."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    pieces = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
        mask = None
        if mrpo_prompts and mrpo_prompts[i] is not None:
            start, end = mrpo_prompts[i]
            k = torch.cat([key[:, :, start:end], k], dim=2)
            v = torch.cat([value[:, :, start:end], v], dim=2)
            mask = _continuation_mask(b - a, end - start, query.device)
        pieces.append(sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0])
    return torch.cat(pieces, dim=1), None


def _continuation_mask(length: int, prompt: int, device: torch.device) -> torch.Tensor:
    """(1, 1, length, prompt + length), True where a continuation token may attend: the whole prompt, then
    itself causally."""
    col = torch.arange(prompt + length, device=device)
    row = torch.arange(length, device=device)[:, None]
    return ((col < prompt) | (col - prompt <= row))[None, None]


AttentionInterface.register(NAME, packed_sdpa_attention)
# Padded batches get SDPA's mask; a packed row passes `row_mask`'s placeholder, so no dense mask is built.
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a model on transformers' SDPA to `packed_sdpa_attention` (the same numbers for every unpacked
    batch), for good: gradient checkpointing re-runs the attention in backward and must find it there. The
    implementation is not saved with the model's config."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)


def varlen_kwargs(positions: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """transformers' varlen arguments of a packed row from its position ids (1, T): sequences start at 0."""
    starts = (positions[0] == 0).nonzero().flatten()
    return _bounds_kwargs(torch.cat([starts, starts.new_tensor([positions.shape[1]])]).to(torch.int32))


def _bounds_kwargs(bounds: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """transformers' varlen arguments of a packed row whose sequences start at `bounds[:-1]` (int32)."""
    longest = int((bounds[1:] - bounds[:-1]).max())
    return {
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def packed_attention_note(model: torch.nn.Module) -> str:
    """How `model` attends in a packed row, for the log."""
    implementation = str(getattr(getattr(model, "config", None), "_attn_implementation", None))
    if implementation == NAME:
        return (
            "each sequence attends on its own (one causal SDPA call per sequence); a pair's prompt runs once "
            "where its chosen and rejected prompt ids agree"
        )
    if implementation.startswith("flash"):
        return f"each sequence attends on its own ({implementation}, variable-length)"
    return (
        f"{implementation} attention over the whole row with a block-diagonal mask: exact, but its attention "
        "work grows with the row's length squared, so packing may run slower than grouped"
    )


def row_mask(model: torch.nn.Module, device: torch.device) -> torch.Tensor | None:
    """The attention mask a packed row passes: on `packed_sdpa_attention` a 4D placeholder it never reads,
    which transformers takes as given, so it skips building the row's dense (T x T) mask; else None, and
    transformers builds the block-diagonal mask from the restarting positions."""
    if not shares_prompts(model):
        return None
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)


@dataclass(frozen=True)
class SharedPromptRow:
    """A batch of pairs as one packed row in which each pair's common prompt runs once: `ids` and
    `positions` (1, T); `origin` (T, 2): each token's (row, column) in the padded batch; the log-probs wanted
    are of the tokens at `targets`, each predicted by the hidden state at `sources` (the token before it,
    or for the first token of a rejected response, the last of the prompt it shares); `kwargs` go to the
    model's forward (the sequence bounds and, for `packed_sdpa_attention`, the prompt each continues)."""

    ids: torch.Tensor
    positions: torch.Tensor
    origin: torch.Tensor
    sources: torch.Tensor
    targets: torch.Tensor
    kwargs: dict


def shares_prompts(model: torch.nn.Module) -> bool:
    """Whether `model` attends with `packed_sdpa_attention`, the one attention that reads `mrpo_prompts` and
    so can run a `SharedPromptRow`."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME


def shared_prompt_row(input_ids, attention_mask, response_mask) -> SharedPromptRow | None:
    """Rows i and i + B/2 of a padded batch (a pair's chosen and rejected sequences) packed into one row,
    the rejected sequence without the prompt it has in common with the chosen one (the real tokens before
    the first response token, when they are the same ids); None when no pair shares its prompt (a truncated
    prompt, a batch of unpaired rows)."""
    rows, half = input_ids.shape[0], input_ids.shape[0] // 2
    real, response = attention_mask.bool(), response_mask.bool()
    ids, positions, origin, sources, targets = [], [], [], [], []
    prompts: list[tuple[int, int] | None] = []
    bounds = [0]
    chosen_prompts: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}  # row -> (prompt ids, span)
    for r in range(rows):
        cols = real[r].nonzero().flatten()
        is_response = response[r, cols]
        first = int(is_response.nonzero()[0]) if is_response.any() else len(cols)
        offset, skip, span = bounds[-1], 0, None
        paired = chosen_prompts.get(r - half) if rows % 2 == 0 and r >= half else None
        if paired is not None and first > 0 and torch.equal(paired[0], input_ids[r, cols[:first]]):
            skip, span = first, paired[1]
        kept = cols[skip:]
        if len(kept) == 0:
            continue
        labelled = is_response[skip:].nonzero().flatten()
        if span is None:
            labelled = labelled[labelled > 0]  # a sequence's first token is never a label
        source = offset + labelled - 1
        if span is not None:
            source[labelled == 0] = span[1] - 1
        sources.append(source)
        targets.append(offset + labelled)
        if r < half:
            chosen_prompts[r] = (input_ids[r, cols[:first]], (offset, offset + first))
        ids.append(input_ids[r, kept])
        positions.append(torch.arange(skip, skip + len(kept), device=kept.device))
        origin.append(torch.stack([torch.full_like(kept, r), kept], dim=1))
        prompts.append(span)
        bounds.append(offset + len(kept))
    if not any(prompts):
        return None
    kwargs = _bounds_kwargs(torch.tensor(bounds, dtype=torch.int32, device=input_ids.device))
    return SharedPromptRow(
        ids=torch.cat(ids)[None],
        positions=torch.cat(positions)[None],
        origin=torch.cat(origin),
        sources=torch.cat(sources),
        targets=torch.cat(targets),
        kwargs=kwargs | {"mrpo_prompts": prompts},
    )
