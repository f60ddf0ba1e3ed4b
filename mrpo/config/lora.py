"""LoRA's settings, one section shared by `train.lora` and `sft.lora`."""

from __future__ import annotations

from dataclasses import dataclass

from mrpo.config.knobs import knob


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = knob(False, "train LoRA adapters instead of every weight")
    r: int = knob(8, "LoRA rank", bounds=">= 1")
    alpha: int = knob(16, "LoRA scaling numerator (scale = alpha / r)", bounds="> 0")
    dropout: float = knob(0.0, "LoRA's own dropout", bounds="in [0, 1)")
    target_modules: tuple[str, ...] | None = knob(
        None, "module names to adapt; null lets peft pick per architecture", checked_by="rules"
    )
    merge: bool = knob(True, "merge the adapters into the saved policy")
