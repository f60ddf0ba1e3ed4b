"""The diagnose stage on real prepared data and real score files whose validation log-probs are set by hand.

Three references a (anchor), b, c; four validation pairs with margins m = chosen - rejected:

    pair   a    b    c
     0     1   -1    1
     1    -1    2   -5
     2     1   -1    1
     3     0    2    2

so by hand: accuracy (m > 0) 1/2, 1/2, 3/4; mean 1/4, 1/2, -1/4; sample sd sqrt(11/12), sqrt(3), sqrt(41/4);
agreement a~b 0, a~c 3/4, b~c 1/4; vaw acc/sum = 2/7, 2/7, 3/7; vdw mean|m|/sum = 1/6, 1/3, 1/2; arwc the
mean of per-pair |m|/sum|m| = 19/96, 34/96, 43/96. With a fixed band of 10% of the anchor's |log-prob| the
clip moves 3 of b's 8 log-probs and 6 of c's (worked out beside LOGPS).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import REPO_ROOT

NAMES = ("a", "b", "c")
# (chosen a, b, c), (rejected a, b, c) per validation pair; band = anchor +- 0.1 * |anchor|
LOGPS = [
    ((-10, -12, -9), (-11, -11, -10)),  # chosen band [-11, -9]: b moved, c on the edge (kept); rejected: none
    ((-20, -18, -30), (-19, -20, -25)),  # chosen [-22, -18]: c; rejected [-20.9, -17.1]: c
    ((-5, -5, -6), (-6, -4, -7)),  # chosen [-5.5, -4.5]: c; rejected [-6.6, -5.4]: b and c
    ((-8, -8, -7), (-8, -10, -9)),  # chosen [-8.8, -7.2]: c; rejected [-8.8, -7.2]: b and c
]


def margins() -> np.ndarray:
    return np.array([[w[k] - lo[k] for k in range(3)] for w, lo in LOGPS], dtype=np.float64)


def test_pure_functions_match_the_hand_computed_values():
    from mrpo.reporting.diagnostics import (
        clip_fractions,
        margin_correlation,
        margin_summary,
        pairwise_agreement,
        preference_accuracy,
        strategy_weights,
    )

    m = margins()
    assert m.tolist() == [[1, -1, 1], [-1, 2, -5], [1, -1, 1], [0, 2, 2]]
    np.testing.assert_allclose(preference_accuracy(m), [0.5, 0.5, 0.75])
    mean, sd = margin_summary(m)
    np.testing.assert_allclose(mean, [0.25, 0.5, -0.25])
    np.testing.assert_allclose(sd, [math.sqrt(11 / 12), math.sqrt(3), math.sqrt(41 / 4)])
    agree = pairwise_agreement(m)
    assert agree[0, 1] == 0 and agree[0, 2] == 0.75 and agree[1, 2] == 0.25 and np.all(np.diag(agree) == 1)
    np.testing.assert_allclose(margin_correlation(m), np.corrcoef(m, rowvar=False))

    chosen = np.array([w for w, _ in LOGPS], dtype=np.float64)
    rejected = np.array([lo for _, lo in LOGPS], dtype=np.float64)
    np.testing.assert_allclose(clip_fractions(chosen, rejected, 0.1, adaptive=False), [0, 3 / 8, 6 / 8])
    # epsilon 0: everything not equal to the anchor moves (b equals it in 3 of 8 values, c in none)
    assert clip_fractions(chosen, rejected, 0.0, adaptive=False)[1:].tolist() == [5 / 8, 1.0]

    w = strategy_weights(m, fixed_weights=[2, 1, 1], window_size=8, seed=0)
    np.testing.assert_allclose(w["uniform"]["weights"], [1 / 3] * 3)
    np.testing.assert_allclose(w["fixed"]["weights"], [0.5, 0.25, 0.25])
    np.testing.assert_allclose(w["vaw"]["weights"], [2 / 7, 2 / 7, 3 / 7])
    np.testing.assert_allclose(w["vdw"]["weights"], [1 / 6, 1 / 3, 1 / 2])
    np.testing.assert_allclose(w["arwc"]["weights"], [19 / 96, 34 / 96, 43 / 96])
    for online in ("window", "thompson"):  # before any step: uniform, and said to be initial
        np.testing.assert_allclose(w[online]["weights"], [1 / 3] * 3)
        assert "initial" in w[online]["how"]
    without = strategy_weights(m, fixed_weights=None, window_size=8, seed=0)["fixed"]
    assert without["weights"] is None and "fixed_weights" in without["how"]


@pytest.fixture()
def project(tmp_path):
    """Real prepared synthetic data; score files for a, b, c in the contract's format with LOGPS on four
    validation pairs, every other validation pair flagged as not scored by c (so skipped)."""
    from mrpo.config.load import load_config
    from mrpo.data.prepared import SPLITS, prepared_digest, read_split
    from mrpo.data.scorefile import METADATA_KEY, SCHEMA
    from mrpo.stages.prepare import prepare

    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["references"] = {n: {"model": str(tmp_path / "models" / n)} for n in NAMES}
    raw["zoo"]["enabled"] = False
    raw["data"].update(
        {
            "synthetic_pairs": 80,
            "val_fraction": 0.2,
            "test_fraction": 0.1,
            "output_dir": str(tmp_path / "prep"),
        }
    )
    raw["score"]["output_dir"] = str(tmp_path / "scores")
    raw["train"].update({"epsilon": 0.1, "adaptive_epsilon": False})
    raw["diagnose"] = {
        k: str(tmp_path / "out" / v)
        for k, v in {
            "metrics_file": "diagnostics.json",
            "plots_file": "diagnostics.csv",
            "image_file": "diagnostics.png",
            "report_file": "diagnostics.md",
        }.items()
    }
    raw["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(params)
    prepare(cfg)
    digest = prepared_digest(cfg.data.output_dir)
    val_ids = read_split(cfg.data.output_dir, "val")["pair_id"].tolist()
    assert len(val_ids) > 4
    rows = {n: [] for n in NAMES}
    for split in SPLITS:
        for pid in read_split(cfg.data.output_dir, split)["pair_id"]:
            i = val_ids.index(pid) if pid in val_ids else None
            for k, n in enumerate(NAMES):
                if i is not None and i < 4:
                    w, lo, fits = LOGPS[i][0][k], LOGPS[i][1][k], True
                else:  # training and test pairs do not count; extra validation pairs are not scored by c
                    w, lo, fits = -1.0, -2.0, not (i is not None and n == "c")
                nan = float("nan")
                rows[n].append(
                    (pid, split, float(w) if fits else nan, float(lo) if fits else nan, 3, 3, fits)
                )
    for n in NAMES:
        table = pa.Table.from_pylist(
            [dict(zip(SCHEMA.names, r, strict=True)) for r in rows[n]], schema=SCHEMA
        )
        meta = {"reference": n, "prepared_digest": digest}
        (tmp_path / "scores").mkdir(exist_ok=True)
        pq.write_table(
            table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), tmp_path / f"scores/{n}.parquet"
        )
    return {"cfg": cfg, "params": params, "val": len(val_ids), "tmp": tmp_path}


def test_stage_writes_metrics_plots_report_and_an_mlflow_run(project):
    import pandas as pd
    from mlflow import MlflowClient

    from mrpo.reporting.diagnostics import full_metrics
    from mrpo.stages.diagnose import diagnose

    cfg = project["cfg"]
    d = diagnose(cfg)
    assert d.pairs == 4 and d.skipped == project["val"] - 4

    # the DVC metric: one number per reference (`dvc metrics show` fits a terminal); the rest: full_metrics
    assert json.loads(open(cfg.diagnose.metrics_file).read()) == {"accuracy": {"a": 0.5, "b": 0.5, "c": 0.75}}
    metrics = full_metrics(d)
    assert metrics["pairs"] == 4 and metrics["split"] == "val"
    refs = metrics["references"]
    assert [refs[n]["preference_accuracy"] for n in NAMES] == [0.5, 0.5, 0.75]
    assert [refs[n]["margin_mean"] for n in NAMES] == [0.25, 0.5, -0.25]
    assert [refs[n]["clipped_fraction"] for n in NAMES] == [0.0, 0.375, 0.75]
    assert metrics["pairs_of_references"]["a~c"]["agreement"] == 0.75
    assert metrics["weights"]["vdw"] == pytest.approx({"a": 1 / 6, "b": 1 / 3, "c": 1 / 2})
    assert "fixed" not in metrics["weights"]  # train.fixed_weights is null

    csv = pd.read_csv(cfg.diagnose.plots_file)
    assert csv["reference"].tolist() == list(NAMES)
    assert csv["weight/vaw"].tolist() == pytest.approx([2 / 7, 2 / 7, 3 / 7])
    assert open(cfg.diagnose.image_file, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    report = open(cfg.diagnose.report_file).read()
    assert "| c | 0.750 | -0.250 | 3.202 | 0.750 |" in report
    assert "| a / b | 0.000 |" in report

    client = MlflowClient(cfg.tracking.tracking_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("mrpo").experiment_id], "tags.`mrpo.stage` = 'diagnose'"
    )
    assert run.data.metrics["diagnose/c/preference_accuracy"] == 0.75
    assert run.data.metrics["diagnose/weight/vaw/c"] == pytest.approx(3 / 7)
    assert run.data.params["train.epsilon"] == "0.1"
    files = {f.path for f in client.list_artifacts(run.info.run_id, "diagnostics")}
    assert files == {f"diagnostics/diagnostics.{x}" for x in ("json", "csv", "png", "md")}


def test_cli_without_a_score_file_exits_2_with_one_line(project):
    (project["tmp"] / "scores" / "b.parquet").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "mrpo.cli", "--params", str(project["params"]), "diagnose"],
        capture_output=True,
        text=True,
        cwd=project["tmp"],
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("mrpo diagnose: ")
    assert "mrpo score --reference b" in proc.stderr
