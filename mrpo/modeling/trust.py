"""What a reference may not make mrpo do: run pickled code (weights load from safetensors or GGUF only,
checked by content, not by name), read weights from outside its own directory through a symlink, or run the
model's own Python code (`auto_map`: mrpo never passes trust_remote_code, and has no setting that would)."""

from __future__ import annotations

import json
from pathlib import Path

from mrpo.errors import ConfigError

PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(ref, directory: str | Path) -> None:
    """References load safetensors only (no pickled code runs):
    refuse a local model directory without them."""
    directory = Path(directory)
    if not directory.is_dir() or any(directory.glob("*.safetensors")) or any(directory.glob("*.gguf")):
        return
    found = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLED_SUFFIXES)
    raise ConfigError(
        f"reference {ref.name!r}: {str(directory)!r} has no safetensors weights"
        f"{f' (only {found})' if found else ''}; "
        "models are loaded from safetensors only, so no pickled code runs: "
        "re-save it with save_pretrained(..., safe_serialization=True)"
    )


def _content_kind(path: Path) -> str:
    """'safetensors', 'gguf', or what the file looks like instead (a pickle, a zip from torch.save, ...)."""
    with path.open("rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:1] == b"\x80":
        return "a pickle"
    if head[:2] == b"PK":
        return "a zip archive (torch.save's pickle format)"
    return "neither safetensors nor GGUF"


def check_weight_file(ref, directory: Path, path: Path) -> None:
    """`path` (in the model's `directory`) must hold the format its name says, and a symlink may not leave
    `directory`: what is loaded is then what the reference's content hash pins."""
    key = f"references.{ref.name}.model"
    if path.is_symlink():
        target, inside = path.resolve(), directory.resolve()
        # A Hugging Face cache snapshot links each file to the repository's blobs/, which it owns too.
        blobs = inside.parent.parent / "blobs" if inside.parent.name == "snapshots" else inside
        if not (target.is_relative_to(inside) or target.is_relative_to(blobs)):
            raise ConfigError(
                f"reference {ref.name!r}: {path} is a symlink to {target}, outside the model directory; "
                f"copy the file in (cp -L) or point {key} at the directory that holds it"
            )
    if not path.is_file():
        return
    expected = "gguf" if path.suffix == ".gguf" else "safetensors"
    found = _content_kind(path)
    if found != expected:
        raise ConfigError(
            f"reference {ref.name!r}: {path} is named {expected} but holds {found}; weights are loaded from "
            f"safetensors or GGUF only, so no pickled code runs: re-save the model with "
            f"save_pretrained(..., safe_serialization=True) or fix {key}"
        )


def check_local_model(ref, directory: str | Path, gguf_file: str | None = None) -> None:
    """A local model directory's weight files (all of them, or its one GGUF), and no remote code needed."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    files = [directory / gguf_file] if gguf_file else sorted(directory.glob("*.safetensors"))
    for path in files or sorted(directory.glob("*.gguf")):
        check_weight_file(ref, directory, path)
    config = directory / "config.json"
    try:
        settings = json.loads(config.read_text())
    except (OSError, ValueError):  # none, or damaged: transformers says what is wrong when it loads it
        return
    if isinstance(settings, dict) and settings.get("auto_map"):
        refuse_remote_code(ref, str(directory), settings)


def refuse_remote_code(ref, source: str, settings: dict | None = None) -> None:
    """Raise unless transformers includes the model's architecture (then `auto_map` is ignored)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = (settings or {}).get("model_type")
    if settings is not None and model_type in CONFIG_MAPPING:
        return
    raise ConfigError(
        f"reference {ref.name!r}: {source!r} needs its own Python code to load (config.json auto_map"
        f"{f', model_type {model_type!r}' if model_type else ''}); mrpo never runs a model's remote code and "
        "has no setting that allows it: use a model whose architecture transformers includes, or set "
        f"references.{ref.name}.model to one"
    )
