"""Preference metrics of a policy against the anchor's stored scores (reward accuracy and margin vs anchor):
the one definition the evaluate stage and the comparison both use.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from mrpo.config.schema import Config, ReferenceConfig
from mrpo.core.metrics import reward_accuracy
from mrpo.data.prepared import read_split
from mrpo.errors import ScoreDataError
from mrpo.evaluation.lmeval import (
    EvalSettings,
)
from mrpo.runtime import progress, resolve_dtype


def preference_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    anchor_chosen: torch.Tensor,
    anchor_rejected: torch.Tensor,
    beta: float,
    precision: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Test-split preference metrics, all (N,) tensors of sequence log-probs; see docs/metrics.md.

    The policy's implicit rewards are measured against the ANCHOR (the model it started from), whatever
    the training objective's reference was: reward_margin_vs_anchor = mean of beta * ((pi_w - r_w) -
    (pi_l - r_l)), reward_accuracy_vs_anchor its share above a tie (mrpo.core.metrics.reward_accuracy).
    anchor_likelihood_accuracy is not a reward accuracy: the share of pairs whose chosen response the
    anchor itself finds more likely (r_w > r_l, same tie rule), the bar the policy's training started at.
    """
    if policy_chosen.numel() == 0:
        nan = float("nan")
        return {
            "pref/reward_accuracy_vs_anchor": nan,
            "pref/reward_margin_vs_anchor": nan,
            "pref/anchor_likelihood_accuracy": nan,
            "pref/pairs": 0.0,
        }
    chosen_rewards = beta * (policy_chosen.double() - anchor_chosen.double())
    rejected_rewards = beta * (policy_rejected.double() - anchor_rejected.double())
    return {
        "pref/reward_accuracy_vs_anchor": reward_accuracy(
            chosen_rewards, rejected_rewards, beta, precision
        ).item(),
        "pref/reward_margin_vs_anchor": (chosen_rewards - rejected_rewards).mean().item(),
        # log-probs, not rewards: the tie rule in nats is the same with beta = 1
        "pref/anchor_likelihood_accuracy": reward_accuracy(
            anchor_chosen, anchor_rejected, 1.0, precision
        ).item(),
        "pref/pairs": float(chosen_rewards.numel()),
    }


def policy_preference_metrics(
    cfg: Config, policy_ref: ReferenceConfig, settings: EvalSettings
) -> dict[str, float]:
    """Reward accuracy and margin of the policy on the test split, against the anchor's stored scores."""
    from mrpo.modeling.models import load_model, load_tokenizer

    joined, meta, skipped = _scored_test_pairs(cfg)
    tokenizer = load_tokenizer(policy_ref)
    # The precision the anchor was scored in (recorded in its score file), not the evaluation device's
    # default: fp32 weights under that autocast, as scoring and training run, so the margin compares like
    # with like.
    recorded = meta.get("dtype")
    precision = (
        getattr(torch, recorded)
        if recorded
        else resolve_dtype(cfg.score.dtype, torch.device(settings.device))
    )
    model = load_model(policy_ref, settings.device, torch.float32)
    max_length = int(meta.get("max_length", cfg.score.max_length))
    pi_w, pi_l = _policy_logps(cfg, model, tokenizer, joined, max_length, settings, precision)
    del model
    r_w = torch.tensor(joined["chosen_logp"].to_numpy(dtype=np.float64))
    r_l = torch.tensor(joined["rejected_logp"].to_numpy(dtype=np.float64))
    metrics = preference_metrics(pi_w, pi_l, r_w, r_l, cfg.train.beta, precision)
    metrics["pref/skipped"] = float(skipped)
    return metrics


def _scored_test_pairs(cfg: Config):
    """The test split joined with the anchor's stored scores (pairs that fit only), the score file's
    metadata, and how many pairs did not fit; refused when the scores are missing or stale."""
    from mrpo.data.scorefile import read_scores, score_path

    anchor = cfg.anchor
    anchor_scores = score_path(cfg.score.output_dir, anchor.name)
    if not anchor_scores.is_file():
        raise ScoreDataError(
            f"evaluate: anchor scores {anchor_scores} not found; run `mrpo score --reference {anchor.name}`"
        )
    scores, meta = read_scores(anchor_scores)
    pairs = read_split(cfg.data.output_dir, "test")
    test_scores = scores[scores["split"] == "test"].set_index("pair_id")
    missing = [p for p in pairs["pair_id"] if p not in test_scores.index]
    if missing:
        raise ScoreDataError(
            f"evaluate: {len(missing)} test pairs (first {missing[0]}) have no score in {anchor_scores}; "
            f"the scores are stale: re-run `mrpo score --reference {anchor.name}`"
        )
    joined = pairs.join(test_scores, on="pair_id")
    fits = joined["fits"].astype(bool)
    return joined[fits], meta, int((~fits).sum())


def _policy_logps(cfg: Config, model, tokenizer, joined, max_length: int, settings, precision):
    """The policy's log-probs of each pair's chosen and rejected response, scored exactly as `mrpo score`
    scores the anchor, so a policy equal to the anchor has margin 0."""
    from mrpo.data.tokenization import encode_response, render_prompt
    from mrpo.modeling.models import cpu_threads_for, torch_threads
    from mrpo.modeling.scoring import score_sequences

    template = cfg.anchor.chat_template
    chosen, rejected = [], []
    for row in joined.itertuples(index=False):
        prompt_text = render_prompt(tokenizer, row.prompt, row.prompt_messages, template)
        chosen.append(encode_response(tokenizer, prompt_text, row.chosen, max_length, chat_template=template))
        rejected.append(
            encode_response(tokenizer, prompt_text, row.rejected, max_length, chat_template=template)
        )
    encoded = chosen + rejected
    with (
        progress(total=len(encoded), desc="policy log-probs (test)", unit="seq") as bar,
        torch_threads(cpu_threads_for(model, settings.device)),
    ):
        logps, _ = score_sequences(
            model,
            encoded,
            tokenizer.pad_token_id,
            cfg.score.batch_tokens,
            torch.device(settings.device),
            bar,
            precision=precision,
        )
    return torch.from_numpy(logps[: len(chosen)]), torch.from_numpy(logps[len(chosen) :])


def policy_reference(cfg: Config) -> ReferenceConfig:
    """The trained policy as a reference-like spec:
    the anchor's tokenizer and chat template settings, its own weights."""
    return replace(
        cfg.anchor, name="policy", model=cfg.train.output_dir, revision=None, gguf_file=None, tokenizer=None
    )
