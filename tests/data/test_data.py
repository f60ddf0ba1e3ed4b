"""The prepare stage: every source, format and file type;
determinism; splits; dedupe; bad input; real data."""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import random
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mrpo.config.load import parse_config
from mrpo.data.cleaning import split_of
from mrpo.data.gsm8k import corrupt_final_answer
from mrpo.data.normalize import pair_id, split_transcripts
from mrpo.data.prepared import COLUMNS, SPLITS, prepared_digest
from mrpo.errors import DataError
from mrpo.stages.prepare import prepare

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HH_FILE = SHARED / "hh-rlhf-harmless-base-test.jsonl.gz"
GSM8K_FILES = sorted(SHARED.glob("gsm8k-*.jsonl"))

EXPLICIT_ROWS = [
    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
]


def final_number(text: str) -> int | None:
    """The last integer in a GSM8K-style answer."""
    found = re.findall(r"-?\d+", text)
    return int(found[-1]) if found else None


def make_cfg(tmp_path: Path, seed: int = 0, **data):
    data.setdefault("output_dir", str(tmp_path / "prepared"))
    return parse_config({"seed": seed, "references": {"anchor": {"model": "unused"}}, "data": data})


def read_split(output_dir: Path | str, split: str) -> list[dict]:
    return pq.read_table(Path(output_dir) / f"{split}.parquet").to_pylist()


def read_all(output_dir: Path | str) -> list[dict]:
    return [row for split in SPLITS for row in read_split(output_dir, split)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format the file name says (.json/.jsonl/.parquet/.csv, optionally .gz)."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        raw = sink.getvalue().to_pybytes()
    elif name.endswith(".jsonl"):
        raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
    elif name.endswith(".json"):
        raw = json.dumps(rows).encode()
    elif name.endswith(".csv"):
        buf = io.StringIO()
        csv.writer(buf).writerows([list(rows[0])] + [[r[k] for k in rows[0]] for r in rows])
        raw = buf.getvalue().encode()
    else:
        raise ValueError(path)
    path.write_bytes(gzip.compress(raw, mtime=0) if path.name.endswith(".gz") else raw)
    return path


# ---------------------------------------------------------------- output contract, synthetic source


def test_synthetic_source_writes_the_contract(tmp_path):
    cfg = make_cfg(tmp_path, synthetic_pairs=400)
    report = prepare(cfg)
    out = tmp_path / "prepared"
    for split in SPLITS:
        table = pq.read_table(out / f"{split}.parquet")
        assert table.column_names == list(COLUMNS)
        assert all(table.schema.field(c).type == pa.string() for c in COLUMNS)
    rows = read_all(out)
    assert len(rows) == 400 == report["rows_read"] == report["rows_kept"]
    assert sum(report["splits"][s]["rows"] for s in SPLITS) == 400
    for row in rows[:50]:
        assert row["pair_id"] == pair_id(row["prompt"], row["chosen"], row["rejected"])
        assert json.loads(row["prompt_messages"]) == [{"role": "user", "content": row["prompt"]}]
    assert len({r["pair_id"] for r in rows}) == 400
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    assert report["digest"] == prepared_digest(out)
    assert report["source"]["kind"] == "synthetic"
    stats = report["splits"]["train"]["chosen_chars"]
    train = read_split(out, "train")
    assert stats["max"] == max(len(r["chosen"]) for r in train)
    assert stats["min"] == min(len(r["chosen"]) for r in train)


def test_same_seed_gives_identical_files_and_digest(tmp_path):
    a = prepare(make_cfg(tmp_path, synthetic_pairs=300, output_dir=str(tmp_path / "a")))
    b = prepare(make_cfg(tmp_path, synthetic_pairs=300, output_dir=str(tmp_path / "b")))
    assert a["digest"] == b["digest"]
    for name in [f"{s}.parquet" for s in SPLITS] + ["report.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    c = prepare(make_cfg(tmp_path, seed=1, synthetic_pairs=300, output_dir=str(tmp_path / "c")))
    assert c["digest"] != a["digest"]


def test_split_fractions_and_stability(tmp_path):
    report = prepare(make_cfg(tmp_path, synthetic_pairs=3000, val_fraction=0.2, test_fraction=0.1))
    n = {s: report["splits"][s]["rows"] for s in SPLITS}
    # Binomial(3000, p): 4 standard deviations is at most ~88 rows.
    assert abs(n["val"] - 600) < 88 and abs(n["test"] - 300) < 66
    assert n["train"] == 3000 - n["val"] - n["test"]
    # A pair's split depends only on (seed, pair_id): the function the files were written with.
    for split in SPLITS:
        for row in read_split(tmp_path / "prepared", split)[:100]:
            assert split_of(row["pair_id"], 0, 0.2, 0.1) == split
    empty = prepare(
        make_cfg(
            tmp_path,
            synthetic_pairs=200,
            val_fraction=0.0,
            test_fraction=0.0,
            output_dir=str(tmp_path / "all_train"),
        )
    )
    assert empty["splits"]["train"]["rows"] == 200
    assert read_split(tmp_path / "all_train", "val") == [] == read_split(tmp_path / "all_train", "test")


# ---------------------------------------------------------------- file types, explicit format


FILE_NAMES = [
    "d.json",
    "d.jsonl",
    "d.parquet",
    "d.csv",
    "d.json.gz",
    "d.jsonl.gz",
    "d.parquet.gz",
    "d.csv.gz",
]


@pytest.mark.parametrize("name", FILE_NAMES)
def test_every_file_type_gives_the_same_pairs(tmp_path, name):
    path = write_rows(tmp_path / name, EXPLICIT_ROWS)
    report = prepare(make_cfg(tmp_path, source="file", paths=[str(path)]))
    assert report["source"]["formats"] == {str(path): "explicit"}
    rows = sorted(read_all(tmp_path / "prepared"), key=lambda r: r["prompt"])
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == sorted(
        (r["prompt"], r["chosen"], r["rejected"]) for r in EXPLICIT_ROWS
    )
    # Same content, same digest, whatever the file type: compare against the plain JSONL.
    ref = prepare(
        make_cfg(
            tmp_path,
            source="file",
            paths=[str(write_rows(tmp_path / "ref.jsonl", EXPLICIT_ROWS))],
            output_dir=str(tmp_path / "ref"),
        )
    )
    assert report["digest"] == ref["digest"]


def test_json_variants_and_several_paths_concatenated(tmp_path):
    columns = tmp_path / "columns.json"  # column-oriented JSON
    columns.write_text(
        json.dumps({k: [r[k] for r in EXPLICIT_ROWS[:2]] for k in ("prompt", "chosen", "rejected")})
    )
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name, as on the hub
    lines.write_text("".join(json.dumps(r) + "\n" for r in EXPLICIT_ROWS[2:]))
    report = prepare(make_cfg(tmp_path, source="file", paths=[str(columns), str(lines)]))
    assert report["rows_read"] == 4 and report["rows_kept"] == 4
    assert {r["prompt"] for r in read_all(tmp_path / "prepared")} == {r["prompt"] for r in EXPLICIT_ROWS}


def test_configurable_column_names(tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in EXPLICIT_ROWS]
    path = write_rows(tmp_path / "d.jsonl", rows)
    prepare(
        make_cfg(
            tmp_path,
            source="file",
            paths=[str(path)],
            prompt_column="question",
            chosen_column="good",
            rejected_column="bad",
        )
    )
    got = {r["prompt"]: (r["chosen"], r["rejected"]) for r in read_all(tmp_path / "prepared")}
    assert got["Capital of France?"] == ("Paris", "Rome")


def test_max_rows_limits_rows_read_across_paths(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", EXPLICIT_ROWS[:3])
    b = write_rows(tmp_path / "b.jsonl", EXPLICIT_ROWS[3:])
    report = prepare(make_cfg(tmp_path, source="file", paths=[str(a), str(b)], max_rows=2))
    assert report["rows_read"] == 2 and report["rows_kept"] == 2
    assert report["source"]["formats"] == {str(a): "explicit"}  # b was never read
    report = prepare(make_cfg(tmp_path, source="file", paths=[str(a), str(b)], max_rows=4))
    assert report["rows_read"] == 4


# ---------------------------------------------------------------- conversational and implicit formats


def msg(role, content):
    return {"role": role, "content": content}


CONVERSATIONAL_ROWS = [
    {  # explicit prompt list, one-turn responses
        "prompt": [msg("user", "What is 3 * 3?")],
        "chosen": [msg("assistant", "9")],
        "rejected": [msg("assistant", "6")],
    },
    {  # multi-turn prompt list with a system message
        "prompt": [
            msg("system", "Be brief."),
            msg("user", "Hi"),
            msg("assistant", "Hello."),
            msg("user", "2 + 5?"),
        ],
        "chosen": [msg("assistant", "7")],
        "rejected": [msg("assistant", "8")],
    },
]
IMPLICIT_CONVERSATION_ROWS = [  # no prompt: whole conversations sharing a history
    {
        "chosen": [
            msg("user", "Tell me a fruit."),
            msg("assistant", "Apple."),
            msg("user", "Another?"),
            msg("assistant", "Pear."),
        ],
        "rejected": [
            msg("user", "Tell me a fruit."),
            msg("assistant", "Apple."),
            msg("user", "Another?"),
            msg("assistant", "Carrot."),
        ],
    },
]


@pytest.mark.parametrize("name", ["c.jsonl", "c.parquet.gz"])
def test_conversational_format(tmp_path, name):
    path = write_rows(tmp_path / name, CONVERSATIONAL_ROWS)
    report = prepare(make_cfg(tmp_path, source="file", paths=[str(path)]))
    assert report["source"]["formats"][str(path)] == "conversational"
    rows = {r["chosen"]: r for r in read_all(tmp_path / "prepared")}
    assert rows["9"]["prompt"] == "What is 3 * 3?" and rows["9"]["rejected"] == "6"
    assert json.loads(rows["9"]["prompt_messages"]) == [msg("user", "What is 3 * 3?")]
    multi = rows["7"]
    assert json.loads(multi["prompt_messages"]) == CONVERSATIONAL_ROWS[1]["prompt"]
    assert (
        multi["prompt"]
        == "System: Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: 2 + 5?\n\nAssistant:"
    )


def test_conversational_without_prompt_uses_the_shared_history(tmp_path):
    path = write_rows(tmp_path / "c.json", IMPLICIT_CONVERSATION_ROWS)
    prepare(make_cfg(tmp_path, source="file", paths=[str(path)], format="conversational"))
    (row,) = read_all(tmp_path / "prepared")
    assert (row["chosen"], row["rejected"]) == ("Pear.", "Carrot.")
    assert json.loads(row["prompt_messages"]) == IMPLICIT_CONVERSATION_ROWS[0]["chosen"][:-1]
    assert row["prompt"] == "Human: Tell me a fruit.\n\nAssistant: Apple.\n\nHuman: Another?\n\nAssistant:"


HH_ROWS = [
    {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"
        "\n\nHuman: What is 2 + 2?\n\nAssistant: It is 4.",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"
        "\n\nHuman: What is 2 + 2?\n\nAssistant: It is 5.",
    },
    {  # responses that differ from the first character, single turn
        "chosen": "\n\nHuman: Are cats mammals?\n\nAssistant: Yes.",
        "rejected": "\n\nHuman: Are cats mammals?\n\nAssistant: No, they are birds.",
    },
]


def test_implicit_prompt_splits_at_the_last_shared_assistant_turn(tmp_path):
    path = write_rows(tmp_path / "hh.jsonl.gz", HH_ROWS)
    report = prepare(make_cfg(tmp_path, source="file", paths=[str(path)]))
    assert report["source"]["formats"][str(path)] == "implicit"
    rows = {r["chosen"]: r for r in read_all(tmp_path / "prepared")}
    multi = rows["It is 4."]
    # The shared prefix extends into "It is ": the split is still at the Assistant turn, not mid-response.
    assert multi["rejected"] == "It is 5."
    assert (
        multi["prompt"]
        == "Human: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2 + 2?\n\nAssistant:"
    )
    assert json.loads(multi["prompt_messages"]) == [
        msg("user", "Hi there"),
        msg("assistant", "Hello! How can I help?"),
        msg("user", "What is 2 + 2?"),
    ]
    single = rows["Yes."]
    assert single["rejected"] == "No, they are birds."
    assert json.loads(single["prompt_messages"]) == [msg("user", "Are cats mammals?")]


def test_split_transcripts_pure():
    assert split_transcripts("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: a\n\nAssistant: y") == (
        "\n\nHuman: a\n\nAssistant:",
        "x",
        "y",
    )
    assert split_transcripts("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: x") is None


# ---------------------------------------------------------------- hub and gsm8k sources


def test_hub_source_through_load_dataset_on_local_files(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    repo = tmp_path / "hub_dataset"
    repo.mkdir()
    write_rows(repo / "train.jsonl", EXPLICIT_ROWS)
    write_rows(repo / "test.jsonl", EXPLICIT_ROWS[:1])
    report = prepare(make_cfg(tmp_path, source="hub", paths=[str(repo)], hub_split="train"))
    assert report["rows_kept"] == 4 and report["source"]["hub_split"] == "train"
    ref = prepare(
        make_cfg(tmp_path, source="file", paths=[str(repo / "train.jsonl")], output_dir=str(tmp_path / "r"))
    )
    assert report["digest"] == ref["digest"]
    with pytest.raises(DataError, match=r"split 'validation'.*cannot load"):
        prepare(make_cfg(tmp_path, source="hub", paths=[str(repo)], hub_split="validation"))


GSM_ROWS = [
    {
        "question": "Tom has 3 apples and buys 4 more. How many?",
        "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7",
    },
    {
        "question": "A shop sells 1,200 pens a day for 10 days. How many pens?",
        "answer": "It sells 10 per day.\nIn total 1,200 * 10 = <<1200*10=12000>>12,000 pens.\n#### 12,000",
    },
    {"question": "No final line here?", "answer": "Just text without a marker."},
]


def test_gsm8k_builder_makes_wrong_final_answers(tmp_path):
    path = write_rows(tmp_path / "gsm.jsonl", GSM_ROWS)
    report = prepare(make_cfg(tmp_path, source="gsm8k", paths=[str(path)]))
    assert report["rows_kept"] == 2 and report["dropped"]["malformed"] == 1
    rows = {r["prompt"]: r for r in read_all(tmp_path / "prepared")}
    tom = rows[GSM_ROWS[0]["question"]]
    assert tom["chosen"] == GSM_ROWS[0]["answer"]
    wrong = final_number(tom["rejected"])
    assert wrong != 7 and wrong >= 0
    assert tom["rejected"] == f"Tom has 3 + 4 = <<3+4={wrong}>>{wrong} apples.\n#### {wrong}"
    pens = rows[GSM_ROWS[1]["question"]]
    m = re.fullmatch(
        r"It sells 10 per day\.\nIn total 1,200 \* 10 = <<1200\*10=(\d+)>>([\d,]+) pens\.\n#### ([\d,]+)",
        pens["rejected"],
    )
    assert m is not None, pens["rejected"]
    assert int(m.group(1)) == int(m.group(2).replace(",", "")) == int(m.group(3).replace(",", "")) != 12000
    # Deterministic under the seed, and the seed matters.
    assert corrupt_final_answer(GSM_ROWS[0]["answer"], random.Random(5)) == corrupt_final_answer(
        GSM_ROWS[0]["answer"], random.Random(5)
    )
    wrongs = {final_number(corrupt_final_answer(GSM_ROWS[0]["answer"], random.Random(s))) for s in range(30)}
    assert len(wrongs) > 2 and 7 not in wrongs


def test_gsm8k_missing_column(tmp_path):
    path = write_rows(tmp_path / "gsm.jsonl", [{"q": "x", "answer": "#### 1"}])
    with pytest.raises(DataError, match=r"gsm\.jsonl: no column 'question' \(data\.question_column\)"):
        prepare(make_cfg(tmp_path, source="gsm8k", paths=[str(path)]))


# ---------------------------------------------------------------- dedupe and bad input


def test_duplicates_removed_within_and_across_files(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", EXPLICIT_ROWS + EXPLICIT_ROWS[:2])
    b = write_rows(
        tmp_path / "b.csv", EXPLICIT_ROWS[1:3] + [{"prompt": "New?", "chosen": "Yes", "rejected": "No"}]
    )
    report = prepare(make_cfg(tmp_path, source="file", paths=[str(a), str(b)]))
    assert report["rows_read"] == 9
    assert report["dropped"]["duplicate"] == 4
    assert report["rows_kept"] == 5
    rows = read_all(tmp_path / "prepared")
    assert len(rows) == 5 == len({r["pair_id"] for r in rows})


def test_bad_rows_are_dropped_and_counted_by_reason(tmp_path, caplog):
    rows = EXPLICIT_ROWS[:2] + [
        {"prompt": "p3", "chosen": "c3"},  # 3: missing rejected
        {"prompt": "  ", "chosen": "c4", "rejected": "r4"},  # 4: empty prompt
        {"prompt": "p5", "chosen": 5, "rejected": "r5"},  # 5: not a string
        {"prompt": "p6", "chosen": "same", "rejected": "same"},  # 6: chosen == rejected
        {"prompt": "p7", "chosen": "x" * 60, "rejected": "y"},  # 7: too long
        {"prompt": "p8", "chosen": None, "rejected": "r8"},  # 8: missing (null)
        {"prompt": "p9", "chosen": "c9", "rejected": ["a", "list"]},  # 9: not a string
    ]
    path = write_rows(tmp_path / "bad.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="mrpo"):
        report = prepare(
            make_cfg(tmp_path, source="file", paths=[str(path)], format="explicit", max_chars=50)
        )
    assert report["rows_read"] == 9 and report["rows_kept"] == 2
    assert report["dropped"] == {
        "missing_field": 3,
        "not_string": 2,
        "malformed": 0,
        "identical": 1,
        "too_long": 1,
        "duplicate": 0,
    }
    assert report["rows_kept"] + sum(report["dropped"].values()) == report["rows_read"]
    log = caplog.text
    assert f"{path} row 3: field 'rejected' is missing" in log
    assert f"{path} row 4: field 'prompt' is empty" in log
    assert f"{path} row 5: field 'chosen' is int, not a string" in log
    assert f"{path} row 6: chosen and rejected are identical" in log
    assert f"{path} row 7: 62 characters > data.max_chars 50" in log
    assert report["dropped_examples"]["not_string"] == [
        f"{path} row 5: field 'chosen' is int, not a string",
        f"{path} row 9: field 'rejected' is list, not a string",
    ]


def test_malformed_conversations_are_dropped(tmp_path):
    rows = CONVERSATIONAL_ROWS + [
        {
            "prompt": [msg("user", "q")],
            "chosen": [msg("user", "not assistant")],
            "rejected": [msg("assistant", "r")],
        },
        {"prompt": [msg("user", "q")], "chosen": [{"text": "no role"}], "rejected": [msg("assistant", "r")]},
        {
            "chosen": [msg("user", "a"), msg("assistant", "x")],
            "rejected": [msg("user", "b"), msg("assistant", "y")],
        },
        {"prompt": [msg("user", "q")], "chosen": [msg("assistant", 3)], "rejected": [msg("assistant", "r")]},
    ]
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = prepare(make_cfg(tmp_path, source="file", paths=[str(path)]))
    assert report["rows_kept"] == 2
    assert report["dropped"]["malformed"] == 3 and report["dropped"]["not_string"] == 1
    assert any(
        "row 5: chosen and rejected have different conversation histories" in e
        for e in report["dropped_examples"]["malformed"]
    )


def test_missing_column_names_file_and_column(tmp_path):
    path = write_rows(tmp_path / "nocol.csv", [{"prompt": "p", "chosen": "c", "other": "r"}])
    with pytest.raises(DataError, match=r"nocol\.csv: no column 'rejected' \(data\.rejected_column\)"):
        prepare(make_cfg(tmp_path, source="file", paths=[str(path)]))
    # auto: no prompt column and no transcripts -> say which column and how to fix it
    path = write_rows(tmp_path / "noprompt.jsonl", [{"q": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(DataError, match=r"noprompt\.jsonl: no column 'prompt' \(data\.prompt_column\)"):
        prepare(make_cfg(tmp_path, source="file", paths=[str(path)]))
    with pytest.raises(DataError, match=r"no column 'prompt' \(data\.prompt_column\)"):
        prepare(make_cfg(tmp_path, source="file", paths=[str(path)], format="explicit"))


def test_unreadable_files_name_the_file(tmp_path):
    cases = {
        "missing.jsonl": None,
        "corrupt.jsonl.gz": b"this is not gzip",
        "broken.jsonl": b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": oops}\n',
        "broken.json": b"[{",
        "broken.parquet": b"PAR1 not really",
        "data.txt": b"prompt,chosen,rejected\n",
    }
    messages = {
        "missing.jsonl": "file not found",
        "corrupt.jsonl.gz": "cannot read file",
        "broken.jsonl": "line 2: not valid JSON",
        "broken.json": "not valid JSON",
        "broken.parquet": "not a readable parquet file",
        "data.txt": "unsupported file type",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(DataError, match=re.escape(str(path)) + r".*" + re.escape(messages[name])):
            prepare(make_cfg(tmp_path, source="file", paths=[str(path)]))


def test_file_with_no_valid_row_fails(tmp_path):
    good = write_rows(tmp_path / "good.jsonl", EXPLICIT_ROWS)
    bad = write_rows(
        tmp_path / "allbad.jsonl",
        [
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "", "chosen": "a", "rejected": "b"},
        ],
    )
    with pytest.raises(DataError, match=r"allbad\.jsonl: no valid row among 2 .*identical.*row 1"):
        prepare(make_cfg(tmp_path, source="file", paths=[str(good), str(bad)]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        prepare(make_cfg(tmp_path, source="file", paths=[str(empty)]))


def test_failed_run_leaves_earlier_outputs_intact(tmp_path):
    out = tmp_path / "prepared"
    first = prepare(make_cfg(tmp_path, synthetic_pairs=100))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError):
        prepare(make_cfg(tmp_path, source="file", paths=[str(bad)]))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files left either
    assert prepared_digest(out) == first["digest"]


def test_prepared_digest_needs_the_files(tmp_path):
    with pytest.raises(DataError, match="run `mrpo prepare` first"):
        prepared_digest(tmp_path)


def test_damaged_gzip_files_name_the_file_and_the_fix(tmp_path):
    good = gzip.compress(("".join(json.dumps(r) + "\n" for r in EXPLICIT_ROWS) * 50).encode(), mtime=0)
    damaged = bytearray(good)
    damaged[30:40] = bytes(10)  # zlib.error: invalid literal/lengths set
    cases = {
        "damaged.jsonl.gz": bytes(damaged),
        "truncated.jsonl.gz": good[: len(good) // 2],
        "plain.jsonl.gz": b'{"prompt": "a"}\n',
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError) as info:
            prepare(make_cfg(tmp_path, source="file", paths=[str(path)]))
        assert str(info.value).startswith(f"{path}: cannot read file: damaged, truncated or not gzip data (")
        assert "re-create or re-download it, or drop the .gz suffix if it is not compressed" in str(
            info.value
        )


def test_csv_rows_with_extra_fields_are_reported_not_dropped_silently(tmp_path, caplog):
    path = tmp_path / "extra.csv"
    path.write_text(
        "prompt,chosen,rejected\nWhat is 2 + 2?,4,5\nSay hi.,Hi!,No.,surplus,more\nName one.,A,B\n"
    )
    with caplog.at_level(logging.WARNING, logger="mrpo"):
        report = prepare(make_cfg(tmp_path, source="file", paths=[str(path)]))
    assert report["rows_kept"] == 3
    assert report["extra_fields"] == {
        "rows": 1,
        "examples": [f'{path} row 2: 2 field(s) beyond the header\'s columns ignored: ["surplus", "more"]'],
    }
    saved = json.loads((tmp_path / "prepared" / "report.json").read_text())
    assert saved["extra_fields"]["rows"] == 1
    assert "1 row(s) had more fields than the header names" in caplog.text
    assert prepare(make_cfg(tmp_path, synthetic_pairs=20))["extra_fields"] == {"rows": 0, "examples": []}


def test_csv_with_a_wrong_header_and_an_extra_field_names_the_missing_column(tmp_path):
    # the header lacks `rejected`, so every row has one field more than it names (csv keys those under None,
    # which used to crash format detection with a TypeError)
    path = tmp_path / "header.csv"
    path.write_text("prompt,chosen\nWhat is 2 + 2?,4,5\nSay hi.,Hi!,No.\n")
    with pytest.raises(
        DataError,
        match=re.escape(
            f"{path}: no column 'rejected' (data.rejected_column); columns found: ['chosen', 'prompt']"
        ),
    ):
        prepare(make_cfg(tmp_path, source="file", paths=[str(path)]))


def _offline_env() -> dict:
    import os

    root = str(Path(__file__).resolve().parents[2])
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def test_hub_dataset_offline_is_one_line_naming_the_dataset(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "references:\n  anchor:\n    model: unused\n"
        f"data:\n  source: hub\n  paths: [made-up-org/no-such-dataset]\n"
        f"  output_dir: {tmp_path / 'out'}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mrpo.cli", "--params", str(params), "prepare"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_offline_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "mrpo prepare: data.paths: dataset 'made-up-org/no-such-dataset' split 'train': cannot load"
    )
    assert "could not be downloaded from the Hugging Face Hub" in last and "data.source: file" in last


# ---------------------------------------------------------------- command line


def test_cli_prepare_writes_the_files(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "seed: 3\nreferences:\n  anchor:\n    model: unused\n"
        f"data:\n  source: synthetic\n  synthetic_pairs: 120\n  output_dir: {tmp_path / 'cli_out'}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mrpo.cli", "--params", str(params), "prepare"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "kept 120" in result.stderr
    report = json.loads((tmp_path / "cli_out" / "report.json").read_text())
    assert report["rows_kept"] == 120 and report["seed"] == 3
    assert report["digest"] == prepared_digest(tmp_path / "cli_out")


# ---------------------------------------------------------------- real data


@pytest.mark.real_data
@pytest.mark.skipif(not HH_FILE.is_file(), reason=f"{HH_FILE} not present")
def test_real_hh_rlhf_keeps_the_multi_turn_prompt(tmp_path):
    report = prepare(make_cfg(tmp_path, source="file", paths=[str(HH_FILE)]))
    assert report["source"]["formats"] == {str(HH_FILE): "implicit"}
    assert report["rows_read"] == 2312 and report["rows_kept"] >= 2290
    rows = read_all(tmp_path / "prepared")
    (pen,) = [r for r in rows if r["prompt"].startswith("Human: what are some pranks with a pen i can do?")]
    assert pen["prompt"].startswith(
        "Human: what are some pranks with a pen i can do?"
        "\n\nAssistant: Are you looking for practical joke ideas?"
        "\n\nHuman: yep\n\nAssistant: Ok, I’ll give you a couple examples"
    )
    assert pen["prompt"].endswith(
        "\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:"
    )
    assert pen["chosen"].startswith("No, sorry!  All of these involve a pen")
    assert pen["rejected"].startswith("There are lots of funny things you can do with pens")
    messages = json.loads(pen["prompt_messages"])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"] == "okay some of these do not have anything to do with pens"
    for row in rows:
        roles = [m["role"] for m in json.loads(row["prompt_messages"])]
        assert roles[0] == "user" and roles[-1] == "user"
        assert row["prompt"].endswith("\n\nAssistant:")
        assert row["chosen"] != row["rejected"] and row["chosen"] == row["chosen"].strip()
    assert sum(len(json.loads(r["prompt_messages"])) > 1 for r in rows) > 1000  # most are multi-turn


@pytest.mark.real_data
@pytest.mark.skipif(not GSM8K_FILES, reason=f"no gsm8k-*.jsonl in {SHARED}")
def test_real_gsm8k_builds_math_pairs(tmp_path):
    report = prepare(make_cfg(tmp_path, source="gsm8k", paths=[str(p) for p in GSM8K_FILES]))
    expected = sum(1 for p in GSM8K_FILES for line in p.open() if line.strip())
    assert report["rows_read"] == expected and report["rows_kept"] >= expected - 5
    rows = read_all(tmp_path / "prepared")
    consistent = 0
    for row in rows:
        chosen, rejected = row["chosen"].split("\n"), row["rejected"].split("\n")
        assert len(chosen) == len(rejected)
        right = chosen[-1].removeprefix("#### ").strip().replace(",", "")
        wrong = rejected[-1].removeprefix("#### ").strip().replace(",", "")
        assert rejected[-1].startswith("#### ") and wrong != right
        assert int(wrong) >= 0 or int(right) < 0  # a count never becomes negative
        assert chosen[:-2] == rejected[:-2]  # only the last calculation and the final answer change
        consistent += chosen[-2] != rejected[-2]
    assert consistent / len(rows) > 0.95  # the last calculation states the wrong result too
