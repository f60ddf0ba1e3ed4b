"""lm-eval-harness for the evaluate stage: which tasks (checked before anything runs), the HF-backend run, the
anchor's result cache, and lm-eval's nested results as flat metric names.

Tasks are names: lm-eval's own (gsm8k, truthfulqa_mc2, ...: they need the hub) or the declarative YAML tasks
in `evaluation/tasks/`, which run offline:

* `mrpo_facts_gen`, `mrpo_facts_mc`: the held-out synthetic fact pairs, written as JSONL from
  `<data.output_dir>/test.parquet` at run time (items from mrpo.data.synthetic);
* `gsm8k_local`: GSM8K from the local file `evaluate.task_data.gsm8k_local`.

The anchor does not change between runs, so its results are cached under `evaluate.cache_dir`, keyed by its
weights, the task configs and data, and every setting that changes a score.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrpo.config.schema import Config, ConfigError, ReferenceConfig
from mrpo.data.prepared import read_split, split_path
from mrpo.data.synthetic import facts_gen_rows, facts_mc_rows
from mrpo.io import file_sha256, write_text_atomically
from mrpo.runtime import resolve_device, resolve_dtype
from mrpo.tracking.names import metric_name  # noqa: F401  (also the name evaluate imports from here)

log = logging.getLogger("mrpo")

TASKS_DIR = Path(__file__).resolve().parents[2] / "evaluation" / "tasks"
HELD_OUT_TASKS = ("mrpo_facts_gen", "mrpo_facts_mc")  # data written from the prepared test split
BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics; mean metrics use the closed form
_RESULT_INFO_KEYS = {"alias", "name", "sample_len", " ", "samples"}


# ---------------------------------------------------------------- which tasks, checked before anything runs


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


# ---------------------------------------------------------------- running lm-eval


@dataclass(frozen=True)
class EvalSettings:
    """Every knob that changes an lm-eval score (and therefore the anchor's cache key)."""

    limit: int | None
    num_fewshot: int
    batch_size: int
    device: str
    dtype: str
    max_gen_tokens: int

    @classmethod
    def from_config(cls, cfg: Config) -> EvalSettings:
        device = resolve_device(cfg.evaluate.device)
        dtype = str(resolve_dtype("auto", device)).removeprefix("torch.")
        e = cfg.evaluate
        return cls(e.limit, e.num_fewshot, e.batch_size, device.type, dtype, e.max_gen_tokens)


def lm_eval_model_args(ref: ReferenceConfig, dtype: str) -> dict[str, Any]:
    """HF-backend arguments for a reference: a local directory, a hub id (pinned revision) or a GGUF file.

    Raw prompts get the tokenizer's BOS, as `mrpo.data.tokenization.encode_response`
    gives it in scoring and training, so lm-eval sees prompts the way the models
    were trained; with a chat template, the template supplies its own start tokens.
    """
    from mrpo.modeling.models import gguf_location

    args: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False}
    gguf = gguf_location(ref)
    if gguf:
        where, name = gguf
        args.update(pretrained=str(Path(where).resolve()) if Path(where).exists() else where, gguf_file=name)
    else:
        local = Path(ref.model)
        args["pretrained"] = str(local.resolve()) if local.exists() else ref.model
    if ref.revision and not Path(args["pretrained"]).exists():
        args["revision"] = ref.revision
    if ref.tokenizer:
        args["tokenizer"] = (
            str(Path(ref.tokenizer).resolve()) if Path(ref.tokenizer).exists() else ref.tokenizer
        )
    if not ref.chat_template:
        args["add_bos_token"] = True
    return args


def check_model_exists(ref: ReferenceConfig, role: str, hint: str) -> None:
    from mrpo.modeling.models import gguf_location, require_safetensors

    if gguf_location(ref):  # raises, naming the file or the wheel, when the GGUF is missing
        return
    path = Path(ref.model)
    looks_local = (
        ref.model.endswith(".gguf")
        or ref.model.startswith((".", "/"))
        or path.exists()
        or ref.model.count("/") > 1
    )
    if looks_local and not path.exists():
        raise FileNotFoundError(f"evaluate: the {role} {ref.model!r} does not exist; {hint}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"evaluate: the {role} directory {ref.model!r} has no config.json; {hint}")
    # lm-eval would load a pickled pytorch_model.bin; scoring and training never do, so neither does evaluate
    require_safetensors(ref, path)


def run_lm_eval(
    model_args: Mapping[str, Any],
    tasks: Sequence[PlannedTask],
    settings: EvalSettings,
    apply_chat_template: bool = False,
    log_samples: bool = False,
    threads: int | None = None,
) -> dict:
    """One `lm_eval.simple_evaluate` call with the HF backend (`HFLM` built from `model_args`);
    returns lm-eval's results dict (per-item "samples" only with `log_samples`).

    `threads`: CPU intra-op threads for the run; None picks 1 for a tiny model on CPU
    (as scoring and training do) and torch's default otherwise.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mrpo.modeling.models import cpu_threads_for, torch_threads

    # Local tasks arrive as full configs,
    # so the ~15k built-in YAMLs are indexed only when a named task needs them.
    needs_registry = any(not t.local for t in tasks)
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_registry)
    # Built here rather than by name so the thread count can follow the model's size.
    try:
        lm = HFLM(**model_args, batch_size=settings.batch_size, device=settings.device)
    except OSError as exc:  # transformers: no network / offline mode / unknown id or revision / damaged files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = model_args["pretrained"]
        raise ConfigError(
            f"evaluate: lm-eval cannot load {where!r} ({first}); "
            + (
                "fix or rebuild that directory"
                if Path(where).exists()
                else "it is not in the local Hugging Face cache and could not be downloaded "
                "(offline or no network?): download it once while online or use a local directory"
            )
        ) from exc
    if threads is None:
        threads = cpu_threads_for(lm.model, settings.device)
    with torch_threads(threads):
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[t.spec for t in tasks],
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            gen_kwargs={"max_gen_toks": settings.max_gen_tokens},
            task_manager=task_manager,
            log_samples=log_samples,
            bootstrap_iters=BOOTSTRAP_ITERS,
            apply_chat_template=apply_chat_template,
        )
    del lm
    if results is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm_eval.simple_evaluate returned no results (not the main process?)")
    return json.loads(json.dumps(results, default=_lm_eval_jsonable))


def _lm_eval_jsonable(value: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(value)


def anchor_cache_key(
    ref: ReferenceConfig, tasks: Sequence[PlannedTask], settings: EvalSettings, apply_chat_template: bool
) -> str:
    """sha256 over the anchor's weights, each task's config and data content,
    the settings and lm-eval's version."""
    import lm_eval

    from mrpo.modeling.models import model_fingerprint

    task_keys = []
    for t in tasks:
        if t.local:
            config = dict(t.spec)
            config["dataset_kwargs"] = {
                **config["dataset_kwargs"],
                "data_files": {s: file_sha256(p) for s, p in t.data_files.items()},
            }
            task_keys.append(config)
        else:
            task_keys.append(t.name)
    payload = {
        "model": model_fingerprint(ref),
        "model_args": {
            k: v
            for k, v in lm_eval_model_args(ref, settings.dtype).items()
            if k not in ("pretrained", "tokenizer")
        },
        "tasks": task_keys,
        "settings": settings.__dict__,
        "apply_chat_template": apply_chat_template,
        "lm_eval": getattr(lm_eval, "__version__", "?"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cached_lm_eval(
    ref: ReferenceConfig,
    tasks: Sequence[PlannedTask],
    settings: EvalSettings,
    cache_dir: Path,
    apply_chat_template: bool,
) -> tuple[dict, bool]:
    """(results, came_from_cache): the anchor's lm-eval results, computed once per cache key."""
    path = cache_dir / f"anchor-{anchor_cache_key(ref, tasks, settings, apply_chat_template)[:24]}.json"
    if path.is_file():
        log.info("evaluate: anchor results from cache %s", path)
        return json.loads(path.read_text()), True
    results = run_lm_eval(lm_eval_model_args(ref, settings.dtype), tasks, settings, apply_chat_template)
    write_text_atomically(path, json.dumps(results, indent=1))
    return results, False


# ---------------------------------------------------------------- flat metrics


def flatten_results(results: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """lm-eval's {"results": {task: {"metric,filter": value}}}
    -> {"<prefix>/<task>/<metric>[/<filter>]": value}.

    The filter is kept unless it is lm-eval's "none"; stderr entries are left out
    (they are in the full results file).
    """
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key in _RESULT_INFO_KEYS or "_stderr" in key:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name in ("", "none") else f"{metric}/{filter_name}"
            flat[metric_name(f"{prefix}/{task}/{name}")] = float(value)
    return flat


def deltas(policy: Mapping[str, float], anchor: Mapping[str, float]) -> dict[str, float]:
    """delta/<task>/<metric> = policy - anchor for every metric both have."""
    out = {}
    for key, value in policy.items():
        rest = key.split("/", 1)[1]
        if f"anchor/{rest}" in anchor:
            out[f"delta/{rest}"] = value - anchor[f"anchor/{rest}"]
    return out
