"""Where and in what precision a stage runs: bf16 on CUDA, fp32 on CPU unless params.yaml says otherwise."""

from __future__ import annotations

import logging
import os
import random
import sys

import numpy as np
import torch

from mrpo.errors import ConfigError

log = logging.getLogger("mrpo")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is visible; use device: auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(verbose: bool = False) -> None:
    if not sys.stderr.isatty():
        # Off a terminal (DVC, CI, Prefect) a progress bar is a line per update: keep the Hugging Face ones
        # (loading and writing weights at every checkpoint) out of the logs. Read when transformers is
        # imported.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
