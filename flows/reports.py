"""What a stage wrote, for its Prefect artifact: its metrics flat, and as markdown; no Prefect here."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows.stages import StageResult
from mrpo.config.schema import Config
from mrpo.data.scorefile import score_path
from mrpo.pipeline import STAGES
from mrpo.reporting.records import EVAL_RECORD, TRAIN_RECORD, ZOO_MANIFEST, read_record
from mrpo.reporting.summary import format_change, format_number
from mrpo.reporting.tables import markdown_table as _markdown_table


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested JSON -> {"a.b.c": scalar}; lists of scalars become comma-joined strings."""
    out: dict[str, Any] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, list | tuple):
        if all(not isinstance(v, Mapping | list | tuple) for v in data):
            out[prefix] = ", ".join(str(v) for v in data)
        else:
            for i, value in enumerate(data):
                out.update(flatten(value, f"{prefix}.{i}" if prefix else str(i)))
    else:
        out[prefix] = data
    return out


def numeric_items(flat: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a flat dict (booleans excluded): what MLflow can log as metrics."""
    return {
        k: float(v)
        for k, v in flat.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def score_summary(path: Path) -> dict[str, Any]:
    """Rows, fit rate and the mean log-prob margin (chosen - rejected) of one score file."""
    from mrpo.data.scorefile import read_scores

    frame, meta = read_scores(path)
    margin = frame["chosen_logp"] - frame["rejected_logp"]
    summary: dict[str, Any] = {
        "pairs": int(len(frame)),
        "fits_fraction": float(frame["fits"].mean()) if len(frame) else 0.0,
        "mean_margin": float(margin[frame["fits"]].mean()) if frame["fits"].any() else float("nan"),
        "margin_positive_fraction": float((margin[frame["fits"]] > 0).mean()) if frame["fits"].any() else 0.0,
    }
    for split, count in frame["split"].value_counts().sort_index().items():
        summary[f"pairs.{split}"] = int(count)
    for key in ("model", "revision", "content_hash", "tokenizer", "prepared_digest"):
        if meta.get(key) is not None:
            summary[key] = meta[key]
    return summary


def stage_metrics(stage: str, cfg: Config, project_dir: str | Path) -> dict[str, Any]:
    """The numbers a stage produced, flat, for its Prefect artifact (empty when it wrote none)."""
    root = Path(project_dir)
    if stage == "zoo":
        # each member's manifest: size, SFT steps and loss
        out: dict[str, Any] = {}
        keep = ("architecture", "tokenizer", "parameters", "train_steps", "first_loss", "final_loss")
        for manifest in sorted((root / cfg.zoo.output_dir).glob(f"*/{ZOO_MANIFEST}")):
            data = read_record(manifest)
            out.update({f"{manifest.parent.name}.{k}": data[k] for k in keep if data.get(k) is not None})
        return out
    if stage == "prepare":
        report = flatten(read_record(root / cfg.data.output_dir / "report.json"))
        return {k: v for k, v in report.items() if "_chars." not in k}  # length stats stay in report.json
    if stage.startswith("score@"):
        path = score_path(root / cfg.score.output_dir, stage.split("@", 1)[1])
        return score_summary(path) if path.is_file() else {}
    if stage == "diagnose":
        return flatten(read_record(root / cfg.diagnose.metrics_file))
    if stage == "sft":  # {"enabled": false} when off
        return flatten(read_record(root / cfg.sft.metrics_file))
    if stage == "train":  # the full record (before and after), else the metrics file
        record = read_record(root / cfg.train.output_dir / TRAIN_RECORD)
        return flatten(record or read_record(root / cfg.train.metrics_file))
    if stage == "evaluate":
        record = read_record(root / cfg.evaluate.results_dir / EVAL_RECORD)
        return flatten(record or read_record(root / cfg.evaluate.metrics_file))
    if stage in ("check", "summary"):
        return {}  # check writes a marker; summary's markdown is the pipeline's summary artifact
    known = ", ".join(f"{s.name}@<reference>" if s.per_reference else s.name for s in STAGES)
    raise ValueError(f"unknown stage {stage!r}; known: {known}")


def stage_report(stage: str, cfg: Config, project_dir: str | Path) -> str | None:
    """A stage's own markdown report, published as a Prefect artifact of its own (the diagnose stage's)."""
    if stage == "diagnose":
        path = Path(project_dir) / cfg.diagnose.report_file
        return path.read_text() if path.is_file() else None
    return None


def markdown_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    """A GitHub-flavoured markdown table; floats to 4 significant digits."""
    if not rows:
        return "_(no rows)_\n"
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))

    def cell(value: Any) -> str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return format_number(value)
        return str(value).replace("|", "\\|").replace("\n", " ")

    return _markdown_table(columns, [[cell(row.get(c, "")) for c in columns] for row in rows])


def stage_markdown(result: StageResult, metrics: Mapping[str, Any], cfg: Config | None = None) -> str:
    """The Prefect artifact for one stage: what DVC did, then its metrics as a table (train: before/after)."""
    head = f"### Stage `{result.stage}`: {result.status} in {result.seconds:.1f}s\n\n"
    if not metrics:
        return head + "_This stage wrote no metrics._\n"
    if result.stage == "train" and cfg is not None:
        return head + train_markdown(cfg, metrics)
    return head + markdown_table([{"metric": k, "value": v} for k, v in metrics.items()])


_TRAIN_NAMES = {"reward_accuracy": "reward accuracy", "reward_margin": "reward margin", "loss": "loss"}


def train_markdown(cfg: Config, metrics: Mapping[str, Any]) -> str:
    """The training run in three parts: its settings, before/after on val and test, the reference weights."""
    t = cfg.train
    names = [r.name for r in cfg.training_references()]
    text = (
        f"Objective **{t.objective}**, strategy **{t.strategy}**, beta {t.beta:g}, loss {t.loss_type}; "
        f"references {', '.join(names)}; {format_number(metrics.get('steps'))} steps on "
        f"{format_number(metrics.get('train_pairs'))} pairs.\n\n"
    )
    rows = []
    for split in ("val", "test"):
        for key, label in _TRAIN_NAMES.items():
            before, after = metrics.get(f"{split}_{key}_before"), metrics.get(f"{split}_{key}_after")
            if before is not None or after is not None:
                rows.append(
                    {
                        "metric": f"{split} {label}",
                        "before": format_number(before),
                        "after": format_number(after),
                        "change": format_change(before, after),
                    }
                )
    text += markdown_table(rows) if rows else ""
    weights = {k.removeprefix("weight/"): v for k, v in metrics.items() if k.startswith("weight/")}
    if weights:
        text += "\nReference weights at the end of training:\n\n"
        text += markdown_table([{"reference": n, "weight": format_number(w)} for n, w in weights.items()])
    extra = {k: metrics[k] for k in ("train_loss", "tokens_per_second", "runtime_s") if k in metrics}
    if extra:
        text += "\n" + ", ".join(f"{k} {format_number(v)}" for k, v in extra.items()) + "\n"
    return text


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
