"""The train stage: MRPOTrainer on real tiny models, real score files, a real MLflow store, real torchrun.

One scored project (tiny zoo, 200 synthetic pairs, three references scored) is
built once per module; each test trains a handful of steps into its own dirs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from helpers import REFERENCES, REPO_ROOT, CrashAtStep, SimulatedCrash, config, trl_dpo_trainer

from mrpo.config.load import load_config
from mrpo.core.metrics import LOGP_TIE_TOLERANCE
from mrpo.core.objective import Objective
from mrpo.data.preference import PreferenceCollator, build_preference_dataset
from mrpo.data.scorefile import load_reference_scores
from mrpo.errors import ScoreDataError
from mrpo.stages.train import train
from mrpo.training.setup import build_trainer, prepare_training

# ---------------------------------------------------------------- fixtures


def first_step_losses(cfg, steps: int = 1) -> tuple[list[dict], object]:
    """Train `steps` steps with the Trainer (no outputs besides checkpoints);
    the per-step logs and the trainer."""
    setup = prepare_training(cfg)
    trainer = build_trainer(cfg, setup)
    trainer.args.max_steps = steps
    trainer.args.save_strategy = "no"
    trainer.args.eval_strategy = "no"
    trainer.train()
    return [e for e in trainer.state.log_history if "loss" in e], trainer


# ---------------------------------------------------------------- learning and outputs


@pytest.fixture(scope="module")
def trained(scored, tmp_path_factory) -> dict:
    """One 40-step run of the train stage, with what it logged and printed; the tests below read it."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("trained")
    cfg = config(
        scored,
        tmp,
        **{
            "train.max_steps": 40,
            "train.batch_size": 16,
            # The tiny zoo knows no facts yet; pure preference learning at a high rate, with the default
            # profile's wide clip band, shows learning in 40 steps.
            "train.learning_rate": 3e-3,
            "train.sft_weight": 0.0,
            "train.epsilon": 0.9,
            "train.eval_steps": 20,
            "train.save_steps": 20,
            # 40 steps over 160 pairs learn measurably only in Trainer's random order: length-grouped steps
            # of this tiny set hold pairs of one kind each (tests/training/test_batching.py covers grouped).
            "train.batching": "padded",
        },
    )
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("mrpo")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                metrics = train(cfg)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
    from mrpo.tracking.store import read_run_record

    policy = Path(cfg.train.output_dir)
    return {
        "cfg": cfg,
        "metrics": metrics,
        "messages": [r.getMessage() for r in records],
        "printed": printed.getvalue(),
        "policy": policy,
        "record": read_run_record(policy),
        "tmp": tmp,
    }


def test_training_raises_heldout_reward_accuracy(trained):
    metrics, cfg = trained["metrics"], trained["cfg"]
    assert metrics["val_reward_accuracy_after"] > metrics["val_reward_accuracy_before"] + 0.1, metrics
    assert metrics["test_reward_accuracy_after"] > metrics["test_reward_accuracy_before"], metrics
    assert metrics["val_reward_margin_after"] > metrics["val_reward_margin_before"], metrics
    assert metrics["steps"] == 40 and metrics["references"] == 3

    # the DVC metric keeps the headline numbers under short names; the full record lies beside the policy,
    # without what differs run to run (wall time, throughput), so the same inputs give the same bytes
    from mrpo.stages.train import TIMINGS, TRAIN_RECORD

    on_disk = json.loads(Path(cfg.train.metrics_file).read_text())
    assert on_disk == pytest.approx(
        {
            "steps": 40,
            "train_loss": metrics["train_loss"],
            "val_accuracy": metrics["val_reward_accuracy_after"],
            "test_accuracy": metrics["test_reward_accuracy_after"],
        }
    )
    record = json.loads((trained["policy"] / TRAIN_RECORD).read_text())
    assert record == pytest.approx({k: v for k, v in metrics.items() if k not in TIMINGS})
    assert metrics["runtime_s"] > 0 and not set(TIMINGS) & set(record)


def test_training_progress_is_compact(trained):
    """A line about every 5% of the run and per evaluation, never a dict per step; the (uniform) reference
    weights once, readably."""
    messages = trained["messages"]
    steps = [m for m in messages if m.startswith("train: step ") and ": loss" not in m and " val:" not in m]
    assert 10 <= len(steps) <= 21 and steps[-1].startswith("train: step 40/40  loss 0."), steps
    assert sum(" val: loss" in m for m in messages) == 2 + 2  # at steps 20 and 40, before and after
    weight_lines = [m for m in messages if "reference weights" in m]
    assert weight_lines == [
        "train: reference weights (uniform, fixed): anchor 0.333, gpt2_char 0.333, llama_expert 0.333"
    ]
    assert "{'loss'" not in trained["printed"]


def test_training_writes_the_policy_and_its_curves(trained):
    cfg, metrics, policy = trained["cfg"], trained["metrics"], trained["policy"]
    assert (policy / "model.safetensors").is_file() and (policy / "tokenizer.json").is_file()
    assert not list(policy.glob("*.bin"))
    assert sorted(p.name for p in policy.parent.glob("*.mlflow_run.json")) == [
        f"{policy.name}.mlflow_run.json"
    ]

    plots = pd.read_csv(cfg.train.plots_file)
    train_rows = plots.dropna(subset=["loss"])
    assert list(train_rows["step"]) == list(range(1, 41))
    for column in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "clipped_fraction",
        "learning_rate",
        "weight/anchor",
        "weight/gpt2_char",
        "weight/llama_expert",
    ):
        assert train_rows[column].notna().all(), column
    assert "tokens_per_second" not in plots.columns  # throughput differs run to run: MLflow has it
    weights = train_rows[["weight/anchor", "weight/gpt2_char", "weight/llama_expert"]]
    assert weights.sum(axis=1).to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert weights.to_numpy() == pytest.approx(1 / 3, abs=1e-6)  # uniform
    assert plots["eval_rewards/accuracy"].notna().sum() == 2  # validation at steps 20 and 40
    losses = train_rows["loss"].to_numpy()
    assert losses[-10:].mean() < losses[:10].mean() - 0.02, losses  # the training loss goes down
    # Trailing 10-step means beside the raw curves, and the validation curve from step 0 (before training).
    assert train_rows["loss_smooth"].iloc[9] == pytest.approx(losses[:10].mean())
    assert train_rows["rewards/accuracy_smooth"].iloc[-1] == pytest.approx(
        train_rows["rewards/accuracy"].iloc[-10:].mean()
    )
    validation = pd.read_csv(Path(cfg.train.plots_dir) / "validation.csv")
    assert list(validation["step"]) == [0, 20, 40]
    assert validation["val_reward_accuracy"].iloc[0] == pytest.approx(metrics["val_reward_accuracy_before"])
    assert validation["val_reward_accuracy"].iloc[-1] == pytest.approx(metrics["val_reward_accuracy_after"])
    for png in ("loss.png", "reward_accuracy.png", "reference_weights.png"):
        assert (Path(cfg.train.plots_dir) / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def _anchor_score_sha(cfg) -> str:
    import hashlib

    return hashlib.sha256((Path(cfg.score.output_dir) / "anchor.parquet").read_bytes()).hexdigest()


def test_the_mlflow_run_records_params_curves_and_lineage(trained):
    """Every param, the reference set, per-step curves (one name per quantity), tags for the runs table."""
    from mlflow import MlflowClient

    cfg, metrics, policy, record = trained["cfg"], trained["metrics"], trained["policy"], trained["record"]
    client = MlflowClient(record.tracking_uri)
    run = client.get_run(record.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.objective"] == "mrpo"
    assert run.data.params["reference_set.gpt2_char.model"].endswith("gpt2_char")
    score_sha = run.data.params["reference_set.anchor.score_sha256"]
    assert score_sha == _anchor_score_sha(cfg)
    curve = client.get_metric_history(record.run_id, "loss")
    assert [m.step for m in curve] == list(range(1, 41))
    assert len(client.get_metric_history(record.run_id, "weight/llama_expert")) == 40
    assert run.data.tags["mrpo.policy_dir"] == str(policy.resolve())
    listing = json.loads(
        Path(client.download_artifacts(record.run_id, "policy.json", str(trained["tmp"]))).read_text()
    )
    assert listing["files"]["model.safetensors"] == (policy / "model.safetensors").stat().st_size
    # One name per quantity: validation is eval_* from step 0 (before training) to the last step (after), test
    # is test_* at both ends; nothing under final/ or val_*; epoch once per logged step.
    val_curve = client.get_metric_history(record.run_id, "eval_rewards/accuracy")
    assert [m.step for m in val_curve] == [0, 20, 40]
    assert val_curve[0].value == pytest.approx(metrics["val_reward_accuracy_before"])
    assert val_curve[-1].value == pytest.approx(metrics["val_reward_accuracy_after"])
    test_curve = client.get_metric_history(record.run_id, "test_loss")
    assert [(m.step, m.value) for m in test_curve] == [
        (0, pytest.approx(metrics["test_loss_before"])),
        (40, pytest.approx(metrics["test_loss_after"])),
    ]
    names = set(run.data.metrics)
    assert not {n for n in names if n.startswith(("final/", "val_")) or n.endswith("_runtime")}, names
    assert {"train_loss", "train_pairs", "runtime_s"} <= names
    assert run.data.metrics["train_loss"] == pytest.approx(metrics["train_loss"])
    assert len(client.get_metric_history(record.run_id, "train_loss")) == 1
    epochs = [m.step for m in client.get_metric_history(record.run_id, "epoch")]
    assert epochs == list(range(1, 41))
    # Key settings and scores as tags (runs-table columns), and the lineage whatever started the run.
    tags = run.data.tags
    assert tags["mrpo.strategy"] == "uniform" and tags["mrpo.beta"] == "0.1" and tags["mrpo.seed"] == "0"
    assert tags["mrpo.score.val_reward_accuracy_after"] == f"{metrics['val_reward_accuracy_after']:.4f}"
    assert tags["mrpo.launcher"] == "mrpo" and "mrpo.git_commit" in tags
    from mrpo.data.prepared import prepared_digest

    assert tags["mrpo.prepared_digest"] == prepared_digest(cfg.data.output_dir)
    assert tags["mrpo.reference.anchor.score_sha256"] == score_sha
    artifacts = {f.path for d in ("plots", "metrics") for f in client.list_artifacts(record.run_id, d)}
    assert {
        "plots/train.csv",
        "plots/validation.csv",
        "plots/loss.png",
        "plots/reward_accuracy.png",
        "plots/reference_weights.png",
        "metrics/train.json",
    } <= artifacts
    artifact = client.download_artifacts(record.run_id, "reference_set.json", str(trained["tmp"]))
    assert [r["name"] for r in json.loads(Path(artifact).read_text())["references"]] == list(REFERENCES)


def test_the_mlflow_run_records_the_datasets_and_the_model(trained):
    """The Datasets column: the three prepared splits with their digests and source files; the Models column:
    the policy as a logged (external) model with its card, linked as the run's output."""
    import hashlib

    from mlflow import MlflowClient

    cfg, policy, record = trained["cfg"], trained["policy"], trained["record"]
    client = MlflowClient(record.tracking_uri)
    run = client.get_run(record.run_id)
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"prepared/train", "prepared/val", "prepared/test"}
    train_input = inputs["prepared/train"]
    train_file = Path(cfg.data.output_dir) / "train.parquet"
    assert train_input.dataset.digest == hashlib.sha256(train_file.read_bytes()).hexdigest()[:32]
    assert json.loads(train_input.dataset.source)["uri"] == str(train_file.resolve())
    assert {t.key: t.value for t in train_input.tags}["mlflow.data.context"] == "training"
    assert json.loads(train_input.dataset.profile)["num_rows"] == len(pd.read_parquet(train_file))
    [output] = run.outputs.model_outputs
    assert output.step == 40 and run.data.tags["mrpo.model_id"] == output.model_id
    model = client.get_logged_model(output.model_id)
    assert model.name == "policy" and model.source_run_id == record.run_id
    assert model.tags["mrpo.policy_dir"] == str(policy.resolve()) and model.params["train.beta"] == "0.1"
    assert {a.path for a in client.list_logged_model_artifacts(output.model_id)} >= {"MLmodel", "README.md"}


def test_the_model_card_names_what_made_the_policy_and_only_what_reproduces(trained):
    """Anchor, references with hashes, hyperparameters, data digest, metrics and the MLflow run's name; no run
    id, tracking URI or git commit, which would make the policy directory differ on every run."""
    from mlflow import MlflowClient

    from mrpo.data.prepared import prepared_digest

    cfg, metrics, record = trained["cfg"], trained["metrics"], trained["record"]
    run_name = MlflowClient(record.tracking_uri).get_run(record.run_id).info.run_name
    card = (trained["policy"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"`{_anchor_score_sha(cfg)}`" in card and prepared_digest(cfg.data.output_dir) in card
    assert f"run `{run_name}`" in card
    assert record.run_id not in card and record.tracking_uri not in card and "git commit `" not in card
    assert "| `train.strategy` | uniform |" in card
    val_row = (
        f"| val | reward accuracy | {metrics['val_reward_accuracy_before']:.4f} | "
        f"{metrics['val_reward_accuracy_after']:.4f} |"
    )
    assert val_row in card


def test_evaluate_reopens_the_run_that_trained_the_policy(trained):
    import mlflow
    from mlflow import MlflowClient

    from mrpo.tracking.tracker import open_pipeline_run

    record = trained["record"]
    with open_pipeline_run(trained["cfg"]) as active:
        assert active.info.run_id == record.run_id
        mlflow.log_metric("eval_probe", 1.0)
    assert MlflowClient(record.tracking_uri).get_run(record.run_id).data.metrics["eval_probe"] == 1.0


def test_step0_policy_logps_equal_anchor_scores(scored, tmp_path):
    """Training tokenizes exactly as scoring did:
    the untouched policy reproduces the anchor's stored log-probs."""
    cfg = config(scored, tmp_path)
    setup = prepare_training(cfg)
    trainer = build_trainer(cfg, setup)
    examples = [setup.datasets["train"][i] for i in range(16)]
    batch = PreferenceCollator(setup.tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        pi_w, pi_l = trainer._policy_logps(trainer.model.eval(), batch)
    anchor = setup.names.index("anchor")
    assert pi_w.numpy() == pytest.approx(batch["ref_chosen_logps"][:, anchor].numpy(), abs=1e-4)
    assert pi_l.numpy() == pytest.approx(batch["ref_rejected_logps"][:, anchor].numpy(), abs=1e-4)

    # Hence with K = 1 (dpo against the anchor) the first loss is exactly the sigmoid loss at h = 0: log 2.
    dpo = config(scored, tmp_path / "dpo", **{"train.objective": "dpo"})
    dpo_setup = prepare_training(dpo)
    dpo_trainer = build_trainer(dpo, dpo_setup)
    dpo_batch = PreferenceCollator(dpo_setup.tokenizer.pad_token_id)(
        [dpo_setup.datasets["train"][i] for i in range(16)]
    )
    with torch.no_grad():
        loss = dpo_trainer.compute_loss(dpo_trainer.model.eval(), dpo_batch).item()
    assert loss == pytest.approx(math.log(2), abs=1e-4)


# ---------------------------------------------------------------- parity


def trl_loss_on(examples, model, tokenizer, out_dir, beta: float, loss_type: str | list, **dpo_args) -> float:
    """TRL DPOTrainer's loss on our token ids and our stored (K = 1) reference log-probs,
    `model` in train mode."""
    rows = [
        {
            "prompt_ids": e.chosen.input_ids[: e.chosen.prompt_length],
            "chosen_ids": e.chosen.input_ids[e.chosen.prompt_length :],
            "rejected_ids": e.rejected.input_ids[e.rejected.prompt_length :],
            "ref_chosen_logps": float(e.ref_chosen_logps[0]),
            "ref_rejected_logps": float(e.ref_rejected_logps[0]),
        }
        for e in examples
    ]
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    trl = trl_dpo_trainer(model, tokenizer, rows, out_dir, beta=beta, loss_type=types, **dpo_args)
    model.train()
    with torch.no_grad():
        return trl.compute_loss(model, trl.data_collator(rows)).item()


def test_k1_first_step_loss_equals_trl_dpo(scored, tmp_path):
    """Objective dpo (reference gpt2_char) == TRL DPOTrainer fed the same token ids
    and the same precomputed ref log-probs."""
    from mrpo.modeling.models import load_model

    cfg = config(scored, tmp_path, **{"train.objective": "dpo", "train.dpo_reference": "gpt2_char"})
    setup = prepare_training(cfg)
    ours = build_trainer(cfg, setup)
    examples = [setup.datasets["train"][i] for i in range(8)]
    batch = PreferenceCollator(setup.tokenizer.pad_token_id)(examples)
    ours.model.train()
    our_loss = ours.compute_loss(ours.model, batch).item()

    trl_model = load_model(cfg.anchor, "cpu", torch.float32)
    trl_loss = trl_loss_on(examples, trl_model, setup.tokenizer, tmp_path / "trl", cfg.train.beta, "sigmoid")
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)
    assert our_loss != pytest.approx(math.log(2), abs=1e-3)  # a non-anchor reference: not the trivial value


def moved_off_anchor(cfg, pairs: int = 8):
    """The trainer with its policy moved off the anchor (where every log-ratio is 0 and a loss says little),
    the first `pairs` training examples and their batch, in training mode."""
    setup = prepare_training(cfg)
    ours = build_trainer(cfg, setup)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    examples = [setup.datasets["train"][i] for i in range(pairs)]
    batch = PreferenceCollator(setup.tokenizer.pad_token_id)(examples)
    ours.model.train()
    return setup, ours, examples, batch


def test_k1_ipo_norm_equals_trl_ipo(scored, tmp_path):
    """loss_type ipo_norm with K = 1 == TRL's ipo (per-token log-ratios), on a policy moved off the anchor."""
    cfg = config(scored, tmp_path, **{"train.objective": "dpo", "train.loss_type": "ipo_norm"})
    setup, ours, examples, batch = moved_off_anchor(cfg)
    with torch.no_grad():
        our_loss = ours.compute_loss(ours.model, batch).item()

    trl_loss = trl_loss_on(examples, ours.model, setup.tokenizer, tmp_path / "trl", cfg.train.beta, "ipo")
    # IPO's loss is near (1 / (2 beta))^2 = 25 here, where one float32 step is 1.9e-6: agree within 2 of them.
    assert our_loss == pytest.approx(trl_loss, abs=4e-6)
    assert our_loss != pytest.approx((1 / (2 * cfg.train.beta)) ** 2, abs=1e-2)  # not the value at the anchor
    # the token-summed ipo is another loss: TRL's ipo is the length-normalised one
    plain = config(scored, tmp_path / "plain", **{"train.objective": "dpo", "train.loss_type": "ipo"})
    ours.objective = Objective.from_train_config(plain.train)
    with torch.no_grad():
        assert ours.compute_loss(ours.model, batch).item() != pytest.approx(trl_loss, abs=1e-2)


@pytest.mark.parametrize(
    "settings",
    [
        {"train.loss_type": "robust", "train.label_smoothing": 0.1},
        {"train.loss_type": "sigmoid_norm", "train.f_divergence_type": "js_divergence"},
        {"train.loss_type": "apo_down"},
        {"train.loss_type": "aot"},
        {"train.loss_type": "bco_pair"},
        {"train.loss_type": ["sigmoid", "bco_pair", "sft"], "train.loss_weights": [0.8, 0.2, 1.0]},
    ],
    ids=lambda s: "-".join(str(v) for v in s.values()),
)
def test_k1_family_losses_equal_trl_through_the_model(scored, tmp_path, settings):
    """The DPO family with K = 1 == TRL's DPOTrainer on the same model, token ids and stored reference
    log-probs (tests/core/test_loss_family.py checks every loss type on given log-probs; this, the whole
    step)."""
    cfg = config(scored, tmp_path, **{"train.objective": "dpo", **settings})
    setup, ours, examples, batch = moved_off_anchor(cfg)
    with torch.no_grad():
        our_loss = ours.compute_loss(ours.model, batch).item()
    t = cfg.train
    types = [t.loss_type] if isinstance(t.loss_type, str) else list(t.loss_type)
    trl_loss = trl_loss_on(
        examples,
        ours.model,
        setup.tokenizer,
        tmp_path / "trl",
        t.beta,
        types,
        loss_weights=list(t.loss_weights) if t.loss_weights else None,
        label_smoothing=t.label_smoothing,
        f_divergence_type=t.f_divergence_type,
    )
    print(f"{types}: ours {our_loss:.8f}, TRL {trl_loss:.8f}, |difference| {abs(our_loss - trl_loss):.1e}")
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)


@pytest.mark.parametrize(
    "settings",
    [
        {"train.dpo_reference": "gpt2_char"},
        {"train.loss_type": "ipo_norm"},
        {"train.loss_type": ["sigmoid", "bco_pair"], "train.loss_weights": [0.8, 0.2]},
    ],
    ids=lambda s: "-".join(str(v) if not isinstance(v, list) else "+".join(map(str, v)) for v in s.values()),
)
def test_k1_wpo_weighting_equals_trl_use_weighting(scored, tmp_path, settings):
    """train.use_weighting with K = 1 == TRL's DPOTrainer with use_weighting=True on the same model, token ids
    and stored reference log-probs: the whole step, the policy's log sum p^2 from our logits against TRL's
    fused head."""
    cfg = config(scored, tmp_path, **{"train.objective": "dpo", "train.use_weighting": True, **settings})
    setup, ours, examples, batch = moved_off_anchor(cfg)
    with torch.no_grad():
        our_loss = ours.compute_loss(ours.model, batch).item()
        _, _, pair_weights = ours._policy_forward(ours.model, batch)
    t = cfg.train
    types = [t.loss_type] if isinstance(t.loss_type, str) else list(t.loss_type)
    types = [{"ipo_norm": "ipo"}.get(x, x) for x in types]  # TRL's ipo is the per-token one
    trl_args = {"loss_weights": list(t.loss_weights) if t.loss_weights else None}
    trl_loss = trl_loss_on(
        examples, ours.model, setup.tokenizer, tmp_path / "trl", t.beta, types, use_weighting=True, **trl_args
    )
    unweighted = trl_loss_on(
        examples, ours.model, setup.tokenizer, tmp_path / "trl0", t.beta, types, **trl_args
    )
    print(
        f"WPO {types}: ours {our_loss:.8f}, TRL {trl_loss:.8f}, |difference| {abs(our_loss - trl_loss):.1e}"
    )
    # 1e-6, or 2 float32 ulps of the loss where that is more (IPO's weighted loss is ~103: 1 ulp is 7.6e-6)
    assert our_loss == pytest.approx(trl_loss, abs=max(1e-6, 2 * torch.finfo(torch.float32).eps * trl_loss))
    assert our_loss != pytest.approx(unweighted, rel=1e-2)  # the weights matter here
    assert (pair_weights > 0).all() and pair_weights.std() > 0


def test_dpo_with_reference_k_equals_mrpo_with_only_reference_k(scored, tmp_path):
    cfg_dpo = config(
        scored, tmp_path / "dpo", **{"train.objective": "dpo", "train.dpo_reference": "llama_expert"}
    )
    dpo_logs, _ = first_step_losses(cfg_dpo, steps=3)

    # mrpo restricted to reference k: the same trainer, its data joined with k's scores only.
    cfg_mrpo = config(scored, tmp_path / "mrpo")
    setup = prepare_training(cfg_mrpo)
    only_k = [s for s in setup.scores if s.name == "llama_expert"]
    for split in ("train", "val", "test"):
        pairs = pd.read_parquet(Path(cfg_mrpo.data.output_dir) / f"{split}.parquet")
        setup.datasets[split] = build_preference_dataset(
            pairs, split, only_k, setup.tokenizer, max_length=64, chat_template=False
        )
    from mrpo.core.weighting import make_strategy

    setup.strategy, setup.names = (
        make_strategy("uniform", 1, fixed_weights=None, window_size=16, seed=0),
        ["llama_expert"],
    )
    trainer = build_trainer(cfg_mrpo, setup)
    trainer.args.max_steps, trainer.args.save_strategy, trainer.args.eval_strategy = 3, "no", "no"
    trainer.train()
    mrpo_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["loss"] for e in mrpo_logs] == pytest.approx([e["loss"] for e in dpo_logs], abs=1e-6)
    assert mrpo_logs[0]["loss"] != pytest.approx(math.log(2), abs=1e-3)


# ---------------------------------------------------------------- every objective and strategy


@pytest.mark.parametrize(
    "overrides",
    [
        {"train.strategy": "uniform"},
        {"train.strategy": "fixed", "train.fixed_weights": [2.0, 1.0, 1.0]},
        {"train.strategy": "arwc"},
        {"train.strategy": "vdw"},
        {"train.strategy": "vaw"},
        {"train.strategy": "window"},
        {"train.strategy": "thompson"},
        {"train.objective": "multi_dpo", "train.strategy": "arwc"},
        {"train.loss_type": "ipo", "train.adaptive_epsilon": False},
        {"train.loss_type": "hinge", "train.label_smoothing": 0.0, "train.sft_weight": 0.5},
        {"train.label_smoothing": 0.2, "train.gradient_accumulation_steps": 2},
        {"train.lora.enabled": True, "train.gradient_checkpointing": True},
        {"train.use_weighting": True},
        {"train.use_weighting": True, "train.objective": "multi_dpo", "train.gradient_accumulation_steps": 2},
    ],
    ids=lambda o: "-".join(f"{k.split('.')[-1]}={v}" for k, v in o.items()),
)
def test_each_objective_and_strategy_trains_and_logs_weights(scored, tmp_path, overrides):
    cfg = config(scored, tmp_path, **{"train.max_steps": 3, **overrides})
    logs, trainer = first_step_losses(cfg, steps=3)
    assert len(logs) == 3
    for entry in logs:
        assert math.isfinite(entry["loss"])
        weights = [entry[f"weight/{n}"] for n in REFERENCES]
        assert sum(weights) == pytest.approx(1.0, abs=1e-5)
        assert all(w >= 0 for w in weights)
        assert 0.0 <= entry["clipped_fraction"] <= 1.0
        assert {
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margin",
            "rewards/accuracy",
            "learning_rate",
        } <= set(entry)
    strategy = cfg.train.strategy
    w0 = [logs[0][f"weight/{n}"] for n in REFERENCES]
    if strategy == "uniform":
        assert w0 == pytest.approx([1 / 3] * 3, abs=1e-6)
    if strategy == "fixed":
        assert w0 == pytest.approx([0.5, 0.25, 0.25], abs=1e-6)
    if strategy in ("vdw", "vaw"):  # fitted on val before training: constant, and not uniform
        assert all([e[f"weight/{n}"] for n in REFERENCES] == pytest.approx(w0, abs=1e-6) for e in logs)
        assert w0 != pytest.approx([1 / 3] * 3, abs=1e-3)
    if strategy == "window":  # uniform until pairs have been seen, then moves
        assert w0 == pytest.approx([1 / 3] * 3, abs=1e-6)
        assert [logs[1][f"weight/{n}"] for n in REFERENCES] != pytest.approx(w0, abs=1e-4)
    if strategy == "thompson":
        assert [logs[1][f"weight/{n}"] for n in REFERENCES] != pytest.approx(w0, abs=1e-4)
    if cfg.train.lora.enabled:
        trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
    if cfg.train.sft_weight > 0:
        assert logs[0]["sft_nll"] > 0
    # WPO: the mean pair weight is logged, positive (and only with use_weighting)
    assert all(e["wpo_weight"] > 0 for e in logs) if cfg.train.use_weighting else "wpo_weight" not in logs[0]


def test_lora_policy_is_saved_merged_or_as_an_adapter(scored, tmp_path):
    from safetensors.torch import load_file

    anchor = load_file(Path(load_config(scored["params"]).anchor.model) / "model.safetensors")
    common = {
        "train.max_steps": 2,
        "train.lora.enabled": True,
        "train.lora.r": 4,
        "train.learning_rate": 5e-3,
    }
    merged = config(scored, tmp_path / "merged", **common)
    train(merged, track=False)
    policy = Path(merged.train.output_dir)
    assert not (policy / "adapter_config.json").exists()
    weights = load_file(policy / "model.safetensors")
    assert set(weights) == set(anchor) and not any(
        "lora_" in k for k in weights
    )  # plain weights, anchor's layout
    changed = [k for k in anchor if not torch.equal(anchor[k], weights[k])]
    assert changed and all("proj" in k for k in changed)  # only the LoRA-targeted projections moved

    adapter = config(scored, tmp_path / "adapter", **common, **{"train.lora.merge": False})
    train(adapter, track=False)
    policy = Path(adapter.train.output_dir)
    assert (policy / "adapter_config.json").is_file() and (policy / "adapter_model.safetensors").is_file()
    assert not (policy / "model.safetensors").exists()


# ---------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_after_kill_ends_with_the_same_metrics(scored, tmp_path, monkeypatch):
    """Thompson weighting (seeded RNG + online Beta state)
    and AdamW state survive a kill between checkpoints."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    common = {
        "train.max_steps": 6,
        "train.save_steps": 2,
        "train.eval_steps": 3,
        "train.strategy": "thompson",
    }
    straight = train(config(scored, tmp_path / "straight", **common), track=False)

    cfg = config(scored, tmp_path / "killed", **common)
    previous = Path(cfg.train.output_dir)
    previous.mkdir(parents=True)
    (previous / "model.safetensors").write_text("an earlier policy")
    with pytest.raises(SimulatedCrash):
        train(cfg, callbacks=[CrashAtStep(5)])
    assert (
        previous / "model.safetensors"
    ).read_text() == "an earlier policy"  # failed run: earlier policy intact
    ckpt = Path(cfg.train.checkpoint_dir) / "checkpoint-4"
    assert (ckpt / "mrpo_strategy_state.json").is_file()

    killed_run = json.loads((Path(cfg.train.checkpoint_dir) / "mrpo_run.json").read_text())["mlflow_run_id"]
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking.tracking_uri)
    assert client.get_run(killed_run).info.status == "FAILED"

    resumed = train(cfg)
    assert resumed["resumed"] is True
    from mrpo.tracking.store import read_run_record

    assert read_run_record(cfg.train.output_dir).run_id == killed_run  # the same MLflow run, continued
    assert client.get_run(killed_run).info.status == "FINISHED"
    # Tolerance: the same fp32 CPU arithmetic in the same order, so only float re-association could differ.
    for key in (
        "final_loss",
        "val_reward_accuracy_after",
        "val_reward_margin_after",
        "test_reward_margin_after",
        "val_loss_after",
    ):
        assert resumed[key] == pytest.approx(straight[key], abs=1e-6), key
    assert (previous / "model.safetensors").stat().st_size > 1000  # replaced by the real policy now


def test_changed_config_does_not_resume_foreign_checkpoints(scored, tmp_path):
    cfg = config(scored, tmp_path, **{"train.max_steps": 2, "train.save_steps": 2})
    train(cfg, track=False)
    assert (Path(cfg.train.checkpoint_dir) / "checkpoint-2").is_dir()
    changed = config(scored, tmp_path, **{"train.max_steps": 2, "train.save_steps": 2, "train.beta": 0.3})
    metrics = train(changed, track=False)
    assert metrics["resumed"] is False and metrics["steps"] == 2


# ---------------------------------------------------------------- distributed


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(scored, tmp_path):
    """torchrun, 2 CPU ranks x 4 pairs vs 1 process x 8 pairs: same data order, gradients averaged by DDP."""
    common = {
        "train.max_steps": 3,
        "train.strategy": "window",
        "train.device": "cpu",
        "train.save_steps": 1000,
    }
    single = train(config(scored, tmp_path / "one", **{**common, "train.batch_size": 8}), track=False)

    out = tmp_path / "two"
    overrides = {
        **common,
        "train.batch_size": 4,
        "train.output_dir": str(out / "policy"),
        "train.checkpoint_dir": str(out / "checkpoints"),
        "train.metrics_file": str(out / "metrics/train.json"),
        "train.plots_file": str(out / "plots/train.csv"),
        "train.plots_dir": str(out / "plots"),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO_ROOT / "tests/ddp_train.py"),
            str(scored["params"]),
            json.dumps(overrides),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    double = json.loads((out / "policy" / "train_metrics.json").read_text())  # the full record
    assert double["steps"] == single["steps"] == 3
    # Tolerance 1e-4: gloo all-reduce sums two half-batch gradients, a different float order than one batch.
    for key in ("final_loss", "val_loss_after", "val_reward_margin_after"):
        assert double[key] == pytest.approx(single[key], abs=1e-4), key
    from safetensors.torch import load_file

    one = load_file(Path(tmp_path / "one/policy/model.safetensors"))
    two = load_file(out / "policy/model.safetensors")
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4


# ---------------------------------------------------------------- refusals


def _rewrite_scores(path: Path, dest: Path, *, drop_rows: int = 0, digest: str | None = None) -> None:
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    if digest is not None:
        info = json.loads(meta[b"mrpo"])
        info["prepared_digest"] = digest
        meta[b"mrpo"] = json.dumps(info).encode()
    table = table.slice(drop_rows).replace_schema_metadata(meta)
    dest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dest)


def test_refuses_a_pair_without_a_score(scored, tmp_path):
    from mrpo.data.prepared import prepared_digest

    src = Path(scored["root"]) / "data/scores"
    for name in REFERENCES:
        _rewrite_scores(
            src / f"{name}.parquet", tmp_path / f"{name}.parquet", drop_rows=1 if name == "gpt2_char" else 0
        )
    cfg = config(scored, tmp_path / "out", **{"score.output_dir": str(tmp_path)})
    dropped = pq.read_table(src / "gpt2_char.parquet").column("pair_id")[0].as_py()
    with pytest.raises(
        ScoreDataError,
        match=rf"no score for reference 'gpt2_char'.*{dropped}.*mrpo score --reference gpt2_char",
    ):
        prepare_training(cfg)
    # and a whole missing file
    (tmp_path / "llama_expert.parquet").unlink()
    with pytest.raises(
        ScoreDataError, match=r"llama_expert\.parquet: no scores for reference 'llama_expert'"
    ):
        load_reference_scores(tmp_path, REFERENCES, prepared_digest(cfg.data.output_dir))


def test_refuses_score_files_from_different_prepared_data(scored, tmp_path):
    src = Path(scored["root"]) / "data/scores"
    for name in REFERENCES:
        _rewrite_scores(
            src / f"{name}.parquet",
            tmp_path / "mixed" / f"{name}.parquet",
            digest="0" * 64 if name == "llama_expert" else None,
        )
        _rewrite_scores(src / f"{name}.parquet", tmp_path / "stale" / f"{name}.parquet", digest="f" * 64)
    mixed = config(scored, tmp_path / "out", **{"score.output_dir": str(tmp_path / "mixed")})
    with pytest.raises(ScoreDataError, match=r"different prepared data.*llama_expert.*000000000000"):
        prepare_training(mixed)
    stale = config(scored, tmp_path / "out", **{"score.output_dir": str(tmp_path / "stale")})
    with pytest.raises(
        ScoreDataError,
        match=r"anchor\.parquet: scores for 'anchor' were made from prepared data "
        r"with digest ffffffffffff.*mrpo score --reference anchor",
    ):
        prepare_training(stale)


def test_tracking_uri_precedence(scored, tmp_path, monkeypatch):
    from mrpo.tracking.store import tracking_uri

    cfg = load_config(scored["params"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(cfg, project_dir=tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    cfg = load_config(scored["params"], {"tracking.tracking_uri": "file:///somewhere/mlruns"})
    assert tracking_uri(cfg) == "file:///somewhere/mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.invalid:5000")
    assert tracking_uri(cfg) == "http://tracking.invalid:5000"


# ---------------------------------------------------------------- gradient accumulation


def _split_runs(scored, tmp_path, steps: int, **overrides) -> dict:
    """The same effective batch of 8 pairs as 8 x 1 and as 4 x 2 (same data order): trainer per split."""
    runs = {}
    for batch, accumulation in ((8, 1), (4, 2)):
        cfg = config(
            scored,
            tmp_path / f"{batch}x{accumulation}",
            **{
                "train.batch_size": batch,
                "train.gradient_accumulation_steps": accumulation,
                "train.max_steps": steps,
                **overrides,
            },
        )
        runs[(batch, accumulation)] = first_step_losses(cfg, steps=steps)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["thompson", "window"])
def test_online_strategies_advance_once_per_optimizer_step(scored, tmp_path, strategy):
    """Sampled once per optimizer step, updated once after it with all its pairs: 8 x 1 == 4 x 2."""
    runs = _split_runs(scored, tmp_path, 3, **{"train.strategy": strategy, "train.window_size": 12})
    (logs_one, one), (logs_two, two) = runs[(8, 1)], runs[(4, 2)]
    assert two.strategy.state_dict() == one.strategy.state_dict()
    if strategy == "thompson":
        assert two.strategy.steps == one.strategy.steps == 3
    else:
        assert len(two.strategy.window) == 12  # 3 steps x 8 pairs through a window of 12
    weights = [[e[f"weight/{n}"] for e in logs for n in REFERENCES] for logs in (logs_one, logs_two)]
    assert weights[1] == pytest.approx(weights[0], abs=1e-7)
    assert weights[0][3:6] != pytest.approx(weights[0][:3], abs=1e-4)  # the strategy did move


def _max_weight_difference(a, b) -> float:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


@pytest.mark.slow
def test_sft_term_is_invariant_to_gradient_accumulation(scored, tmp_path):
    """The SFT term is normalised by the chosen tokens of the whole accumulated batch, not per micro-batch."""
    runs = _split_runs(scored, tmp_path, 3, **{"train.sft_weight": 1.0, "train.learning_rate": 1e-3})
    (logs_one, one), (logs_two, two) = runs[(8, 1)], runs[(4, 2)]
    print(f"max |weight difference| 8x1 vs 4x2 after 3 steps: {_max_weight_difference(one, two):.3e}")
    assert _max_weight_difference(one, two) < 1e-5
    assert [e["loss"] for e in logs_two] == pytest.approx([e["loss"] for e in logs_one], abs=1e-5)
    start = config(scored, tmp_path / "start")
    assert (
        _max_weight_difference(one, build_trainer(start, prepare_training(start))) > 1e-3
    )  # the weights moved


# ---------------------------------------------------------------- dropout


def test_policy_dropout_is_off_by_default(scored, tmp_path):
    """A GPT-2 anchor with GPT-2's default dropout 0.1: with it on, two training-mode forwards of the same
    batch differ. (The zoo's GPT-2 is built without dropout, so the test sets it back on a copy.)"""
    import dataclasses
    import shutil

    from mrpo.data.tokenization import encode_response
    from mrpo.modeling.logprobs import collate_responses, response_logps
    from mrpo.modeling.models import load_tokenizer
    from mrpo.training.policy import load_policy

    cfg = config(scored, tmp_path)
    with_dropout = shutil.copytree(cfg.reference("gpt2_char").model, tmp_path / "gpt2_dropout")
    model_config = json.loads((with_dropout / "config.json").read_text())
    model_config.update(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    (with_dropout / "config.json").write_text(json.dumps(model_config))
    gpt2 = dataclasses.replace(cfg.reference("gpt2_char"), model=str(with_dropout))
    gpt2_first = dataclasses.replace(cfg, references=(gpt2, cfg.reference("anchor")))
    tokenizer = load_tokenizer(gpt2_first.anchor)
    pairs = pd.read_parquet(Path(cfg.data.output_dir) / "train.parquet").head(8)
    encoded = [
        encode_response(tokenizer, p, c, 64, chat_template=False)
        for p, c in zip(pairs["prompt"], pairs["chosen"], strict=True)
    ]
    batch = collate_responses(encoded, tokenizer.pad_token_id)

    def two_forwards(model):
        assert model.training
        with torch.no_grad():
            return [response_logps(model, **batch) for _ in range(2)]

    assert gpt2_first.train.disable_dropout is True  # the default
    off = load_policy(gpt2_first, torch.device("cpu"))
    a, b = two_forwards(off)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(a, response_logps(off.eval(), **batch), rtol=0, atol=1e-5)

    on = load_policy(
        dataclasses.replace(gpt2_first, train=dataclasses.replace(gpt2_first.train, disable_dropout=False)),
        torch.device("cpu"),
    )
    a, b = two_forwards(on)
    assert (a - b).abs().max().item() > 1e-2


def test_gradient_checkpointing_reaches_training_arguments_under_this_transformers_name(tmp_path):
    """transformers renamed the flag after 5.17 (a GPU image's version) and refuses the other name."""
    from transformers import TrainingArguments

    from mrpo.training.setup import training_arguments
    from mrpo.training.steps import CHECKPOINTING_ARG

    assert CHECKPOINTING_ARG in TrainingArguments.__dataclass_fields__
    for on in (True, False):
        cfg = load_config(
            REPO_ROOT / "params.yaml",
            {"train.gradient_checkpointing": on, "train.checkpoint_dir": str(tmp_path / "ckpt")},
        )
        args = training_arguments(cfg, torch.device("cpu"), has_eval=False, total_steps=10)
        assert getattr(args, CHECKPOINTING_ARG) is on


# ---------------------------------------------------------------- precision


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_step0_policy_logps_equal_anchor_scores_in_every_precision(scored, tmp_path, dtype):
    """Scoring records its precision;
    training's forward runs in it (fp32 weights, autocast), so step 0 is exact."""
    from mrpo.data.scorefile import read_scores
    from mrpo.stages.score import score_reference

    cfg = config(
        scored,
        tmp_path,
        **{
            "score.output_dir": str(tmp_path / "scores"),
            "score.metrics_dir": str(tmp_path / "timings"),
            "score.dtype": dtype,
            "train.objective": "dpo",
        },
    )
    _, meta = read_scores(score_reference(cfg, "anchor"))
    assert (meta["dtype"], meta["weights_dtype"], meta["device"]) == (dtype, "float32", "cpu")
    setup = prepare_training(cfg)
    assert setup.precision == getattr(torch, dtype)
    trainer = build_trainer(cfg, setup)
    batch = PreferenceCollator(setup.tokenizer.pad_token_id)([setup.datasets["train"][i] for i in range(32)])
    trainer.model.train()  # the training forward: dropout is off, so it is deterministic
    with torch.no_grad():
        pi_w, pi_l = trainer._policy_logps(trainer.model, batch)
        loss = trainer.compute_loss(trainer.model, batch).item()
    r_w, r_l = batch["ref_chosen_logps"][:, 0], batch["ref_rejected_logps"][:, 0]
    # Same weights, same autocast, same kernels; only the batch's shape differs from scoring's length packing,
    # which changes the GEMM blocking and so the low bits of the bf16/fp16-rounded activations.
    # Measured max |difference| on a pair's log-prob gap: fp32 4e-6, fp16 4.8e-3, bf16 2.8e-2 (metrics.py).
    tolerance = LOGP_TIE_TOLERANCE[setup.precision]
    gaps = (pi_w - r_w) - (pi_l - r_l)
    print(f"{dtype}: max |policy - stored| {max((pi_w - r_w).abs().max(), (pi_l - r_l).abs().max()):.2e}")
    torch.testing.assert_close(pi_w, r_w, rtol=0, atol=tolerance)
    torch.testing.assert_close(pi_l, r_l, rtol=0, atol=tolerance)
    assert gaps.abs().max().item() <= tolerance  # every step-0 pair is a tie...
    margins = cfg.train.beta * gaps
    assert margins.mean().abs().item() < 1e-4
    assert loss == pytest.approx(math.log(2), abs=1e-4)
    # ...and step-0 noise is a tie, not a win: reward accuracy 0 in every precision (strict > counted
    # rounding noise as wins: a share of about half of the pairs)
    print(f"{dtype}: strict share of step-0 margins > 0: {(margins > 0).double().mean():.2f}")
    assert trainer._train_metrics["rewards/accuracy"] == [0.0]


def fsdp_run(scored, out: Path, world: int, mode: str = "run", **overrides) -> dict:
    """tests/fsdp_train.py under torchrun with `world` gloo ranks; what it wrote into `out`."""
    base = {
        "train.device": "cpu",
        "train.output_dir": str(out / "stage-policy"),
        "train.checkpoint_dir": str(out / "checkpoints"),
        "train.metrics_file": str(out / "metrics/train.json"),
        "train.plots_file": str(out / "plots/train.csv"),
    }
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    cmd += [str(REPO_ROOT / "tests/fsdp_train.py"), str(scored["params"]), json.dumps({**base, **overrides})]
    proc = subprocess.run([*cmd, str(out), mode], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {f.stem: json.loads(f.read_text()) for f in out.glob("*.json")}


@pytest.mark.slow
def test_fsdp_over_two_gloo_processes_matches_one_process_and_its_checkpoint_resumes(scored, tmp_path):
    """FSDP2 shards of the policy on 2 CPU ranks x 4 pairs against 1 process x 8 pairs (see
    tests/fsdp_train.py for why this drives torch's FSDP by hand rather than through accelerate)."""
    one = fsdp_run(scored, tmp_path / "one", 1)
    two = fsdp_run(scored, tmp_path / "two", 2)
    # Tolerance: the gradients are averaged by a reduce-scatter instead of summed in one batch, so only float
    # re-association differs (1e-6 on the first loss, which no update has touched yet; 1e-5 after one AdamW
    # step).
    assert two["losses"][0] == pytest.approx(one["losses"][0], abs=1e-6)
    assert two["losses"][1] == pytest.approx(one["losses"][1], abs=1e-5)
    assert (tmp_path / "two" / "ckpt" / ".metadata").is_file()  # a sharded torch.distributed.checkpoint
    resumed = fsdp_run(scored, tmp_path / "two", 2, mode="resume")
    assert resumed["resumed"][0] == pytest.approx(two["losses"][1], abs=1e-6)  # the same step, same shards
    # The gathered policy, saved by the stage's save path and reloaded, scores as the sharded one did.
    logps = two["logps"]
    for sharded, saved in zip(logps["sharded"], logps["saved"], strict=True):
        assert saved == pytest.approx(sharded, abs=1e-5)


@pytest.mark.slow
def test_lora_with_fsdp_saves_a_usable_merged_policy(scored, tmp_path):
    out = fsdp_run(scored, tmp_path / "lora", 2, **{"train.lora.enabled": True, "train.lora.merge": True})
    policy = tmp_path / "lora" / "policy"
    assert (policy / "model.safetensors").is_file() and not (policy / "adapter_config.json").exists()
    for sharded, saved in zip(out["logps"]["sharded"], out["logps"]["saved"], strict=True):
        assert saved == pytest.approx(sharded, abs=1e-5)  # merged weights = base + LoRA delta
    from safetensors.torch import load_file

    trained = load_file(policy / "model.safetensors")
    anchor = load_file(Path(load_config(scored["params"]).anchor.model) / "model.safetensors")
    changed = [k for k in anchor if k in trained and not torch.equal(anchor[k], trained[k])]
    assert changed and all("proj" in k for k in changed)  # the adapters' deltas merged into the projections


def test_the_shipped_accelerate_configs_load_as_fsdp2_and_zero3():
    """What `accelerate launch --config_file` reads: accelerate's own loader, so a misspelt top-level key
    fails here."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    fsdp = load_config_from_file(str(REPO_ROOT / "configs/accelerate/fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.fsdp_config["fsdp_version"] == 2
    assert (
        fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    )  # as tests/fsdp_train.py shards
    zero3 = load_config_from_file(str(REPO_ROOT / "configs/accelerate/zero3.yaml"))
    assert zero3.distributed_type == DistributedType.DEEPSPEED and zero3.deepspeed_config["zero_stage"] == 3
    assert zero3.deepspeed_config["zero3_save_16bit_model"] is True  # the stage gathers the policy to save it
    readme = (REPO_ROOT / "README.md").read_text()
    profile = (REPO_ROOT / "profiles/gpu-hub.yaml").read_text()
    for name in ("configs/accelerate/fsdp.yaml", "configs/accelerate/zero3.yaml"):
        assert name in readme and name in profile


@pytest.mark.slow
def test_tensorboard_reporting_and_push_to_hub_up_to_the_upload(scored, tmp_path, monkeypatch):
    """`train.report_to: [tensorboard]` writes real event files next to the checkpoints (and none into the
    working directory); `train.push_to_hub` uploads the policy directory with its card. Offline, only the two
    network calls of huggingface_hub are replaced, recording what would be sent."""
    from huggingface_hub import HfApi
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = sorted(p.name for p in folder.iterdir())  # what would be uploaded, as it is at the call
        calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "files": files}))
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/me/mrpo-policy/commit/0"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.chdir(tmp_path)
    cfg = config(
        scored,
        tmp_path,
        **{
            "train.report_to": ["tensorboard"],
            "train.push_to_hub": {"enabled": True, "repo_id": "me/mrpo-policy", "private": True},
            "tracking.registered_model": "mrpo-policy",
        },
    )
    train(cfg)

    events = list((Path(cfg.train.checkpoint_dir) / "runs").rglob("events.out.tfevents.*"))
    # one run directory (the evaluation after training reopens the writer there: a second events file)
    assert len({e.parent for e in events}) == 1 and events, events
    assert not (tmp_path / "runs").exists()
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    loss = accumulator.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert {"train/weight/llama_expert", "eval/rewards/accuracy"} <= set(accumulator.Tags()["scalars"])

    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == "me/mrpo-policy" and calls[0][2]["private"] is True
    upload = calls[1][2]
    assert Path(upload["folder_path"]).resolve() == Path(cfg.train.output_dir).resolve()
    assert {"README.md", "model.safetensors", "tokenizer.json", "config.json"} <= set(upload["files"])
    # the local MLflow run record lies beside the policy directory, so it is never uploaded
    assert not any("mlflow_run" in f for f in upload["files"]) and "ignore_patterns" not in upload
    assert "mrpo train: mrpo-uniform-" in upload["commit_message"]
    from mlflow import MlflowClient

    from mrpo.tracking.store import read_run_record

    record = read_run_record(cfg.train.output_dir)
    tags = MlflowClient(record.tracking_uri).get_run(record.run_id).data.tags
    assert tags["mrpo.hub_commit"] == "https://huggingface.co/me/mrpo-policy/commit/0"
    # tracking.registered_model: the logged policy model is version 1 of that registered model
    assert tags["mrpo.registered_model"] == "mrpo-policy/1"
    version = MlflowClient(record.tracking_uri).get_model_version("mrpo-policy", "1")
    assert version.source == f"models:/{tags['mrpo.model_id']}" and version.run_id == record.run_id


def test_a_failed_upload_is_a_user_error_and_keeps_the_policy(scored, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from mrpo.errors import MRPOError

    def refuse(self, repo_id, **kwargs):
        raise PermissionError("401 Unauthorized")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    cfg = config(scored, tmp_path, **{"train.push_to_hub.enabled": True, "train.push_to_hub.repo_id": "me/p"})
    with pytest.raises(
        MRPOError, match=r"train.push_to_hub: uploading .* to 'me/p' failed \(401 Unauthorized\)"
    ):
        train(cfg, track=False)
    assert (Path(cfg.train.output_dir) / "model.safetensors").is_file()
    assert (Path(cfg.train.output_dir) / "README.md").read_text().count("Not tracked in MLflow.") == 1
