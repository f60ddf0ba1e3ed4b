"""How a (prompt, response) pair becomes token ids: one function, shared by scoring and training.

Scoring and training must tokenize identically, or the anchor's stored scores
would not equal the policy's own log-probs at step 0 and training would start
with a non-zero implicit reward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mrpo.errors import ConfigError


@dataclass(frozen=True)
class EncodedResponse:
    input_ids: list[int]  # prompt ids followed by response ids
    prompt_length: int  # number of leading prompt tokens (masked out of the log-prob)
    response_length: int
    prompt_truncated: bool  # prompt cut from the left to fit max_length
    fits: bool  # False when the response alone cannot fit: such pairs are flagged, never cut


def prompt_messages(prompt: str, messages_json: str | None) -> list[dict[str, str]]:
    """The conversation before the response, as role/content messages."""
    if messages_json:
        return json.loads(messages_json)
    return [{"role": "user", "content": prompt}]


def render_prompt(tokenizer, prompt: str, messages_json: str | None, chat_template: bool) -> str:
    """The prompt text a reference sees: its own chat template when asked for, raw text otherwise."""
    if not chat_template:
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            "chat_template is true but tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '?')!r} has no chat template;"
            " set chat_template: false for this reference"
        )
    return tokenizer.apply_chat_template(
        prompt_messages(prompt, messages_json), tokenize=False, add_generation_prompt=True
    )


def encode_response(
    tokenizer, prompt_text: str, response: str, max_length: int, *, chat_template: bool
) -> EncodedResponse:
    """Tokenize prompt and response separately, then join (as TRL does), so the boundary is exact.

    Raw prompts get the tokenizer's BOS (a chat template already adds its own
    start tokens); the response ends with EOS so the model learns to stop.
    Prompts are cut from the left so the response always keeps its context.
    """
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if not chat_template and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    # At least one prompt token must remain: the first response token is predicted from it.
    fits = len(response_ids) + 1 <= max_length
    truncated = False
    if fits and len(prompt_ids) + len(response_ids) > max_length:
        prompt_ids = prompt_ids[len(prompt_ids) + len(response_ids) - max_length :]
        truncated = True
    return EncodedResponse(
        input_ids=prompt_ids + response_ids,
        prompt_length=len(prompt_ids),
        response_length=len(response_ids),
        prompt_truncated=truncated,
        fits=fits,
    )
