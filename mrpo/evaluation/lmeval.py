"""lm-eval-harness for the evaluate stage: the HF-backend run, the anchor's result cache, and lm-eval's
nested results as flat metric names. Which tasks run, and their data: mrpo.evaluation.lmeval_tasks.

The anchor does not change between runs, so its results are cached under `evaluate.cache_dir`, keyed by its
weights, the task configs and data, and every setting that changes a score.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrpo.config.schema import Config, ConfigError, ReferenceConfig
from mrpo.evaluation.lmeval_tasks import TASKS_DIR, PlannedTask
from mrpo.io import file_sha256, write_text_atomically
from mrpo.runtime import library_bars_off, resolve_device, resolve_dtype
from mrpo.tracking.names import metric_name

log = logging.getLogger("mrpo")

BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics; mean metrics use the closed form
_RESULT_INFO_KEYS = {"alias", "name", "sample_len", " ", "samples"}


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
    import lm_eval.api.metrics
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mrpo.modeling.models import cpu_threads_for, torch_threads

    # Local tasks arrive as full configs,
    # so the ~15k built-in YAMLs are indexed only when a named task needs them.
    needs_registry = any(not t.local for t in tasks)
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_registry)
    # Built here rather than by name so the thread count can follow the model's size.
    lm = _load_hflm(HFLM, model_args, settings)
    if threads is None:
        threads = cpu_threads_for(lm.model, settings.device)
    bars = (lm_eval.api.task, lm_eval.api.model, lm_eval.api.metrics, lm_eval.models.huggingface)
    log.info("lm-eval: %s on %s", ", ".join(t.name for t in tasks), model_args["pretrained"])
    with torch_threads(threads), library_bars_off(*bars):
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
    results = json.loads(json.dumps(results, default=_lm_eval_jsonable))
    for line in task_lines(results):
        log.info("lm-eval: %s", line)
    return results


def _load_hflm(hflm, model_args: Mapping[str, Any], settings: EvalSettings):
    """lm-eval's HF model, or one line naming what cannot be loaded and how to fix it."""
    try:
        return hflm(**model_args, batch_size=settings.batch_size, device=settings.device)
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


# What lm-eval adds that differs run to run or machine to machine. Dropped from the results evaluate writes:
# they are a DVC output, the same bytes for the same policy or dvc.lock changes on every run.
_VOLATILE_KEYS = frozenset(
    {"date", "start_time", "end_time", "total_evaluation_time_seconds", "git_hash", "upper_git_hash"}
    | {"pretty_env_info"}
)


def reproducible(results: Mapping[str, Any], project_dir: str | Path = ".") -> dict[str, Any]:
    """lm-eval's results without its timestamps, git and machine details, and with paths inside the project
    relative to it (a clone elsewhere writes the same bytes)."""
    prefix = str(Path(project_dir).resolve()) + "/"

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value.replace(prefix, "") if isinstance(value, str) else value

    return {k: clean(v) for k, v in results.items() if k not in _VOLATILE_KEYS}


def task_lines(results: Mapping[str, Any]) -> list[str]:
    """One line per task of lm-eval's results: its scores and how many documents they are over."""
    lines = []
    for task, values in results.get("results", {}).items():
        scores = ", ".join(
            f"{k.split(',')[0]} {v:.3f}"
            for k, v in values.items()
            if k not in _RESULT_INFO_KEYS and "_stderr" not in k and isinstance(v, int | float)
        )
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        lines.append(f"{task}: {scores}" + (f" ({n} documents)" if n is not None else ""))
    return lines


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
