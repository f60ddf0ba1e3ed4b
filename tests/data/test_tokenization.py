"""mrpo.tokenization: the one way a (prompt, response) pair becomes ids, for scoring and training alike."""

from __future__ import annotations

import json

import pytest

from mrpo.data.tokenization import encode_response, prompt_messages, render_prompt
from mrpo.errors import ConfigError
from mrpo.stages.zoo import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_prompt_and_response_are_tokenized_apart_with_bos_and_eos(tok):
    enc = encode_response(tok, "2+2", "4", max_length=64, chat_template=False)
    prompt = tok("2+2", add_special_tokens=False)["input_ids"]
    response = tok("4", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == [tok.bos_token_id, *prompt, *response, tok.eos_token_id]
    assert (enc.prompt_length, enc.response_length) == (1 + len(prompt), len(response) + 1)
    assert enc.fits and not enc.prompt_truncated


def test_a_long_prompt_is_cut_from_the_left_and_a_response_that_cannot_fit_is_flagged(tok):
    enc = encode_response(tok, "abcdefghij", "xyz", max_length=8, chat_template=False)
    assert len(enc.input_ids) == 8 and enc.prompt_truncated and enc.fits
    assert enc.input_ids[enc.prompt_length :] == tok("xyz", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    # 8 - 4 response tokens leave the last 4 of the prompt; the BOS in front is cut with the rest
    assert enc.input_ids[: enc.prompt_length] == tok("ghij", add_special_tokens=False)["input_ids"]
    # the response plus EOS needs 4 tokens and one prompt token must remain: 4 does not fit, 5 does
    assert not encode_response(tok, "ab", "xyz", max_length=4, chat_template=False).fits
    assert encode_response(tok, "ab", "xyz", max_length=5, chat_template=False).fits


def test_chat_template_renders_the_conversation_and_adds_no_bos(tok):
    tok = build_char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    messages = json.dumps(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "2+2"},
        ]
    )
    text = render_prompt(tok, "2+2", messages, chat_template=True)
    assert text == "[user]hi[assistant]yo[user]2+2[assistant]"
    assert render_prompt(tok, "2+2", None, chat_template=True) == "[user]2+2[assistant]"
    assert render_prompt(tok, "2+2", messages, chat_template=False) == "2+2"
    enc = encode_response(tok, text, "4", max_length=128, chat_template=True)
    assert enc.input_ids[0] != tok.bos_token_id
    assert prompt_messages("q", None) == [{"role": "user", "content": "q"}]


def test_chat_template_asked_of_a_tokenizer_without_one_names_the_fix(tok):
    with pytest.raises(ConfigError, match="has no chat template; set chat_template: false"):
        render_prompt(tok, "2+2", None, chat_template=True)
