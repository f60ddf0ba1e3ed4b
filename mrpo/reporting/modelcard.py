"""The trained policy's model card (`<train.output_dir>/README.md`) and the optional upload to the Hub.

The train stage writes the card into the policy directory before it is swapped in, so card and weights always
belong together: base anchor, references with their revisions or content hashes and score digests, objective
and hyperparameters, the data digest, validation and test metrics before and after training, and the MLflow
run. The evaluate stage never edits it (the directory is the train stage's DVC output; a change would make
training stale): it writes the card with its scores added to `<evaluate.results_dir>/model_card.md` and to the
MLflow logged model instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mrpo.config.schema import Config, PushToHubConfig
from mrpo.errors import MRPOError

log = logging.getLogger("mrpo")

CARD = "README.md"
EVALUATION_MARK = "<!-- mrpo:evaluation -->"
# The hyperparameters a reader needs to reproduce the objective; every other key is in params.yaml and MLflow.
HYPERPARAMETERS = (
    "objective",
    "loss_type",
    "beta",
    "epsilon",
    "adaptive_epsilon",
    "label_smoothing",
    "sft_weight",
    "use_weighting",
    "strategy",
    "fixed_weights",
    "learning_rate",
    "lr_scheduler",
    "warmup_ratio",
    "weight_decay",
    "num_epochs",
    "max_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "max_length",
)
_SPLIT_METRICS = (
    ("reward_accuracy", "reward accuracy"),
    ("reward_margin", "reward margin"),
    ("loss", "loss"),
)


def _is_hub_id(model: str) -> bool:
    """`owner/name` that is not a local path: what the hub's `base_model` field may name."""
    return model.count("/") == 1 and not Path(model).exists() and not model.startswith((".", "/", "~"))


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "" if value is None else str(value)
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4f}"
    return str(int(value))  # counts (pairs, steps), also when stored as floats


def model_card(
    cfg: Config,
    *,
    references: Sequence[Mapping[str, Any]],
    prepared_digest: str,
    pairs: Mapping[str, int],
    metrics: Mapping[str, Any],
    tracked: bool = False,
    run_name: str | None = None,
) -> str:
    """The card's markdown. `references`: name, model, revision or content_hash, score_sha256 per training
    reference (as logged to MLflow); `pairs`: trainable pairs per split; `metrics`: metrics/train.json;
    `tracked`: whether an MLflow run records it. The card is part of the policy's DVC output, so it holds only
    what the same inputs reproduce: no run id, tracking URI or git commit (the MLflow run has those)."""
    adapter = cfg.train.lora.enabled and not cfg.train.lora.merge
    lines = [
        *_front_matter(cfg, adapter),
        *_introduction(cfg, references, run_name, adapter),
        *_hyperparameters(cfg),
        *_data_and_results(cfg, prepared_digest, pairs, metrics),
        *_tracking(cfg, tracked, run_name),
    ]
    return "\n".join(lines) + "\n"


def _front_matter(cfg: Config, adapter: bool) -> list[str]:
    t, anchor = cfg.train, cfg.anchor
    front = ["---", f"library_name: {'peft' if adapter else 'transformers'}"]
    if _is_hub_id(anchor.model):
        front.append(f"base_model: {anchor.model}")
    tags = ["mrpo", "preference-optimization", *([t.objective] if t.objective != "mrpo" else [])]
    return [*front, "tags:", *(f"- {tag}" for tag in tags), "---", ""]


def _introduction(cfg: Config, references, run_name: str | None, adapter: bool) -> list[str]:
    t, anchor = cfg.train, cfg.anchor
    pinned = f" at revision `{anchor.revision}`" if anchor.revision else ""
    lines = [
        f"# {run_name or 'MRPO policy'}",
        "",
        f"A policy trained from the anchor `{anchor.model}` by the `{t.objective}` objective "
        f"({t.loss_type} loss, beta {t.beta:g}, weighting `{t.strategy}`) against "
        f"{len(references)} reference(s), by mrpo (Multi-Reference Preference Optimization). "
        f"{'A LoRA adapter on the anchor.' if adapter else 'Full weights (safetensors).'}",
        "",
        "## Base model (anchor)",
        "",
        f"`{anchor.name}`: `{anchor.model}`{pinned}",
        "",
        "## References",
        "",
        "| name | model | revision / content sha256 | score file sha256 |",
        "|---|---|---|---|",
    ]
    for ref in references:
        pin = ref.get("revision") or ref.get("content_hash") or ""
        lines.append(f"| {ref['name']} | `{ref['model']}` | `{pin}` | `{ref.get('score_sha256', '')}` |")
    return lines


def _hyperparameters(cfg: Config) -> list[str]:
    t = cfg.train
    lines = ["", "## Objective and hyperparameters", "", "| key | value |", "|---|---|"]
    for key in HYPERPARAMETERS:
        value = getattr(t, key)
        lines.append(f"| `train.{key}` | {list(value) if isinstance(value, tuple) else value} |")
    if t.lora.enabled:
        lines.append(f"| `train.lora` | r {t.lora.r}, alpha {t.lora.alpha}, dropout {t.lora.dropout:g} |")
    lines.append(f"| `seed` | {cfg.seed} |")
    return lines


def _data_and_results(cfg: Config, prepared_digest: str, pairs, metrics) -> list[str]:
    lines = [
        "",
        "## Data",
        "",
        f"Source `{cfg.data.source}`; prepared-data digest (sha256) `{prepared_digest}`; trainable pairs: "
        + ", ".join(f"{split} {n}" for split, n in pairs.items())
        + ".",
        "",
        "## Results",
        "",
        "Implicit-reward metrics against the objective's combined reference (see docs/metrics.md), "
        "before and after training:",
        "",
        "| split | metric | before | after |",
        "|---|---|---|---|",
    ]
    for split in ("val", "test"):
        for key, label in _SPLIT_METRICS:
            before, after = metrics.get(f"{split}_{key}_before"), metrics.get(f"{split}_{key}_after")
            if before is not None or after is not None:
                lines.append(f"| {split} | {label} | {_number(before)} | {_number(after)} |")
    if metrics.get("train_loss") is not None:
        lines += [
            "",
            f"Mean training loss {_number(float(metrics['train_loss']))} over {metrics.get('steps')} steps.",
        ]
    return lines


def _tracking(cfg: Config, tracked: bool, run_name: str | None) -> list[str]:
    lines = ["", "## Tracking", ""]
    if tracked:
        lines.append(
            f"MLflow experiment `{cfg.tracking.experiment}`, run `{run_name}`: every parameter, the git "
            "commit, the curves, the datasets and, after `mrpo evaluate`, the benchmark scores (`mrpo runs`)."
        )
    else:
        lines.append("Not tracked in MLflow.")
    return lines


def with_evaluation(card: str, scores: Mapping[str, float]) -> str:
    """The card with an Evaluation section of the evaluate stage's scores (replacing an earlier one)."""
    head = card.split(EVALUATION_MARK)[0].rstrip("\n")
    rows = [f"| `{k}` | {_number(float(v))} |" for k, v in sorted(scores.items()) if v == v]
    section = [
        "",
        EVALUATION_MARK,
        "## Evaluation",
        "",
        "`policy/` lm-eval scores of this policy, `anchor/` of its anchor, `delta/` their difference, "
        "`pref/` test-split preference metrics against the anchor (docs/metrics.md).",
        "",
        "| metric | value |",
        "|---|---|",
        *rows,
    ]
    return head + "\n" + "\n".join(section) + "\n"


def push_to_hub(settings: PushToHubConfig, policy_dir: str | Path, commit_message: str) -> str:
    """Upload the policy directory (weights, tokenizer, model card; not the local MLflow run record) to
    `settings.repo_id`, creating the repository (private unless `settings.private` is false) if needed.
    Returns the commit URL. Needs a token (`HF_TOKEN` or `hf auth login`) and the network."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(settings.repo_id, repo_type="model", private=settings.private, exist_ok=True)
        info = api.upload_folder(
            repo_id=settings.repo_id,
            repo_type="model",
            folder_path=str(policy_dir),
            commit_message=commit_message,
        )
    except Exception as exc:  # auth, network, permissions: the policy itself is saved; say what to fix
        raise MRPOError(
            f"train.push_to_hub: uploading {policy_dir} to {settings.repo_id!r} failed ({exc}); the policy "
            "is saved locally. Log in (`hf auth login` or HF_TOKEN) and check the repo id, or set "
            "train.push_to_hub.enabled: false"
        ) from exc
    url = getattr(info, "commit_url", None) or str(info)
    log.info("train: pushed %s to the hub: %s", policy_dir, url)
    return url
