"""Are the inputs a stage reads still the ones its score files were made from?

A score file records the content hash of the reference model it scored (models.model_fingerprint) and the
max_length its pairs were cut to. `train` and `evaluate` call :func:`check_scored_inputs` first: a local
reference changed on disk since scoring, or training tokens cut differently from the anchor's scores, is
refused with one line naming the reference and the command that re-scores it.

Hashing a model on every run would cost seconds to minutes, so the size and mtime of each of its files are
kept beside the hash (`<score.metrics_dir>/<reference>.model.json`, git-ignored, no DVC output): the model is
hashed again only when they differ (a rebuilt zoo, a `dvc checkout`, an edit).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mrpo.data.scorefile import METADATA_KEY, score_path
from mrpo.errors import ScoreDataError
from mrpo.io import write_json_atomically


def model_files(ref) -> list[Path] | None:
    """The files of a local reference (its directory's files, or its GGUF file); None for a hub id or a
    model that is not on disk."""
    from mrpo.modeling.models import gguf_location

    try:
        gguf = gguf_location(ref)
    except FileNotFoundError:
        return None
    if gguf is not None:
        path = Path(gguf[0]) / gguf[1]
        return [path] if path.is_file() else None
    root = Path(ref.model)
    if not root.is_dir():
        return None
    return sorted(p for p in root.rglob("*") if p.is_file())


def model_stat(ref) -> dict[str, list[int]] | None:
    """{file: [size, mtime_ns]} of a local reference's files; None when it has none on disk."""
    files = model_files(ref)
    if not files:
        return None
    return {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def _stat_path(cfg, name: str) -> Path:
    return Path(cfg.score.metrics_dir) / f"{name}.model.json"


def remember_model(cfg, ref, stat: dict | None, content_hash: str | None) -> None:
    """Keep `stat` (taken before the model was hashed) with its hash, when the files did not change since."""
    if stat is None or content_hash is None or model_stat(ref) != stat:
        return
    record = {"model": ref.model, "stat": stat, "content_hash": content_hash}
    write_json_atomically(_stat_path(cfg, ref.name), record)


def current_content_hash(cfg, ref) -> str | None:
    """The reference's content hash now: from the kept record when no file's size or mtime changed, else
    hashed again (and kept)."""
    from mrpo.modeling.models import model_fingerprint

    stat = model_stat(ref)
    if stat is None:
        return None
    try:
        kept = json.loads(_stat_path(cfg, ref.name).read_text())
    except (OSError, ValueError):
        kept = None
    if isinstance(kept, dict) and kept.get("model") == ref.model and kept.get("stat") == stat:
        return kept.get("content_hash")
    content_hash = model_fingerprint(ref).get("content_hash")
    remember_model(cfg, ref, stat, content_hash)
    return content_hash


def _recorded(cfg, name: str) -> dict | None:
    """The b"mrpo" metadata of `name`'s score file (its schema only: no rows are read); None when the file is
    missing or unreadable, which reading the scores reports in full."""
    try:
        raw = (pq.read_schema(score_path(cfg.score.output_dir, name)).metadata or {}).get(METADATA_KEY)
        meta = json.loads(raw) if raw else None
    except (OSError, ValueError, pa.ArrowException):
        return None
    return meta if isinstance(meta, dict) else None


def check_reference_unchanged(cfg, name: str) -> None:
    """Refuse a local reference whose content hash on disk differs from the one its score file recorded."""
    meta = _recorded(cfg, name)
    recorded = (meta or {}).get("content_hash")
    if recorded is None:  # a hub model (pinned by revision), or no score file yet
        return
    ref = cfg.reference(name)
    now = current_content_hash(cfg, ref)
    if now is not None and now != recorded:
        raise ScoreDataError(
            f"references.{name}.model ({ref.model}) changed on disk since "
            f"{score_path(cfg.score.output_dir, name)} was scored (content hash {now[:12]} now, "
            f"{recorded[:12]} then), so its scores are stale; re-score it: `dvc repro score@{name}` or "
            f"`mrpo score --reference {name}`"
        )


def check_same_tokens(cfg) -> None:
    """Refuse training on pairs tokenized differently from the anchor's scores: the anchor's score file cut
    prompts at another max_length than train.max_length (or training may cut what scoring did not)."""
    anchor = cfg.anchor.name
    meta = _recorded(cfg, anchor) or {}
    scored_at = meta.get("max_length")
    train_at = cfg.train.max_length
    if scored_at is None or scored_at == train_at:
        return
    cut = int(meta.get("prompts_truncated") or 0)
    if cut == 0 and train_at > scored_at:
        return  # every pair that fit whole at scoring is tokenized the same at a larger length
    why = f"{cut} prompts were cut to fit it" if cut else "training may cut pairs that scoring kept whole"
    raise ScoreDataError(
        f"{score_path(cfg.score.output_dir, anchor)}: the anchor was scored at max_length {scored_at} "
        f"({why}), but train.max_length is {train_at}, so training would compare the policy with scores of "
        f"other tokens; set train.max_length and score.max_length alike and re-score: "
        f"`dvc repro score@{anchor}` or `mrpo score --reference {anchor}`"
    )


def check_scored_inputs(cfg, stage: str) -> None:
    """What `train` and `evaluate` check before reading any score: each reference whose scores they use is
    unchanged on disk since scoring; for `train`, its tokenization matches the anchor's scores. Under DVC,
    dvc.yaml lists the files the stage reads as deps (mrpo.config.inputs)."""
    from mrpo.config.inputs import check_declared

    check_declared(cfg, stage)
    if stage == "train":
        names = [r.name for r in cfg.training_references()]
        if cfg.anchor.name in names:
            check_same_tokens(cfg)
    else:
        names = [cfg.anchor.name]
    for name in names:
        check_reference_unchanged(cfg, name)
