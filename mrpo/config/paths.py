"""Where the stages write, checked before anything runs: no output path may be the project root or hold it,
overlap another output, or hold an input.

A stage replaces a directory it owns whole (the policy, the prepared data, the zoo, lm-eval's results), so a
path setting that names a directory holding other outputs or inputs would delete them. Every output of every
stage is compared with every other here, once the config is typed; the error names both keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mrpo.config.schema import Config
from mrpo.errors import ConfigError
from mrpo.pipeline import STAGES, config_value

# Directories a stage writes named files into (one per reference, per comparison, per curve) rather than
# replaces whole: they may hold other outputs (plots/ holds the diagnostics and the training curves).
SHARED_DIRS = frozenset({"score.output_dir", "score.metrics_dir", "train.plots_dir", "compare.output_dir"})
# The only outputs allowed to hold inputs: the zoo builds the reference models that are read from it (and the
# model sft starts from), sft the model a reference may name.
_BUILDS_INPUTS = {"zoo.output_dir": ("references.", "sft.model"), "sft.output_dir": ("references.",)}
# Commands that write outputs but are no DVC stage.
_EXTRA_OUTPUTS = (
    ("compare", "compare.output_dir"),
    ("compare", "compare.plots_file"),
    ("compare", "compare.image_file"),
)
_PROJECT_FILES = ("params.yaml", "dvc.yaml", "dvc.lock")
TASKS_DIR = "evaluation/tasks"  # the local lm-eval task configs, a dependency of evaluate (dvc.yaml)


@dataclass(frozen=True)
class Place:
    """One output or input: its params key, the value as written and where it resolves to."""

    key: str
    value: str
    path: Path
    stage: str = ""

    @property
    def shared(self) -> bool:
        return self.key in SHARED_DIRS


def _place(key: str, value: str, root: Path, stage: str = "") -> Place:
    return Place(key, value, (root / Path(value).expanduser()).resolve(), stage)


def stage_outputs(cfg: Config, root: Path) -> list[Place]:
    """Every output path a stage or `mrpo compare` declares, in pipeline order; a disabled sft stage writes no
    checkpoints, so its checkpoint_dir is none."""
    declared = [(s.name, key) for s in STAGES for key, _ in s.outputs] + list(_EXTRA_OUTPUTS)
    if not cfg.sft.enabled:
        declared = [(stage, key) for stage, key in declared if key != "sft.checkpoint_dir"]
    return [_place(key, config_value(cfg, key), root, stage) for stage, key in declared]


def _looks_local(model: str) -> bool:
    """A reference model named by path (a hub id "owner/name" is not one unless it exists here)."""
    return model.startswith((".", "/", "~")) or model.endswith(".gguf") or Path(model).exists()


def stage_inputs(cfg: Config, root: Path) -> list[Place]:
    """The files and directories the stages read that no stage writes: local reference models, data files,
    lm-eval task data and configs, a local MLflow store."""
    inputs = [
        _place(f"references.{r.name}.model", r.model, root)
        for r in cfg.references
        if _looks_local(r.model) or r.model.count("/") != 1
    ]
    if cfg.data.source in ("file", "gsm8k"):
        inputs += [_place("data.paths", p, root) for p in cfg.data.paths]
    if cfg.sft.enabled:
        inputs += [_place("sft.data.paths", p, root) for p in cfg.sft.data.paths]
        if cfg.sft.model is not None and _looks_local(cfg.sft.model):
            inputs.append(_place("sft.model", cfg.sft.model, root))
    inputs += [_place(f"evaluate.task_data.{k}", v, root) for k, v in cfg.evaluate.task_data.items()]
    inputs.append(_place("the local lm-eval tasks", TASKS_DIR, root))
    inputs += [_place(f"the project's {name}", name, root) for name in _PROJECT_FILES]
    uri = cfg.tracking.tracking_uri or ""
    if uri.startswith("sqlite:///"):
        inputs.append(_place("tracking.tracking_uri", uri.removeprefix("sqlite:///"), root))
    return inputs


def _within(path: Path, other: Path) -> bool:
    """`path` is `other` or lies inside it."""
    return path == other or other in path.parents


def _is_default(cfg: Config, key: str) -> bool:
    section, _, name = key.partition(".")
    fields = {f.name: f.default for f in dataclasses.fields(getattr(cfg, section))}
    return fields.get(name) == getattr(getattr(cfg, section), name)


def _fail(place: Place, reason: str) -> ConfigError:
    return ConfigError(f"{place.key}: got {place.value!r}; {reason}")


def _overlap(cfg: Config, a: Place, b: Place) -> ConfigError | None:
    """Why outputs `a` and `b` cannot both be written, or None; the message leads with the key that was
    changed from its default where only one was."""
    if a.shared and b.shared:
        return None
    if _is_default(cfg, a.key) and not _is_default(cfg, b.key):
        a, b = b, a
    owner = f"the {b.stage} stage's output" if b.stage != a.stage else f"also an output of {a.stage}"
    fix = f"choose a path apart from {b.key}"
    if a.path == b.path:
        return _fail(a, f"that is {b.key} ({b.value!r}), {owner}; {fix}")
    for outer, inner in ((a, b), (b, a)):
        if outer.shared or not _within(inner.path, outer.path):
            continue
        if outer is a:
            return _fail(
                a, f"it holds {b.key} ({b.value!r}), {owner}, which replacing it would delete; {fix}"
            )
        return _fail(a, f"it lies inside {b.key} ({b.value!r}), {owner}; {fix}")
    return None


def _holds_input(output: Place, place: Place) -> bool:
    if output.shared or not _within(place.path, output.path):
        return False
    return not place.key.startswith(_BUILDS_INPUTS.get(output.key, ("\0",)))


def validate_paths(cfg: Config, root: str | Path | None = None) -> None:
    """Raise ConfigError, naming both keys, for the first output path (in pipeline order) that is the project
    root or a parent of it, overlaps another output, or holds an input. `root` defaults to the working
    directory, where every stage runs."""
    root = Path(root if root is not None else Path.cwd()).resolve()
    outputs = stage_outputs(cfg, root)
    for out in outputs:
        if _within(root, out.path):
            raise _fail(
                out,
                f"that is the project root {str(root)!r}{' or a parent of it' if out.path != root else ''}; "
                "writing it would replace the project: choose a path inside it",
            )
    for i, a in enumerate(outputs):
        for b in outputs[i + 1 :]:
            error = _overlap(cfg, a, b)
            if error is not None:
                raise error
    inputs = stage_inputs(cfg, root)
    for out in outputs:
        for place in inputs:
            if _holds_input(out, place):
                what = "is" if out.path == place.path else "holds"
                raise _fail(
                    out,
                    f"it {what} {place.key} ({place.value!r}), an input the stages read, which writing it "
                    "would destroy; choose a path apart from it",
                )
