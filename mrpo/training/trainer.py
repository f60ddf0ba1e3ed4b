"""MRPO on top of `transformers.Trainer`:
the loss step, the callbacks around it, checkpointed weighting state.

Only `compute_loss`, `training_step` and `prediction_step` are overridden, so everything users
expect from `Trainer` keeps working: gradient accumulation, mixed precision,
checkpoints and resume, DDP/FSDP/DeepSpeed through accelerate or torchrun,
schedulers and evaluation at intervals. Batches come from mrpo.data.preference:
reference log-probs from the K score files, never from a reference model.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from mrpo.core.loss_types import RunningRewardMean
from mrpo.core.metrics import reward_accuracy
from mrpo.core.objective import Objective
from mrpo.core.wpo import wpo_weights
from mrpo.modeling.logprobs import DEFAULT_CHUNK, response_logps, response_token_logps
from mrpo.modeling.models import cpu_threads_for, torch_threads
from mrpo.training.batching import GroupedSampler, pair_lengths, resolve_batching
from mrpo.training.callbacks import (
    NonFiniteGuard,
    StrategyStateCallback,
    checkpoint_save_guard,
    load_loss_state,
    load_strategy_state,
)
from mrpo.training.progress import CompactProgress, LogAtCheckpoints

log = logging.getLogger("mrpo")


# ---------------------------------------------------------------- the objective


def validation_metrics(
    eval_pred, *, beta: float = 0.1, precision: torch.dtype = torch.float32
) -> dict[str, float]:
    """Validation metrics from the per-pair statistics `prediction_step` returns
    (chosen reward, rejected reward).

    Rewards are measured against the objective's combined reference (see docs/metrics.md).
    """
    stats = np.asarray(eval_pred.predictions, dtype=np.float64)
    chosen, rejected = stats[:, 0], stats[:, 1]
    return {
        "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()),
        "rewards/margin": float((chosen - rejected).mean()),
        "rewards/accuracy": float(
            reward_accuracy(torch.from_numpy(chosen), torch.from_numpy(rejected), beta, precision)
        ),
    }


@dataclass(frozen=True)
class StepCounts:
    """What one optimizer step's accumulated batch holds, summed over its micro-batches and every rank."""

    pairs: int
    chosen_tokens: int
    world_size: int


def accumulated_share(total: torch.Tensor, count: int, world_size: int) -> torch.Tensor:
    """This micro-batch's share of a mean over the whole accumulated batch of every rank.

    Micro-batch gradients add up and DDP averages over ranks, so `total / count * world_size`
    makes the step's gradient that of the global mean, however the batch is split.
    """
    return total * (world_size / max(count, 1))


class MRPOTrainer(Trainer):
    """`transformers.Trainer` whose loss is the MRPO objective over precomputed reference log-probs.

    Extra arguments: `objective` (Objective), `strategy` (from
    `mrpo.core.weighting.make_strategy`), `reference_names` (K names, anchor first,
    used for the `weight/<name>` metrics), `precision` (the dtype the anchor was
    scored in: the policy's forward runs in the same numerics, see
    `mrpo.modeling.logprobs.forward_precision`). Batches come from PreferenceCollator.

    One optimizer step is one unit whatever the gradient accumulation: the loss is
    a mean over the step's whole batch (pairs for the preference term, chosen
    tokens for the SFT term), and online strategies draw their weights once per
    step and learn once after it from all of the step's pairs.
    """

    # compute_loss divides by the whole accumulated batch's counts (StepCounts) itself.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args,
        objective: Objective,
        strategy,
        reference_names: Sequence[str],
        precision: torch.dtype = torch.float32,
        batching: str = "padded",
        logprob_chunk: int = DEFAULT_CHUNK,
        **kwargs,
    ):
        kwargs.setdefault(
            "compute_metrics", functools.partial(validation_metrics, beta=objective.beta, precision=precision)
        )
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.strategy = strategy
        self.reference_names = tuple(reference_names)
        self.precision = precision
        self.batching, self._batching_note = resolve_batching(batching, self.model)
        self.logprob_chunk = logprob_chunk
        self._train_metrics: dict[str, list[float]] = defaultdict(list)
        self._step_margins: list[torch.Tensor] = []
        # bco_pair's reward shift: learns after each optimizer step from that step's rewards,
        # like online weighting
        self.loss_state = RunningRewardMean() if objective.keeps_reward_mean else None
        self._step_rewards: list[torch.Tensor] = []
        self._tokens_since_log = 0
        self._last_log_time: float | None = None
        self._losses_finite: torch.Tensor | None = None  # since the last optimizer step; checked before it
        self.add_callback(StrategyStateCallback(self))
        self.add_callback(NonFiniteGuard(self))
        self.add_callback(LogAtCheckpoints())
        # Trainer's own progress prints every log as a dict (every step at logging_steps 1); ours is compact.
        self.remove_callback(ProgressCallback)
        self.remove_callback(PrinterCallback)
        self.add_callback(CompactProgress())

    # ------------------------------------------------------------ the step

    def _policy_logps(self, model, inputs):
        """ONE forward pass over chosen and rejected together -> (chosen (B,), rejected (B,))."""
        return self._policy_forward(model, inputs)[:2]

    def _policy_forward(self, model, inputs):
        """The policy's forward -> (chosen (B,), rejected (B,), WPO pair weights (B,) or None).

        The per-token terms of the WPO weights are computed only with use_weighting: otherwise this is
        exactly `response_logps`, at no extra cost."""
        from mrpo.modeling.logprobs import forward_precision

        args = (inputs["input_ids"], inputs["attention_mask"], inputs["response_mask"])
        how = {"chunk": self.logprob_chunk, "packed": self.batching == "packed", "pairs": True}
        n = inputs["ref_chosen_logps"].shape[0]
        with forward_precision(self.precision, inputs["input_ids"].device):
            if not self.objective.use_weighting:
                logps = response_logps(model, *args, **how)
                return logps[:n], logps[n:], None
            t = response_token_logps(model, *args, **how)
        w = wpo_weights(t.token_logps, t.log_sum_sq_probs, t.mask)
        return t.logps[:n], t.logps[n:], w[:n] * w[n:]

    def _get_train_sampler(self, train_dataset=None):
        """`grouped` and `packed`: steps of pairs of similar length (mrpo.training.batching), grouped on the
        step's global batch so the pairs of each step do not depend on how it is split."""
        if self._batching_note:
            log.log(logging.WARNING if self.batching == "grouped" else logging.INFO, self._batching_note)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.batching == "padded" or not hasattr(dataset, "examples"):
            return super()._get_train_sampler(train_dataset)
        a = self.args
        step = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
        seed = a.data_seed if a.data_seed is not None else a.seed
        return GroupedSampler(pair_lengths(dataset.examples), step, seed)

    def _gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' rows in rank order (uneven last batches padded with NaN and dropped),
        for shared online state."""
        if self.accelerator.num_processes == 1:
            return x
        padded = self.accelerator.pad_across_processes(x, dim=0, pad_index=float("nan"))
        gathered = self.accelerator.gather(padded)
        return gathered[~torch.isnan(gathered).any(dim=-1)]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches plus their StepCounts, passed on to compute_loss as `num_items_in_batch`.

        Trainer counts `labels != -100` for this; preference batches have no labels, so count here.
        """
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        local = torch.zeros(2, dtype=torch.long)
        for b in batch_samples:
            n = b["ref_chosen_logps"].shape[0]
            local += torch.stack([torch.tensor(n), b["response_mask"][:n].sum().cpu()])
        if self.accelerator.num_processes > 1:
            local = self.accelerator.gather(local.to(self.accelerator.device).reshape(1, 2)).sum(dim=0).cpu()
        return batch_samples, StepCounts(int(local[0]), int(local[1]), self.accelerator.num_processes)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ref_w, ref_l = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        pi_w, pi_l, pair_weights = self._policy_forward(model, inputs)
        margins = (ref_w - ref_l).detach()
        strategy_weights = self.strategy.weights if model.training else self.strategy.eval_weights
        weights = torch.as_tensor(strategy_weights(margins), dtype=torch.float32, device=pi_w.device)
        n = ref_w.shape[0]
        bco_delta = self.loss_state.mean if self.loss_state is not None else 0.0
        tokens = self._token_counts(inputs, n)
        out = self.objective(pi_w, pi_l, ref_w, ref_l, weights, tokens, bco_delta, pair_weights)
        chosen_tokens = inputs["response_mask"][:n].sum()
        sft_nll = -pi_w.sum() / chosen_tokens.clamp(
            min=1
        )  # mean token NLL of the chosen responses in the batch
        counts = num_items_in_batch if isinstance(num_items_in_batch, StepCounts) else None
        if counts is None:  # evaluation, or a call outside the training loop: this batch is the whole batch
            loss = out.losses.mean()
            sft = sft_nll
        else:
            loss = accumulated_share(out.losses.sum(), counts.pairs, counts.world_size)
            sft = accumulated_share(-pi_w.sum(), counts.chosen_tokens, counts.world_size)
        if self.objective.sft_weight > 0:
            loss = loss + self.objective.sft_weight * sft
        if model.training:
            if self.strategy.online:
                self._step_margins.append(margins)
            if self.loss_state is not None:
                self._step_rewards.append(torch.cat([out.chosen_rewards, out.rejected_rewards]).detach())
            self._record_train_metrics(out, weights, sft_nll, inputs, pair_weights)
        if return_outputs:
            return loss, {
                "chosen_rewards": out.chosen_rewards.detach(),
                "rejected_rewards": out.rejected_rewards.detach(),
            }
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(
            loss.detach()
        )  # stays on the device: one sync per optimizer step, in the guard
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite
        return loss

    def _token_counts(self, inputs, n: int):
        """Response lengths for ipo_norm, sigmoid_norm and sft
        (policy: its response_mask; references: their score files)."""
        if not self.objective.needs_tokens:
            return None
        from mrpo.core.inputs import TokenCounts

        lengths = inputs["response_mask"].sum(dim=-1)
        return TokenCounts(
            lengths[:n], lengths[n:], inputs["ref_chosen_tokens"], inputs["ref_rejected_tokens"]
        )

    def _advance_strategy(self) -> None:
        """After an optimizer step: online strategies learn from every rank's pairs of that step,
        in rank order, so all ranks keep the same state and the state moves once per step whatever
        the accumulation; so does bco_pair's running reward mean (one observation per step: the
        mean reward of all its pairs)."""
        if self._step_rewards:
            rewards = torch.cat(self._step_rewards).float().unsqueeze(-1)
            self._step_rewards.clear()
            self.loss_state.update(self._gather_rows(rewards).mean().item())
        if not self._step_margins:
            return
        margins = torch.cat(self._step_margins)
        self._step_margins.clear()
        self.strategy.update(self._gather_rows(margins))

    def _record_train_metrics(self, out, weights, sft_nll, inputs, pair_weights=None) -> None:
        gather = self.accelerator.gather_for_metrics
        chosen, rejected = (
            gather(out.chosen_rewards.detach().float()),
            gather(out.rejected_rewards.detach().float()),
        )
        m = self._train_metrics
        m["rewards/chosen"].append(chosen.mean().item())
        m["rewards/rejected"].append(rejected.mean().item())
        m["rewards/margin"].append((chosen - rejected).mean().item())
        m["rewards/accuracy"].append(
            reward_accuracy(chosen, rejected, self.objective.beta, self.precision).item()
        )
        m["sft_nll"].append(gather(sft_nll.detach().reshape(1)).mean().item())
        if pair_weights is not None:  # WPO: the mean weight of the step's pairs
            m["wpo_weight"].append(gather(pair_weights.detach().float()).mean().item())
        clipped = torch.as_tensor(out.clipped_fraction, dtype=torch.float32, device=chosen.device).reshape(1)
        m["clipped_fraction"].append(gather(clipped).mean().item())
        w = weights.detach().float()
        w_mean = w.mean(dim=0) if w.dim() == 2 else w
        w_mean = gather(w_mean.reshape(1, -1)).mean(dim=0)
        for name, value in zip(self.reference_names, w_mean.tolist(), strict=True):
            m[f"weight/{name}"].append(value)
        self._tokens_since_log += int(gather(inputs["attention_mask"].sum().reshape(1)).sum().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss plus per-pair (chosen reward, rejected reward) for `validation_metrics`; no state update."""
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
        """One intra-op thread for a tiny model on CPU (see mrpo.modeling.models.cpu_threads_for);
        torch's default otherwise."""
        return torch_threads(cpu_threads_for(self.model, self.args.device))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self._last_log_time is None:
            self._last_log_time = time.perf_counter()
        if isinstance(resume_from_checkpoint, str | os.PathLike):
            load_strategy_state(self.strategy, resume_from_checkpoint)
            if self.loss_state is not None:
                load_loss_state(self.loss_state, resume_from_checkpoint)
        with self._threads():
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        with checkpoint_save_guard(self):
            super()._save_checkpoint(model, trial)

    def evaluate(self, *args, **kwargs):
        with self._threads():
            return super().evaluate(*args, **kwargs)


# ---------------------------------------------------------------- weighting state in checkpoints
