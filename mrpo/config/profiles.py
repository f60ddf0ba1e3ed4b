"""`mrpo profile apply`: write params.yaml = params.yaml with a profile overlay merged in.

DVC reads params.yaml literally, so a profile (profiles/*.yaml, only what differs from params.yaml) is applied
to it rather than read beside it. The merge is mrpo.config.load.merge_overlay's, done on a round-trip YAML
document, so params.yaml keeps its comments; the file is replaced atomically, and only once what it would hold
is validated and reads back as the merge. dvc.yaml beside it gets the profile's input files as deps (data
files, local models outside the zoo: mrpo.config.inputs): DVC cannot derive them from params.yaml itself.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

from mrpo.config.load import (
    OVERLAY_KEY,
    PROFILE_KEY,
    merge_overlay,
    parse_config,
    parse_yaml_value,
    read_yaml_mapping,
)
from mrpo.errors import ConfigError
from mrpo.io import write_text_atomically


def apply_profile(overlay: str | Path, params: str | Path = "params.yaml") -> str:
    """Merge `overlay` into `params` in place; returns the profile's name (the overlay's file stem)."""
    overlay, params = Path(overlay), Path(params)
    raw = read_yaml_mapping(overlay)
    if OVERLAY_KEY not in raw:
        raise ConfigError(
            f"{overlay}: not a profile overlay (no `{OVERLAY_KEY}:` line naming the params file it changes)"
        )
    base = read_yaml_mapping(params)
    if PROFILE_KEY in base:
        raise ConfigError(
            f"{params}: already holds profile {base[PROFILE_KEY]!r}; restore the default first "
            f"(git checkout {params} dvc.yaml), then apply {overlay}"
        )
    name = overlay.stem
    changes = {k: v for k, v in raw.items() if k != OVERLAY_KEY}
    merged = {PROFILE_KEY: name, **merge_overlay(copy.deepcopy(base), changes)}
    cfg = parse_config(merged)
    text = _merged_text(params, overlay, name)
    if parse_yaml_value(text) != merged:  # the round trip must write exactly the merge it was checked as
        raise ConfigError(
            f"{params}: merging {overlay} kept its comments but changed a value; merge it by hand"
        )
    write_text_atomically(params, text)
    dvc_yaml = params.parent / "dvc.yaml"
    if dvc_yaml.is_file():
        from mrpo.config.inputs import sync_dvc_yaml

        sync_dvc_yaml(dvc_yaml, cfg)
    return name


def _merged_text(params: Path, overlay: Path, name: str) -> str:
    """params.yaml's text with the overlay merged in, comments and layout of both kept."""
    from ruamel.yaml import YAML  # DVC's own YAML library (a dependency of dvc): round-trips comments

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.representer.add_representer(  # null as params.yaml writes it, not an empty value
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    doc = yaml.load(params.read_text())
    changes = yaml.load(overlay.read_text())
    del changes[OVERLAY_KEY]
    merge_overlay(doc, changes)
    doc.insert(0, PROFILE_KEY, name)
    doc.yaml_set_comment_before_after_key(
        PROFILE_KEY,
        before=f"Written by `mrpo profile apply {overlay}`: params.yaml with that overlay merged in.\n"
        "`git checkout params.yaml dvc.yaml` restores the default.",
    )
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue()
