"""The policy: the anchor loaded as a trainable model (full or LoRA), gathered after sharded training, and
saved (merged or as an adapter) only when every weight is finite.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from mrpo.config.schema import Config
from mrpo.errors import TrainingError

log = logging.getLogger("mrpo")


def check_finite_weights(model, out_dir: str | Path) -> None:
    """Refuse to save a policy with a NaN or infinite weight: it would replace a good one."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param.detach()).all():
            raise TrainingError(
                f"the trained weights hold NaN or inf (first in {name}); not saving them, so "
                f"{out_dir} keeps the previous policy. Lower train.learning_rate and re-run"
            )


def load_policy(cfg: Config, device: torch.device):
    """The anchor as a trainable causal LM: full fine-tuning, or a LoRA adapter on it (peft)."""
    t = cfg.train
    return load_trainable(
        cfg.anchor, t.lora, dropout_off=t.disable_dropout, checkpointing=t.gradient_checkpointing
    )


def load_trainable(ref, lora, *, dropout_off: bool, checkpointing: bool = False, stage: str = "train"):
    """`ref`'s model as a trainable causal LM in fp32 on the CPU (Trainer moves it): every weight, or a LoRA
    adapter on it when `lora.enabled`."""
    from mrpo.modeling.models import disable_dropout, load_model

    # fp32 master weights; on CUDA the Trainer runs the forward in bf16 autocast.
    model = load_model(ref, device="cpu", dtype=torch.float32)
    if dropout_off:
        # Before LoRA wraps it: an adapter's own dropout (lora.dropout) is the user's explicit choice.
        n = disable_dropout(model)
        if n:
            log.info("%s: disabled %d dropout layer(s) of the model", stage, n)
    model.train()
    if lora.enabled:
        from peft import LoraConfig, get_peft_model

        peft_cfg = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules) if lora.target_modules else None,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_cfg)
        if checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        trainable, total = model.get_nb_trainable_parameters()
        log.info(
            "%s: LoRA r=%d on %s: %d of %d parameters trainable",
            stage,
            lora.r,
            sorted(model.peft_config["default"].target_modules),
            trainable,
            total,
        )
    return model


def policy_from_state_dict(cfg: Config, state_dict: dict[str, torch.Tensor]):
    """A fresh, plain copy of the policy (LoRA-wrapped when configured) holding `state_dict`: how a policy
    whose parameters were sharded (FSDP) becomes one model again, to merge and save."""
    model = load_policy(cfg, torch.device("cpu"))
    model.load_state_dict(state_dict, strict=True)
    return model


def trained_policy(cfg: Config, trainer):
    """The trained policy as one plain model on the main process (None on the others when sharded).

    Under FSDP or DeepSpeed ZeRO-3 every rank holds a shard of each parameter, so this is a collective that
    every rank calls: accelerate gathers the full state dict on rank 0, which loads it into a fresh copy.
    Otherwise (one process, DDP) the model is whole on every rank already.
    """
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    if not sharded:
        return trainer.model
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    return policy_from_state_dict(cfg, state_dict) if is_main_process() else None


def save_policy(model, tokenizer, out_dir: Path, *, merge_lora: bool, key: str = "train.output_dir") -> None:
    """safetensors + tokenizer; a LoRA policy is merged into plain weights when `merge_lora`,
    else saved as an adapter."""
    from peft import PeftModel

    from mrpo.training.diskspace import disk_full_guard, tensor_bytes

    if isinstance(model, PeftModel) and merge_lora:
        model = model.merge_and_unload()
    with disk_full_guard(Path(out_dir).parent, tensor_bytes(model), key=key):
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
