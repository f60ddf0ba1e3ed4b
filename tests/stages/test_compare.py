"""`mrpo compare`: its members, its per-pair scoring, its summary (numbers by hand), and a real small run on
the tiny zoo's scores (real training, real lm-eval, a real MLflow store)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import config, prefect_api

from mrpo.evaluation.held_out import pair_correct
from mrpo.reporting.comparison import difference_rows, summarise, table_rows
from mrpo.stages.compare import Member, MemberResult, comparison_members


def test_members_are_every_configuration_for_every_seed():
    members = comparison_members(["a", "b", "c"], [0, 1], ["uniform", "vdw"])
    labels = [m.label for m in members if m.seed == 0]
    assert labels == ["dpo:a", "dpo:b", "dpo:c", "mrpo:uniform", "mrpo:vdw", "multi_dpo"]
    assert [m.label for m in members if m.seed == 1] == labels and len(members) == 12
    dpo_b = members[1]
    assert (dpo_b.objective, dpo_b.references) == ("dpo", ("b",))
    assert members[4] == Member("mrpo:vdw", 0, "mrpo", "vdw", ("a", "b", "c"))
    default = comparison_members(["a", "b"], [0], dpo_references=["a"], multi_dpo=False)
    assert [m.label for m in default] == ["dpo:a"] + [
        f"mrpo:{s}" for s in ("uniform", "arwc", "vdw", "vaw", "window", "thompson")
    ]
    assert [m.label for m in comparison_members(["a"], [0])] == ["dpo:a"]  # one reference: nothing to combine


def test_pair_correct_is_the_reward_accuracy_against_the_anchor_per_pair():
    pi_w, pi_l = np.array([-5.0, -5.0, -5.0, -7.0]), np.array([-6.0, -5.0, -4.0, -7.0])
    r_w, r_l = np.array([-5.0, -5.0, -5.0, -6.0]), np.array([-6.5, -5.0, -5.0, -7.5])
    # gaps / beta: (0 - 0.5)... worked out: pair 0: (-5+5) - (-6+6.5) = -0.5; 1: 0 (a tie); 2: 0 - 1 = -1;
    # 3: (-7+6) - (-7+7.5) = -1.5
    assert pair_correct(pi_w, pi_l, r_w, r_l, 0.1).tolist() == [0, 0, 0, 0]
    assert pair_correct(r_w + 1, r_l, r_w, r_l, 0.1).tolist() == [1, 1, 1, 1]
    tiny = 0.5e-4  # below fp32's tie tolerance (1e-4 nats): still a tie
    assert pair_correct(r_w + tiny, r_l, r_w, r_l, 0.1, torch.float32).tolist() == [0, 0, 0, 0]


def _result(label, seed, correct, **scores):
    objective = label.split(":")[0]
    return MemberResult(
        Member(label, seed, objective, "uniform", ("a",)), np.array(correct, float), scores, 1.0
    )


def test_summary_by_hand():
    results = [
        _result("dpo:a", 0, [1, 0, 0, 1], **{"policy/t/acc": 0.30}),
        _result("dpo:a", 1, [0, 0, 1, 1], **{"policy/t/acc": 0.40}),
        _result("mrpo:vdw", 0, [1, 1, 0, 1], **{"policy/t/acc": 0.35}),
        _result("mrpo:vdw", 1, [1, 0, 1, 1], **{"policy/t/acc": 0.50}),
    ]
    base, vdw = summarise(results, "dpo:a", resamples=4000)
    assert base["label"] == "dpo:a" and base["seeds"] == 2 and base["accuracy"] == 0.5 and "diff" not in base
    assert base["accuracy_low"] <= 0.5 <= base["accuracy_high"]
    # vdw wins exactly one pair more than dpo:a on each seed: +1/4, and never loses a pair
    assert vdw["accuracy"] == 0.75 and vdw["diff"] == 0.25
    assert 0 <= vdw["diff_low"] <= 0.25 <= vdw["diff_high"]
    assert vdw["p"] > 0.05  # four pairs: a resample can draw only the pairs where they tie
    # lm-eval: t interval over two seeds and the paired t-test (differences 0.05 and 0.10)
    assert vdw["policy/t/acc"] == pytest.approx(0.425)
    assert vdw["policy/t/acc diff"] == pytest.approx(0.075)
    half = 12.706204736 * (0.05 / math.sqrt(2)) / math.sqrt(2)  # t(0.975, 1) * sd / sqrt(n)
    assert vdw["policy/t/acc diff high"] == pytest.approx(0.075 + half)
    # paired t: t = 0.075 / (sd / sqrt(2)) = 3 with 1 degree of freedom, p = 2 * (1/2 - atan(3) / pi)
    assert vdw["policy/t/acc p"] == pytest.approx(1 - 2 * math.atan(3) / math.pi)
    assert difference_rows([base, vdw], "dpo:a")[1] == [
        ["mrpo:vdw", "test reward acc vs anchor", vdw_acc := difference_rows([vdw], "dpo:a")[1][0][2]]
        + [f"{vdw['p']:.3f}", f"{vdw['p_holm']:.3f}"],
        ["mrpo:vdw", "t/acc", "+0.075 [-0.243, +0.393]", "0.205", f"{vdw['policy/t/acc p_holm']:.3f}"],
    ]
    assert vdw_acc.startswith("+0.250 [")
    header, body = table_rows([base, vdw], "dpo:a")
    assert header[:3] == ["configuration", "seeds", "test reward acc vs anchor [95% CI]"]
    assert body[1][:2] == ["mrpo:vdw", "2"] and body[1][2].startswith("0.750 [")
    assert header[3:] == ["t/acc [95% CI]"] and body[1][3].startswith("0.425 [")
    wide = [dict(r, **{"policy/t/acc_norm": 0.4, "policy/u/em": 0.1}) for r in (base, vdw)]
    assert table_rows(wide, "dpo:a", 0.9)[0][3:] == ["t/acc [90% CI]", "t/acc_norm [90% CI]", "u/em [90% CI]"]
    assert table_rows(wide, "dpo:a", compact=True)[0][3:] == ["t/acc [95% CI]", "u/em [95% CI]"]


@pytest.mark.slow
def test_a_small_comparison_end_to_end(scored, tmp_path):
    import dataclasses

    import pandas as pd
    from mlflow import MlflowClient

    from mrpo.evaluation.held_out import policy_logps
    from mrpo.runtime import resolve_device
    from mrpo.stages.compare import report, run_all, start
    from mrpo.tracking.runs import runs_table
    from mrpo.training.policy import load_policy

    cfg = config(scored, tmp_path)
    cfg = dataclasses.replace(
        cfg,
        evaluate=dataclasses.replace(cfg.evaluate, device="cpu"),
        compare=dataclasses.replace(
            cfg.compare,
            seeds=(0, 1),
            train_pairs=32,
            num_epochs=1.0,
            dpo_references=("anchor",),
            strategies=("vdw",),
            multi_dpo=False,
            lm_eval_limit=4,
            bootstrap=200,
            output_dir=str(tmp_path / "sweeps"),
            plots_file=str(tmp_path / "plots/comparison.csv"),
            image_file=str(tmp_path / "plots/comparison.png"),
        ),
    )
    comparison = start(cfg, "cmp-test")
    assert [m.label for m in comparison.members] == ["dpo:anchor", "mrpo:vdw"] * 2
    # the comparison's policy log-probs are the scoring's: the untrained anchor ties the stored scores
    test = comparison.datasets["test"]
    pi_w, _ = policy_logps(
        load_policy(cfg, resolve_device("cpu")), test, comparison.tokenizer.pad_token_id, torch.float32
    )
    stored = np.array([e.ref_chosen_logps[0] for e in test.examples])
    assert np.abs(pi_w - stored).max() < 1e-4

    results = run_all(comparison)
    assert [r.steps for r in results] == [4] * 4  # 32 pairs, batch 8, 1 epoch (train.max_steps ignored)
    out = report(comparison, results)
    members = pd.read_csv(tmp_path / "sweeps/cmp-test/members.csv")
    assert len(members) == 4 and set(members["label"]) == {"dpo:anchor", "mrpo:vdw"}
    assert members["test_reward_accuracy_vs_anchor"].between(0, 1).all()
    assert any(c.startswith("policy/mrpo_facts_mc/") for c in members.columns)  # lm-eval ran per member
    summary = pd.read_csv(tmp_path / "sweeps/cmp-test/comparison.csv")
    vdw = summary.set_index("label").loc["mrpo:vdw"]
    assert vdw["diff"] == pytest.approx(
        vdw["accuracy"] - summary.set_index("label").loc["dpo:anchor", "accuracy"]
    )
    md = (tmp_path / "sweeps/cmp-test/comparison.md").read_text()
    assert "Reference diagnostics" in md and "| mrpo:vdw | 2 |" in md
    assert (tmp_path / "plots/comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "mrpo:vdw" in out["table"]

    client = MlflowClient(cfg.tracking.tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("mrpo").experiment_id], "tags.`mrpo.sweep` = 'cmp-test'"
    )
    parent = next(r for r in runs if r.data.tags["mrpo.kind"] == "compare")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and "mrpo.vdw/diff" in parent.data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")} >= {
        "comparison/comparison.md",
        "comparison/comparison.png",
    }
    table = runs_table(cfg.tracking.tracking_uri, "mrpo", {"mrpo.kind": "compare-member"})
    assert len(table.splitlines()) == 2 + 4 and "acc_vs_anchor" in table


@pytest.mark.slow
def test_a_stopped_comparison_keeps_its_report_and_resumes_with_its_id(scored, tmp_path):
    import dataclasses

    import pandas as pd
    from mlflow import MlflowClient

    from mrpo.stages.compare import run_member, run_members, start

    cfg = config(scored, tmp_path)
    cfg = dataclasses.replace(
        cfg,
        compare=dataclasses.replace(
            cfg.compare,
            seeds=(0,),
            train_pairs=16,
            num_epochs=1.0,
            dpo_references=("anchor",),
            strategies=("vdw",),
            multi_dpo=False,
            lm_eval_limit=0,
            bootstrap=100,
            output_dir=str(tmp_path / "sweeps"),
            plots_file=str(tmp_path / "plots/comparison.csv"),
            image_file=str(tmp_path / "plots/comparison.png"),
        ),
    )
    comparison = start(cfg, "stopped")

    def stop_at_the_second(c, member):
        if member.label != "dpo:anchor":
            raise KeyboardInterrupt  # Ctrl-C, or SIGTERM through mrpo's handler
        return run_member(c, member)

    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_members(comparison, said.append, stop_at_the_second)
    assert said[0].startswith("[1/2] dpo:anchor")
    members = pd.read_csv(tmp_path / "sweeps/stopped/members.csv")
    assert members["label"].tolist() == ["dpo:anchor"]
    assert members["test_reward_accuracy_vs_anchor"].between(0, 1).all()
    md = (tmp_path / "sweeps/stopped/comparison.md").read_text()
    assert "partial: 1 of 2 members done" in md and "| dpo:anchor | 1 |" in md

    # run again with its id: the member done is kept, only the other one trains
    resumed = start(cfg, "stopped")
    assert resumed.untrained.reused
    said.clear()
    results = run_members(resumed, said.append)
    assert [r.reused for r in results] == [True, False]
    assert said[0].endswith("kept from an earlier run)") and "kept" not in said[1]
    assert results[0].accuracy == members["test_reward_accuracy_vs_anchor"][0]
    assert results[0].correct.shape == results[1].correct.shape == (len(resumed.datasets["test"]),)
    client = MlflowClient(cfg.tracking.tracking_uri)
    kept_run = client.get_run(results[0].mlflow_run_id)  # in the UI, under the comparison run that used it
    assert kept_run.data.tags["mlflow.parentRunId"] == resumed.parent_run.run_id
    assert client.get_run(comparison.parent_run.run_id).info.status == "KILLED"  # the stopped one

    # another setting: nothing is reused
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, beta=cfg.train.beta * 2))
    again = start(changed, "stopped", track=False)
    assert not again.untrained.reused
    assert not run_member(again, again.members[0]).reused


@pytest.mark.slow
def test_the_compare_flow_runs_each_member_as_a_task_and_publishes_the_report(
    scored, prefect_server, tmp_path, monkeypatch
):
    import yaml

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from prefect.client.orchestration import get_client

    from flows.sweep import compare_flow

    project = tmp_path / "project"
    project.mkdir()
    raw = yaml.safe_load(scored["params"].read_text())  # absolute data and score paths: nothing is re-made
    raw["evaluate"]["device"] = "cpu"
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    overrides = {
        "compare.seeds": [3],
        "compare.train_pairs": 16,
        "compare.num_epochs": 1,
        "compare.dpo_references": ["anchor", "gpt2_char"],
        "compare.strategies": [],
        "compare.multi_dpo": False,
        "compare.lm_eval_limit": 0,
        "compare.bootstrap": 100,
    }
    with prefect_api(prefect_server):
        out = compare_flow(str(project), overrides, "flow-test")
        with get_client(sync_client=True) as client:
            (run,) = client.read_flow_runs()
            tasks = sorted(t.name for t in client.read_task_runs() if t.flow_run_id == run.id)
            artifacts = client.read_artifacts()
    assert out["members"] == 2 and out["failed"] == 0 and run.state.is_completed()
    md = (project / "sweeps" / "flow-test" / "comparison.md").read_text()
    assert "| dpo:gpt2_char | 1 |" in md and "lm-eval: skipped" in md
    assert (project / "plots" / "comparison.png").is_file() and (project / "mlflow.db").is_file()
    assert tasks == ["dpo:anchor-s3", "dpo:gpt2_char-s3"]
    assert any(a.key == "comparison" and "dpo:gpt2_char" in a.data for a in artifacts)


def test_report_p_values_are_holm_over_configurations_x_metrics_and_the_untrained_anchor_has_a_row():
    from mrpo.core.stats import holm_adjusted
    from mrpo.reporting.comparison import family_keys, verdict_lines

    rng = np.random.default_rng(0)
    results = []
    for seed in range(3):
        for k, label in enumerate(("dpo:a", "mrpo:vdw", "mrpo:vaw", "multi_dpo")):
            correct = (rng.random(40) < 0.5 + 0.1 * k).astype(float)
            scores = {"policy/t/acc": 0.6 - 0.02 * k + 0.01 * seed, "policy/u/em": 0.3 + 0.01 * rng.random()}
            results.append(_result(label, seed, correct, **scores))
    untrained = _result("untrained:a", 0, np.zeros(40), **{"policy/t/acc": 0.66, "policy/u/em": 0.31})
    rows = summarise(results, "dpo:a", resamples=500, untrained=untrained)

    assert rows[0]["label"] == "untrained:a" and rows[0]["untrained"] and rows[0]["accuracy"] == 0.0
    assert rows[0]["policy/t/acc"] == 0.66 and "p" not in rows[0] and "p_holm" not in rows[0]
    keys = family_keys(rows)
    assert len(keys) == 3 * 3  # three configurations besides the baseline x three metrics
    raw = [rows[i][k] for i, k in keys]
    assert [rows[i][f"{k}_holm"] for i, k in keys] == holm_adjusted(raw)
    assert all(rows[i][f"{k}_holm"] >= rows[i][k] for i, k in keys)

    header, body = table_rows(rows, "dpo:a")
    assert body[0][:3] == ["untrained:a", "-", "0.000 [0.000, 0.000]"] and body[0][3] == "0.660"
    diff_header, diffs = difference_rows(rows, "dpo:a")
    assert diff_header[-2:] == ["p", "p (Holm)"] and len(diffs) == 9
    assert {(d[0], d[1]) for d in diffs} == {
        (c, m)
        for c in ("mrpo:vdw", "mrpo:vaw", "multi_dpo")
        for m in ("test reward acc vs anchor", "t/acc", "u/em")
    }
    vaw_acc = next(r for r in rows if r["label"] == "mrpo:vaw")
    assert [d[3:] for d in diffs if d[:2] == ["mrpo:vaw", "t/acc"]] == [
        [f"{vaw_acc['policy/t/acc p']:.3f}", f"{vaw_acc['policy/t/acc p_holm']:.3f}"]
    ]
    lines = verdict_lines(rows, "dpo:a")
    assert lines[0].startswith("mrpo:vdw") is False and "of 9 differences" in lines[0]
    assert "t/acc: 4 of 4 configurations below the untrained anchor's 0.660." in lines


def test_library_logs_go_to_the_file_and_repeated_warnings_are_counted_once(tmp_path, capsys):
    import logging
    import warnings

    from mrpo.reporting.console import quiet_libraries

    def state():
        loggers = [logging.getLogger(n) for n in ("mrpo", "lm_eval", "transformers")]
        return [(lg.handlers[:], lg.propagate) for lg in loggers]

    before = state()
    with quiet_libraries(tmp_path / "run.log") as console, warnings.catch_warnings():
        warnings.simplefilter("always")
        for _ in range(3):
            logging.getLogger("lm_eval.evaluator").warning("generation_kwargs: %s. Ensure 'do_sample'", 16)
            warnings.warn("a library's warning", UserWarning, stacklevel=1)
        logging.getLogger("transformers").warning("loading weights")
        print("a progress bar")
        console.say("member 1 done")
    assert capsys.readouterr().out == "member 1 done\n"
    log = (tmp_path / "run.log").read_text()
    assert "loading weights" in log and "a progress bar" in log and log.count("do_sample") == 3
    lines = console.warning_lines()
    assert lines[0].startswith("7 library warning(s), 3 distinct") and len(lines) == 4
    assert lines[1].strip().startswith("3 x WARNING lm_eval.evaluator: generation_kwargs: 16.")
    assert state() == before  # the loggers are as they were
