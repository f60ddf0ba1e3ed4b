"""MRPO on top of `transformers.Trainer`: the data join, the collator, the loss step, checkpointed weighting state.

Only `compute_loss` and `prediction_step` are overridden, so everything users
expect from `Trainer` keeps working: gradient accumulation, mixed precision,
checkpoints and resume, DDP/FSDP/DeepSpeed through accelerate or torchrun,
schedulers and evaluation at intervals.

Reference log-probs come from the K score files (never from a reference model),
joined to the prepared pairs by `pair_id`. The policy is tokenized with the
anchor's tokenizer through `mrpo.tokenization.encode_response`, exactly as the
scoring stage did, so at step 0 the policy's log-probs equal the anchor's scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mrpo.errors import ScoreDataError
from mrpo.models import collate_responses, cpu_threads_for, response_logps, torch_threads
from mrpo.tokenization import EncodedResponse, encode_response, render_prompt

log = logging.getLogger("mrpo")

STRATEGY_STATE_FILE = "mrpo_strategy_state.json"


# ---------------------------------------------------------------- joining pairs with scores


@dataclass(frozen=True)
class ReferenceScores:
    """One reference's stored scores, indexed by pair_id, with the file's metadata and sha256."""

    name: str
    path: Path
    frame: pd.DataFrame  # index pair_id; columns split, chosen_logp, rejected_logp, *_tokens, fits
    metadata: dict
    sha256: str


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_reference_scores(score_dir: str | Path, names: Sequence[str], prepared_digest: str) -> list[ReferenceScores]:
    """Read `<score_dir>/<name>.parquet` for each reference and check they were all made from this prepared data.

    Raises ScoreDataError naming the file when one is missing, unreadable, without its
    metadata, holds a non-finite or positive log-prob for a pair that fits (see
    `mrpo.scoring.read_scores`), or when its recorded `prepared_digest` differs from the
    others' or from `prepared_digest`.
    """
    from mrpo.scoring import read_scores

    out = []
    for name in names:
        path = Path(score_dir) / f"{name}.parquet"
        if not path.is_file():
            raise ScoreDataError(
                f"{path}: no scores for reference {name!r}; run `mrpo score --reference {name}` first"
            )
        frame, meta = read_scores(path, reference=name)
        if frame["pair_id"].duplicated().any():
            dup = frame.loc[frame["pair_id"].duplicated(), "pair_id"].iloc[0]
            raise ScoreDataError(f"{path}: pair_id {dup!r} appears more than once; re-run `mrpo score --reference {name}`")
        out.append(ReferenceScores(name, path, frame.set_index("pair_id"), dict(meta), file_sha256(path)))
    check_score_digests(out, prepared_digest)
    return out


def check_score_digests(scores: Sequence[ReferenceScores], prepared_digest: str) -> None:
    """Refuse score files made from different prepared data (each other's digest or the prepared data's)."""
    recorded = {s.name: s.metadata.get("prepared_digest") for s in scores}
    if len(set(recorded.values())) > 1:
        listing = ", ".join(f"{n} ({s.path}): {str(d)[:12]}" for (n, d), s in zip(recorded.items(), scores, strict=True))
        raise ScoreDataError(
            "score files were made from different prepared data (prepared_digest differs between them: "
            f"{listing}); re-run `mrpo score --reference <name>` for the stale ones"
        )
    for s in scores:
        if recorded[s.name] != prepared_digest:
            raise ScoreDataError(
                f"{s.path}: scores for {s.name!r} were made from prepared data with digest "
                f"{str(recorded[s.name])[:12]}, but the prepared data now has digest {prepared_digest[:12]}; "
                f"re-run `mrpo score --reference {s.name}`"
            )


@dataclass(frozen=True)
class JoinedScores:
    """Reference log-probs for the pairs of one split, in the pairs' order: (N, K) each, reference order as given."""

    chosen: np.ndarray
    rejected: np.ndarray
    fits: np.ndarray  # (N,) bool: every reference could score both responses
    reference_fits: np.ndarray | None = None  # (N, K) bool: which references could (None: all could)


def join_scores(pair_ids: Sequence[str], scores: Sequence[ReferenceScores], split: str) -> JoinedScores:
    """Look every pair up in every score table; refuse (naming pair, reference and file) a pair without a score."""
    chosen, rejected, each_fits = [], [], []
    index = pd.Index(pair_ids)
    for s in scores:
        missing = index.difference(s.frame.index)
        if len(missing):
            raise ScoreDataError(
                f"{s.path}: {len(missing)} {split} pair(s) have no score for reference {s.name!r}, e.g. pair_id "
                f"{missing[0]!r}; the score file is incomplete or stale: re-run `mrpo score --reference {s.name}`"
            )
        rows = s.frame.loc[index]
        chosen.append(rows["chosen_logp"].to_numpy(np.float64))
        rejected.append(rows["rejected_logp"].to_numpy(np.float64))
        each_fits.append(rows["fits"].to_numpy(bool))
    reference_fits = np.stack(each_fits, axis=1) if each_fits else np.ones((len(pair_ids), 0), dtype=bool)
    return JoinedScores(np.stack(chosen, axis=1), np.stack(rejected, axis=1), reference_fits.all(axis=1),
                        reference_fits)


# ---------------------------------------------------------------- dataset and collator


@dataclass(frozen=True)
class PreferenceExample:
    pair_id: str
    chosen: EncodedResponse
    rejected: EncodedResponse
    ref_chosen_logps: np.ndarray  # (K,)
    ref_rejected_logps: np.ndarray  # (K,)


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized pairs with their K reference log-probs; `skipped` counts pairs left out because they do not fit.

    `skipped_by_reference[name]`: pairs that reference's score file flags fits=False (longer than its
    score.max_length; a pair may be flagged by several); `skipped_by_length`: pairs every reference scored
    that do not fit the policy's train.max_length. `skipped_summary()` says it in words, for messages.
    """

    def __init__(self, examples: list[PreferenceExample], reference_names: Sequence[str], skipped: int = 0,
                 skipped_by_reference: dict[str, int] | None = None, skipped_by_length: int = 0,
                 total: int | None = None):
        self.examples = examples
        self.reference_names = tuple(reference_names)
        self.skipped = skipped
        self.skipped_by_reference = dict(skipped_by_reference or {})
        self.skipped_by_length = skipped_by_length
        self.total = len(examples) + skipped if total is None else total

    def skipped_summary(self) -> str:
        """E.g. "of 200 pairs, 200 skipped: reference 'gpt2_char' flagged 200 as not fitting score.max_length"."""
        parts = [f"reference {name!r} flagged {n} as not fitting score.max_length"
                 for name, n in self.skipped_by_reference.items() if n]
        if self.skipped_by_length:
            parts.append(f"{self.skipped_by_length} do not fit train.max_length")
        return f"of {self.total} pairs, {self.skipped} skipped" + (f": {'; '.join(parts)}" if parts else "")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PreferenceExample:
        return self.examples[i]

    def reference_margins(self) -> torch.Tensor:
        """Raw reference margins r_k^w - r_k^l, (N, K) float64: what offline strategies are fitted on."""
        if not self.examples:
            return torch.zeros((0, len(self.reference_names)), dtype=torch.float64)
        chosen = np.stack([e.ref_chosen_logps for e in self.examples])
        rejected = np.stack([e.ref_rejected_logps for e in self.examples])
        return torch.from_numpy(chosen - rejected)


def build_preference_dataset(
    pairs: pd.DataFrame,
    split: str,
    scores: Sequence[ReferenceScores],
    tokenizer,
    *,
    max_length: int,
    chat_template: bool,
) -> PreferenceDataset:
    """Join one prepared split with the score files and tokenize it for the policy (the anchor's tokenizer).

    Pairs that some reference flagged `fits=False`, or that do not fit the
    policy's `max_length`, are skipped and counted (logged), never truncated.
    """
    joined = join_scores(list(pairs["pair_id"]), scores, split)
    examples, skipped, too_long = [], 0, 0
    for i, row in enumerate(pairs.itertuples(index=False)):
        if not joined.fits[i]:
            skipped += 1
            continue
        prompt_text = render_prompt(tokenizer, row.prompt, row.prompt_messages, chat_template)
        enc_w = encode_response(tokenizer, prompt_text, row.chosen, max_length, chat_template=chat_template)
        enc_l = encode_response(tokenizer, prompt_text, row.rejected, max_length, chat_template=chat_template)
        if not (enc_w.fits and enc_l.fits):
            skipped += 1
            too_long += 1
            continue
        examples.append(PreferenceExample(row.pair_id, enc_w, enc_l, joined.chosen[i], joined.rejected[i]))
    by_reference = {s.name: int((~joined.reference_fits[:, k]).sum()) for k, s in enumerate(scores)}
    dataset = PreferenceDataset(examples, [s.name for s in scores], skipped, skipped_by_reference=by_reference,
                                skipped_by_length=too_long, total=len(pairs))
    if skipped:
        log.warning("%s: %s (fits=False)", split, dataset.skipped_summary())
    return dataset


@dataclass
class PreferenceCollator:
    """Pads a list of PreferenceExample into ONE batch of 2B rows: the B chosen sequences, then the B rejected.

    Returns input_ids, attention_mask, response_mask (2B, T) and
    ref_chosen_logps, ref_rejected_logps (B, K) float32.
    """

    pad_token_id: int

    def __call__(self, examples: list[PreferenceExample]) -> dict[str, torch.Tensor]:
        batch = collate_responses([e.chosen for e in examples] + [e.rejected for e in examples], self.pad_token_id)
        # float64 scores keep their precision until the loss; the loss runs in fp32 like the policy log-probs.
        batch["ref_chosen_logps"] = torch.tensor(np.stack([e.ref_chosen_logps for e in examples]), dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor(np.stack([e.ref_rejected_logps for e in examples]), dtype=torch.float32)
        return batch


# ---------------------------------------------------------------- the objective


@dataclass(frozen=True)
class ObjectiveSettings:
    """Which loss the trainer optimises; see docs/mrpo-spec.md sections 1-4."""

    objective: str = "mrpo"  # mrpo | dpo | multi_dpo
    loss_type: str = "sigmoid"
    beta: float = 0.1
    epsilon: float = 0.1
    adaptive_epsilon: bool = True
    label_smoothing: float = 0.0
    sft_weight: float = 0.0

    @classmethod
    def from_config(cls, train_cfg) -> ObjectiveSettings:
        t = train_cfg
        return cls(t.objective, t.loss_type, t.beta, t.epsilon, t.adaptive_epsilon, t.label_smoothing, t.sft_weight)


def preference_loss(
    settings: ObjectiveSettings,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    weights: torch.Tensor,
):
    """Dispatch to the spec's objective: mrpo and dpo (K = 1) use `mrpo_loss`, multi_dpo `multi_dpo_loss`."""
    from mrpo.losses import mrpo_loss, multi_dpo_loss

    fn = multi_dpo_loss if settings.objective == "multi_dpo" else mrpo_loss
    if settings.objective == "dpo" and ref_chosen_logps.shape[-1] != 1:
        raise ValueError(f"objective 'dpo' takes exactly one reference, got {ref_chosen_logps.shape[-1]}")
    return fn(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        weights,
        beta=settings.beta,
        epsilon=settings.epsilon,
        adaptive_epsilon=settings.adaptive_epsilon,
        loss_type=settings.loss_type,
        label_smoothing=settings.label_smoothing,
    )


def preference_metrics(eval_pred) -> dict[str, float]:
    """Validation metrics from the per-pair statistics `prediction_step` returns (chosen reward, rejected reward)."""
    stats = np.asarray(eval_pred.predictions, dtype=np.float64)
    chosen, rejected = stats[:, 0], stats[:, 1]
    return {
        "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()),
        "rewards/margin": float((chosen - rejected).mean()),
        "rewards/accuracy": float((chosen > rejected).mean()),
    }


class MRPOTrainer(Trainer):
    """`transformers.Trainer` whose loss is the MRPO objective over precomputed reference log-probs.

    Extra arguments: `objective` (ObjectiveSettings), `strategy` (from
    `mrpo.weighting.make_strategy`), `reference_names` (K names, anchor first,
    used for the `weight/<name>` metrics). Batches come from PreferenceCollator.
    """

    # compute_loss returns a per-batch mean; let Trainer divide it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, objective: ObjectiveSettings, strategy, reference_names: Sequence[str], **kwargs):
        kwargs.setdefault("compute_metrics", preference_metrics)
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.strategy = strategy
        self.reference_names = tuple(reference_names)
        self._train_metrics: dict[str, list[float]] = defaultdict(list)
        self._tokens_since_log = 0
        self._last_log_time: float | None = None
        self.add_callback(StrategyStateCallback(self))

    # ------------------------------------------------------------ the step

    def _policy_logps(self, model, inputs):
        """ONE forward pass over chosen and rejected together -> (chosen (B,), rejected (B,), chosen tokens)."""
        logps = response_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["response_mask"])
        n = inputs["ref_chosen_logps"].shape[0]
        return logps[:n], logps[n:]

    def _gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' rows in rank order (uneven last batches padded with NaN and dropped), for shared online state."""
        if self.accelerator.num_processes == 1:
            return x
        padded = self.accelerator.pad_across_processes(x, dim=0, pad_index=float("nan"))
        gathered = self.accelerator.gather(padded)
        return gathered[~torch.isnan(gathered).any(dim=-1)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ref_w, ref_l = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        pi_w, pi_l = self._policy_logps(model, inputs)
        margins = (ref_w - ref_l).detach()
        weights = torch.as_tensor(self.strategy.weights(margins), dtype=torch.float32, device=pi_w.device)
        out = preference_loss(self.objective, pi_w, pi_l, ref_w, ref_l, weights)
        loss = out.losses.mean()
        n = ref_w.shape[0]
        chosen_tokens = inputs["response_mask"][:n].sum()
        sft_nll = -pi_w.sum() / chosen_tokens.clamp(min=1)  # mean token NLL of the chosen responses in the batch
        if self.objective.sft_weight > 0:
            loss = loss + self.objective.sft_weight * sft_nll
        if model.training:
            # Online strategies learn from every rank's pairs, in rank order, so all ranks keep the same state.
            self.strategy.update(self._gather_rows(margins))
            self._record_train_metrics(out, weights, sft_nll, inputs)
        if return_outputs:
            return loss, {"chosen_rewards": out.chosen_rewards.detach(), "rejected_rewards": out.rejected_rewards.detach()}
        return loss

    def _record_train_metrics(self, out, weights, sft_nll, inputs) -> None:
        gather = self.accelerator.gather_for_metrics
        chosen, rejected = gather(out.chosen_rewards.detach().float()), gather(out.rejected_rewards.detach().float())
        m = self._train_metrics
        m["rewards/chosen"].append(chosen.mean().item())
        m["rewards/rejected"].append(rejected.mean().item())
        m["rewards/margin"].append((chosen - rejected).mean().item())
        m["rewards/accuracy"].append((chosen > rejected).float().mean().item())
        m["sft_nll"].append(gather(sft_nll.detach().reshape(1)).mean().item())
        clipped = torch.as_tensor(out.clipped_fraction, dtype=torch.float32, device=chosen.device).reshape(1)
        m["clipped_fraction"].append(gather(clipped).mean().item())
        w = weights.detach().float()
        w_mean = w.mean(dim=0) if w.dim() == 2 else w
        w_mean = gather(w_mean.reshape(1, -1)).mean(dim=0)
        for name, value in zip(self.reference_names, w_mean.tolist(), strict=True):
            m[f"weight/{name}"].append(value)
        self._tokens_since_log += int(gather(inputs["attention_mask"].sum().reshape(1)).sum().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss plus per-pair (chosen reward, rejected reward) for `preference_metrics`; no state update."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        stats = torch.stack([outputs["chosen_rewards"], outputs["rejected_rewards"]], dim=1).float()
        labels = torch.zeros(stats.shape[0], device=stats.device)
        return loss, stats, labels

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the averaged per-step preference metrics and tokens/s to each training log."""
        if "loss" in logs and self._train_metrics:
            logs.update({k: sum(v) / len(v) for k, v in self._train_metrics.items()})
            now = time.perf_counter()
            if self._last_log_time is not None:
                logs["tokens_per_second"] = self._tokens_since_log / max(now - self._last_log_time, 1e-9)
            self._last_log_time = now
            self._tokens_since_log = 0
            self._train_metrics.clear()
        super().log(logs, start_time)

    def _threads(self):
        """One intra-op thread for a tiny model on CPU (see mrpo.models.cpu_threads_for); torch's default otherwise."""
        return torch_threads(cpu_threads_for(self.model, self.args.device))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self._last_log_time is None:
            self._last_log_time = time.perf_counter()
        if isinstance(resume_from_checkpoint, str | os.PathLike):
            load_strategy_state(self.strategy, resume_from_checkpoint)
        with self._threads():
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with self._threads():
            return super().evaluate(*args, **kwargs)


# ---------------------------------------------------------------- weighting state in checkpoints


def load_strategy_state(strategy, checkpoint_dir: str | os.PathLike) -> None:
    path = Path(checkpoint_dir) / STRATEGY_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: checkpoint has no weighting-strategy state; it was not written by MRPOTrainer. "
            "Delete the checkpoint directory to start over"
        )
    strategy.load_state_dict(json.loads(path.read_text()))
    log.info("restored weighting-strategy state from %s", path)


class StrategyStateCallback(TrainerCallback):
    """Writes the weighting strategy's state into each checkpoint directory, so a resumed run continues it."""

    def __init__(self, trainer: MRPOTrainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            ckpt.mkdir(parents=True, exist_ok=True)
            state_dict = self.trainer.strategy.state_dict()
            (ckpt / STRATEGY_STATE_FILE).write_text(json.dumps(_jsonable(state_dict)))
        return control


def _jsonable(value: Any) -> Any:
    """Tensors and numpy values as lists, so strategy state round-trips through JSON."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
