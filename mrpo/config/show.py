"""`mrpo show-config [section]`: every validated setting as `key = value`, each followed by an indented line
with its help, bounds and choices (from its knob), like `--help`."""

from __future__ import annotations

from mrpo.config.knobs import OBJECTIVE
from mrpo.config.rules import LIBRARY_CHOICES
from mrpo.config.schema import Config, config_to_flat_dict, field_at
from mrpo.errors import ConfigError


def key_help(key: str) -> str:
    """One line: the setting's help, then what it must be or may be ("" for a key the schema lacks)."""
    f = field_at(key)
    if f is None:
        return ""
    meta = f.metadata
    parts = [meta.get("help", "")]
    if meta.get("bounds"):
        parts.append(
            "must be " + ", ".join(meta["bounds"]) + (" or null" if f.type.endswith("| None") else "")
        )
    choices = meta.get("choices") or LIBRARY_CHOICES.get(key, ())
    if choices:
        parts.append("allowed: " + ", ".join(choices))
    if meta.get("checked_by") == OBJECTIVE:
        parts.append(f"checked by {OBJECTIVE}")
    return "; ".join(p for p in parts if p)


def config_section(flat: dict, section: str | None) -> dict:
    """The `section.*` entries of a flat config (all of them for None); ConfigError naming the sections."""
    if not section:
        return flat
    section = section.strip(".")
    picked = {k: v for k, v in flat.items() if k == section or k.startswith(section + ".")}
    if not picked:
        sections = sorted({k.split(".")[0] for k in flat})
        raise ConfigError(f"show-config {section!r}: no such section or key; sections: {', '.join(sections)}")
    return picked


def show_config(cfg: Config, section: str | None = None) -> str:
    lines = []
    for key, value in config_section(config_to_flat_dict(cfg), section).items():
        lines.append(f"{key} = {value!r}")
        doc = key_help(key)
        if doc:
            lines.append(f"    {doc}")
    return "\n".join(lines) + "\n"
