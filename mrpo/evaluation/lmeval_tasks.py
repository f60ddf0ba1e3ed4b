"""Which lm-eval tasks the evaluate stage runs, checked before anything runs, and their local data.

Tasks are names: lm-eval's own (gsm8k, truthfulqa_mc2, ...: they need the hub) or the declarative YAML tasks
in `evaluation/tasks/`, which run offline:

* `mrpo_facts_gen`, `mrpo_facts_mc`: the held-out synthetic fact pairs, written as JSONL from
  `<data.output_dir>/test.parquet` at run time (items from mrpo.data.synthetic);
* `gsm8k_local`: GSM8K from the local file `evaluate.task_data.gsm8k_local`.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrpo.config.schema import Config, ConfigError
from mrpo.data.prepared import read_split, split_path
from mrpo.data.synthetic import facts_gen_rows, facts_mc_rows
from mrpo.io import write_text_atomically

log = logging.getLogger("mrpo")

TASKS_DIR = Path(__file__).resolve().parents[2] / "evaluation" / "tasks"
HELD_OUT_TASKS = ("mrpo_facts_gen", "mrpo_facts_mc")  # data written from the prepared test split


@dataclass(frozen=True)
class PlannedTask:
    """One task as lm-eval gets it: a registered name, or a local YAML config with absolute data paths."""

    name: str
    spec: str | dict  # what simple_evaluate's `tasks` receives
    data_files: Mapping[str, str] = field(default_factory=dict)  # split -> absolute path (local tasks)

    @property
    def local(self) -> bool:
        return isinstance(self.spec, dict)


def local_task_names(tasks_dir: Path = TASKS_DIR) -> list[str]:
    return sorted(p.stem for p in tasks_dir.glob("*.yaml"))


def load_task_yaml(name: str, tasks_dir: Path = TASKS_DIR) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(tasks_dir / f"{name}.yaml", resolve_func=True)
    if config.get("task") != name:
        raise ConfigError(
            f"{tasks_dir / (name + '.yaml')}: `task:` is {config.get('task')!r}; "
            f"it must equal the file name {name!r}"
        )
    return dict(config)


@functools.lru_cache(maxsize=1)
def _registered_lm_eval_tasks() -> frozenset[str]:
    """Every task, group and tag lm-eval knows (indexing its ~15k YAML files takes a few seconds, once)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


@functools.lru_cache(maxsize=64)
def _mentioned_in_lm_eval_tasks(name: str) -> bool:
    """Whether `name` appears in the text of any of lm-eval's task YAMLs (about 1 s).

    Every task, group and tag name is written literally in some YAML, so a name
    found nowhere is unknown without the ~25 s full index; a name found is then
    confirmed against the index.
    """
    import lm_eval

    needle = name.encode()
    root = Path(lm_eval.__file__).parent / "tasks"
    return any(needle in path.read_bytes() for path in root.rglob("*.yaml"))


def local_data_files(name: str, data_file: Path) -> dict[str, str]:
    """Split -> absolute path for a local task reading `data_file` as its test split.

    GSM8K-style few-shot examples come from a sibling file with "test" replaced by
    "train" when it exists; otherwise from the test file itself (lm-eval leaves the
    current question out of its own few-shot examples).
    """
    files = {"test": str(data_file.resolve())}
    sibling = data_file.with_name(data_file.name.replace("test", "train"))
    files["train"] = str(sibling.resolve()) if sibling != data_file and sibling.is_file() else files["test"]
    return files


def plan_tasks(cfg: Config, held_out_dir: str | Path, tasks_dir: Path = TASKS_DIR) -> list[PlannedTask]:
    """Resolve `evaluate.tasks` into lm-eval task specs;
    unknown names and missing data files fail here, by name.

    `held_out_dir` is where the mrpo_facts_* JSONL files go (written by `write_held_out_data`).
    """
    e = cfg.evaluate
    held_out_dir = Path(held_out_dir)
    if not e.tasks:
        return []
    local = set(local_task_names(tasks_dir))
    for name in e.task_data:
        if name not in local:
            raise ConfigError(
                f"evaluate.task_data.{name}: only the local tasks in {tasks_dir} read a data file "
                f"({', '.join(sorted(local))}); remove it or add {name}.yaml there"
            )
    planned = []
    for name in e.tasks:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"evaluate.tasks: expected task names, got {name!r}")
        if name in e.task_data:
            data_file = Path(e.task_data[name])
            if not data_file.is_file():
                raise ConfigError(
                    f"evaluate.task_data.{name}: data file {str(data_file)!r} not found "
                    f"(relative paths start at {Path.cwd()}); fix the path or drop {name} from evaluate.tasks"
                )
            files = local_data_files(name, data_file)
        elif name in HELD_OUT_TASKS:
            test = split_path(cfg.data.output_dir, "test")
            if not test.is_file():
                raise ConfigError(
                    f"evaluate.tasks: {name} is built from {test}, which does not exist; "
                    "run `mrpo prepare` first"
                )
            path = (held_out_dir / f"{name}.jsonl").resolve()
            files = {"test": str(path)}
        elif name in local:
            raise ConfigError(
                f"evaluate.tasks: {name} reads a local data file; set evaluate.task_data.{name} "
                f"(for example ../shared/data/gsm8k-test.jsonl)"
            )
        else:
            if not _mentioned_in_lm_eval_tasks(name) or name not in _registered_lm_eval_tasks():
                raise ConfigError(
                    f"evaluate.tasks: unknown task {name!r}; local tasks: {', '.join(sorted(local))}; "
                    f"or any lm-eval task name (see `lm-eval ls tasks`)"
                )
            planned.append(PlannedTask(name, name))
            continue
        config = load_task_yaml(name, tasks_dir)
        config["dataset_kwargs"] = {
            **config.get("dataset_kwargs", {}),
            "data_files": {s: files[s] for s in _splits_of(config)},
        }
        planned.append(PlannedTask(name, config, config["dataset_kwargs"]["data_files"]))
    return planned


def _splits_of(config: Mapping[str, Any]) -> list[str]:
    return sorted(
        {
            config[k]
            for k in ("test_split", "training_split", "fewshot_split", "validation_split")
            if config.get(k)
        }
    )


def write_jsonl(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def write_held_out_data(cfg: Config, planned: Sequence[PlannedTask]) -> None:
    """Write the held-out JSONL files the planned mrpo_facts_* tasks read, from the prepared test split."""

    wanted = [t for t in planned if t.name in HELD_OUT_TASKS and t.name not in cfg.evaluate.task_data]
    if not wanted:
        return
    pairs = read_split(cfg.data.output_dir, "test")
    builders = {"mrpo_facts_gen": facts_gen_rows, "mrpo_facts_mc": facts_mc_rows}
    for task in wanted:
        rows = builders[task.name](pairs)
        write_jsonl(rows, Path(task.data_files["test"]))
        log.info("evaluate: %s: %d held-out items -> %s", task.name, len(rows), task.data_files["test"])
