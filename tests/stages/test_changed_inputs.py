"""Inputs changed after scoring are refused or recomputed, never used silently (issue 24, bug 3): a score
file edited by hand, a finished shard edited before a resume, a reference model changed on disk, training
tokens cut differently from the anchor's scores."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_scoring import project, synthetic_splits  # tests/stages/ is on sys.path (pytest's rootdir imports)

from mrpo.data.provenance import check_scored_inputs, model_stat
from mrpo.data.scorefile import read_scores
from mrpo.errors import ScoreDataError
from mrpo.stages.score import score_reference


class Interrupt(Exception):
    pass


def _swap_chosen_and_rejected(path: Path, row: int = 0) -> str:
    """Swap one row's chosen and rejected log-probs in place, keeping every other byte's meaning (metadata,
    digest column): what a hand edit with pandas does."""
    table = pq.read_table(path)
    frame = table.to_pandas()
    frame.loc[row, ["chosen_logp", "rejected_logp"]] = frame.loc[
        row, ["rejected_logp", "chosen_logp"]
    ].to_numpy()
    out = pa.Table.from_pandas(frame, schema=table.schema, preserve_index=False)
    pq.write_table(out.replace_schema_metadata(table.schema.metadata), path)
    return frame.loc[row, "pair_id"]


def test_a_score_file_edited_by_hand_is_refused_naming_the_file_and_the_rescore(tiny_zoo, tmp_path):
    cfg = project(tiny_zoo, tmp_path, synthetic_splits(12))
    path = score_reference(cfg, "gpt2_char")
    frame, meta = read_scores(path)
    assert meta["row_digests"] == "row_sha256" and "row_sha256" in pq.read_table(path).column_names
    pid = _swap_chosen_and_rejected(path)
    with pytest.raises(ScoreDataError) as info:
        read_scores(path)
    message = str(info.value)
    assert message.startswith(f"{path}: edited after scoring (pair_id {pid!r} (and 0 more row(s))")
    assert message.endswith("re-score it: `dvc repro score@gpt2_char` or `mrpo score --reference gpt2_char`")
    # the digest column dropped by the edit (the metadata still says rows are digested): refused too
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["row_sha256"]), path)
    with pytest.raises(ScoreDataError, match=r"edited after scoring \(its row_sha256 column is gone\)"):
        read_scores(path)


def test_a_finished_shard_edited_before_a_resume_is_recomputed_not_reused(tiny_zoo, tmp_path, caplog):
    splits = synthetic_splits(23)
    full, _ = read_scores(
        score_reference(project(tiny_zoo, tmp_path / "full", splits, shard_size=5), "anchor")
    )
    cfg = project(tiny_zoo, tmp_path / "resumed", splits, shard_size=5)
    shard_dir = Path(cfg.score.output_dir) / ".shards" / "anchor"

    def stop_after_two(index, n_shards, path):
        if index == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        score_reference(cfg, "anchor", on_shard=stop_after_two)
    _swap_chosen_and_rejected(shard_dir / "shard-00001.parquet", row=2)
    computed = []
    frame, _ = read_scores(score_reference(cfg, "anchor", on_shard=lambda i, n, p: computed.append(i)))
    assert computed == [1, 2, 3, 4]  # shard 0 reused, the edited shard 1 scored again
    assert "shard-00001.parquet: 1 row(s) no longer match the digests written with them; recomputing it" in (
        caplog.text
    )
    assert frame.equals(full)


def _copy_zoo(tiny_zoo, dest: Path):
    """The tiny zoo's config with its models copied under `dest` (so a test may change them)."""
    shutil.copytree(tiny_zoo["output_dir"], dest)
    cfg = tiny_zoo["cfg"]
    refs = tuple(dataclasses.replace(r, model=str(dest / r.name)) for r in cfg.references)
    return dataclasses.replace(cfg, references=refs)


def test_a_reference_changed_on_disk_after_scoring_is_refused_by_train_and_evaluate(tiny_zoo, tmp_path):
    base = _copy_zoo(tiny_zoo, tmp_path / "zoo")
    cfg = project({**tiny_zoo, "cfg": base}, tmp_path, synthetic_splits(12))
    for ref in cfg.references:
        score_reference(cfg, ref.name)
    kept = json.loads((Path(cfg.score.metrics_dir) / "anchor.model.json").read_text())
    assert (
        kept["stat"] == model_stat(cfg.anchor)
        and kept["content_hash"]
        == read_scores(Path(cfg.score.output_dir) / "anchor.parquet")[1]["content_hash"]
    )
    check_scored_inputs(cfg, "train")
    check_scored_inputs(cfg, "evaluate")

    # a new mtime, the same bytes (a `dvc checkout`): hashed once, found equal, the new stat kept
    weights = Path(cfg.anchor.model) / "model.safetensors"
    weights.touch()
    check_scored_inputs(cfg, "evaluate")
    assert json.loads((Path(cfg.score.metrics_dir) / "anchor.model.json").read_text())["stat"] == model_stat(
        cfg.anchor
    )

    # other weights of the same size: refused, naming the reference and the command that re-scores it
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    for stage in ("train", "evaluate"):
        with pytest.raises(ScoreDataError) as info:
            check_scored_inputs(cfg, stage)
        message = str(info.value)
        assert message.startswith(f"references.anchor.model ({cfg.anchor.model}) changed on disk since ")
        assert message.endswith("re-score it: `dvc repro score@anchor` or `mrpo score --reference anchor`")
    # a reference train uses, evaluate does not
    other = Path(cfg.reference("llama_expert").model) / "config.json"
    other.write_text(other.read_text().replace("{", '{"note": "edited", ', 1))
    score_reference(cfg, "anchor")
    with pytest.raises(ScoreDataError, match=r"references\.llama_expert\.model .* changed on disk"):
        check_scored_inputs(cfg, "train")
    check_scored_inputs(cfg, "evaluate")


def test_training_tokens_cut_otherwise_than_the_anchors_scores_are_refused(tiny_zoo, tmp_path):
    long_prompt = {"prompt": "a long question " * 12, "chosen": "yes", "rejected": "no"}
    splits = synthetic_splits(12)
    splits["train"] = [*splits["train"], long_prompt]
    cfg = project(tiny_zoo, tmp_path, splits, max_length=24, batch_tokens=64)
    score_reference(cfg, "anchor")
    assert read_scores(Path(cfg.score.output_dir) / "anchor.parquet")[1]["prompts_truncated"] >= 1
    train = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, references=("anchor",)))
    with pytest.raises(ScoreDataError) as info:
        check_scored_inputs(
            dataclasses.replace(train, train=dataclasses.replace(train.train, max_length=256)), "train"
        )
    message = str(info.value)
    assert message.startswith(
        f"{cfg.score.output_dir}/anchor.parquet: the anchor was scored at max_length 24 ("
    )
    assert "but train.max_length is 256" in message and message.endswith("`mrpo score --reference anchor`")
    check_scored_inputs(
        dataclasses.replace(train, train=dataclasses.replace(train.train, max_length=24)), "train"
    )
