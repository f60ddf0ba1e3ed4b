"""Attention of a packed row one sequence at a time (CPU and any device without a varlen kernel).

Given a packed row (position_ids restarting at 0, no attention mask) transformers' SDPA path separates the
sequences with a dense (T x T) block-diagonal mask, and SDPA then computes all T x T scores, the masked ones
too: for B sequences of length L that is B times the attention work of the padded batch (B x L x L), and the
reason packing used to run slower than grouped batching on CPU (B7). Here each sequence runs its own causal
SDPA call on its slice of the row: the padded batch's numbers to fp32 rounding, sum L_i^2 work.

The sequence bounds travel as transformers' varlen keyword arguments (`cu_seq_lens_q`, ...), which
flash-attention implementations use directly, so a GPU model with flash attention packs without this module.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

NAME = "mrpo_packed_sdpa"


def packed_sdpa_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """SDPA as transformers runs it, except for a packed row (`cu_seq_lens_q` given): per sequence, causal."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    pieces = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    return torch.cat(pieces, dim=1), None


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
    bounds = torch.cat([starts, starts.new_tensor([positions.shape[1]])]).to(torch.int32)
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
        return "each sequence attends on its own (one causal SDPA call per sequence)"
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
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != NAME:
        return None
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
