"""Supervised fine-tuning with transformers' Trainer: (prompt, response) rows tokenized exactly as scoring
tokenizes a reference's pair (mrpo.data.tokenization, the chat template when asked and the tokenizer has one,
EOS after the response), the loss on the response tokens only (the prompt's labels are -100), checkpoints
sealed and resumed as the train stage's (mrpo.training.checkpoints).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mrpo.config.schema import Config, ReferenceConfig
from mrpo.data.sft import SftRow
from mrpo.data.tokenization import encode_response, render_prompt
from mrpo.errors import ConfigError, DataError, MRPOError
from mrpo.training.checkpoints import seal_checkpoint
from mrpo.training.progress import CompactProgress, LogAtCheckpoints
from mrpo.training.steps import optimizer_steps, trainer_arguments

log = logging.getLogger("mrpo")

IGNORE_INDEX = -100  # the label of a position that carries no loss (transformers' and PyTorch's convention)
SFT_REFERENCE = "sft"  # the name sft.model goes by in messages of the model loaders


def sft_reference(cfg: Config) -> ReferenceConfig:
    """`sft.model` as a reference the model loaders take (safetensors or GGUF, no remote code)."""
    return ReferenceConfig(name=SFT_REFERENCE, model=cfg.sft.model, chat_template=cfg.sft.chat_template)


@contextlib.contextmanager
def naming_sft_model() -> Iterator[None]:
    """The model loaders' errors name a reference's keys (`references.<name>.model`); sft.model is no
    reference, so within this block they name `sft.model` instead."""
    try:
        yield
    except (MRPOError, FileNotFoundError) as exc:
        text = re.sub(rf"references\.{SFT_REFERENCE}\.\w+", "sft.model", str(exc))
        text = text.replace(f"reference {SFT_REFERENCE!r}", "sft.model")
        raise (type(exc) if isinstance(exc, MRPOError) else ConfigError)(text) from None


def uses_chat_template(cfg: Config, tokenizer) -> bool:
    """`sft.chat_template`, when the tokenizer has a template to apply (else raw prompts, with a warning)."""
    if not cfg.sft.chat_template:
        return False
    if getattr(tokenizer, "chat_template", None) is None:
        log.warning(
            "sft: the tokenizer of %s has no chat template; prompts are used as raw text", cfg.sft.model
        )
        return False
    return True


@dataclass
class SftExamples:
    """The tokenized rows Trainer trains on, and how many rows did not fit sft.max_length."""

    items: list[dict[str, list[int]]]
    skipped: int
    chat_template: bool  # whether the prompts went through the tokenizer's chat template

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


def encode_example(
    tokenizer, row: SftRow, max_length: int, chat_template: bool
) -> dict[str, list[int]] | None:
    """input_ids (prompt then response and EOS, as scoring joins them) and labels (-100 on the prompt); None
    when the response alone does not fit `max_length`."""
    prompt_text = render_prompt(tokenizer, row.prompt, row.prompt_messages, chat_template)
    enc = encode_response(tokenizer, prompt_text, row.response, max_length, chat_template=chat_template)
    if not enc.fits:
        return None
    labels = [IGNORE_INDEX] * enc.prompt_length + enc.input_ids[enc.prompt_length :]
    return {"input_ids": enc.input_ids, "labels": labels}


def encode_rows(cfg: Config, rows: Sequence[SftRow], tokenizer, chat_template: bool) -> SftExamples:
    """Every row tokenized; DataError naming sft.max_length when none fits."""
    encoded = [encode_example(tokenizer, row, cfg.sft.max_length, chat_template) for row in rows]
    items = [e for e in encoded if e is not None]
    if not items:
        raise DataError(
            f"sft.max_length: no response of the {len(rows)} rows fits {cfg.sft.max_length} tokens "
            f"(first: {rows[0].where}); raise sft.max_length"
        )
    if len(items) < len(rows):
        log.warning(
            "sft: %d of %d rows skipped: their response is longer than sft.max_length",
            len(rows) - len(items),
            len(rows),
        )
    return SftExamples(items, len(rows) - len(items), chat_template)


def examples_digest(examples: SftExamples) -> str:
    """sha256 of the token ids and labels trained on: the data part of the fingerprint."""
    digest = hashlib.sha256()
    for item in examples.items:
        digest.update(json.dumps([item["input_ids"], item["labels"]]).encode())
    return digest.hexdigest()


class SftCollator:
    """Right-pads a batch: pad id for inputs, -100 for labels, attention mask 0 on padding."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
        for item in items:
            pad = width - len(item["input_ids"])
            batch["input_ids"].append(item["input_ids"] + [self.pad_token_id] * pad)
            batch["labels"].append(item["labels"] + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * len(item["input_ids"]) + [0] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


# Settings that never change the weights, left out of the fingerprint: a run resumes across them.
_NOT_TRAJECTORY = (
    "enabled",
    "output_dir",
    "checkpoint_dir",
    "metrics_file",
    "plots_file",
    "logging_steps",
    "save_steps",
)


def sft_fingerprint(cfg: Config, model: dict[str, str], data_digest: str) -> str:
    """What decides the SFT trajectory: the settings, the seed, the starting model's identity, the tokens."""
    settings = {k: v for k, v in asdict(cfg.sft).items() if k not in _NOT_TRAJECTORY}
    payload = {"seed": cfg.seed, "sft": settings, "model": model, "data": data_digest}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 autocast on a CUDA device that has it; fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


class SealCheckpoints(TrainerCallback):
    """Seals each checkpoint once Trainer has written it (mrpo.training.checkpoints), so a resume trusts only
    complete ones."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            seal_checkpoint(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        return control


def build_sft_trainer(
    cfg: Config,
    model,
    tokenizer,
    examples: SftExamples,
    device: torch.device,
    callbacks: Sequence[TrainerCallback] = (),
) -> Trainer:
    """A Trainer over the examples, with compact progress, sealed checkpoints and a log at each checkpoint."""
    total = optimizer_steps(cfg.sft, len(examples))
    trainer = Trainer(
        model=model,
        args=trainer_arguments(cfg.sft, cfg.seed, device, total, precision=_autocast_dtype(device)),
        data_collator=SftCollator(tokenizer.pad_token_id),
        train_dataset=examples,
        processing_class=tokenizer,
        callbacks=[LogAtCheckpoints(), SealCheckpoints(), *callbacks],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(CompactProgress(stage="sft"))
    return trainer


def loss_curve(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged step: step, loss, learning rate (Trainer's log history), for sft.plots_file."""
    return [
        {
            "step": int(e["step"]),
            "loss": float(e["loss"]),
            "learning_rate": float(e.get("learning_rate", 0.0)),
        }
        for e in log_history
        if "loss" in e and "step" in e
    ]
