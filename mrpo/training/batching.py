"""How training pairs are put into batches (`train.batching`), and how much of a batch is padding.

* `padded`: Trainer's random order; every batch padded to its longest sequence (about half padding at
  HH-RLHF lengths, batch 8).
* `grouped`: `GroupedSampler`: pairs of similar length share a step, so little padding.
* `packed` (default): grouped, and each batch's sequences run concatenated without padding, each with its own
  positions, each attending on its own (`mrpo.modeling.logprobs`, `packed=True`; `mrpo.modeling.packing`
  on SDPA); only where the model's attention supports it exactly (`packing_supported`), else grouped, said
  in the log. On `mrpo.modeling.packing`'s attention a pair's prompt runs once for both responses where
  their prompt ids agree (`mrpo.modeling.packing.shared_prompt_row`).

The set of pairs in each optimizer step depends only on the seed, the epoch and the step's global batch
(batch_size x gradient_accumulation_steps x world size), never on how the step is split into micro-batches
and ranks, so the objective, the online weighting and the SFT term stay invariant to that split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

log = logging.getLogger("mrpo")

# Steps per megabatch: pairs are sorted by length within a random megabatch of this many steps (as
# transformers' LengthGroupedSampler), so steps hold similar lengths while the order stays random.
MEGABATCH_STEPS = 50


def padding_share(lengths_per_batch: Sequence[Sequence[int]]) -> float:
    """Share of a padded batch's positions that are padding, over all batches: 1 - real / (rows x longest).

    Each inner sequence holds the lengths of the rows padded together (for a preference batch, the chosen
    and the rejected sequences of its pairs)."""
    real = sum(sum(b) for b in lengths_per_batch)
    padded = sum(len(b) * max(b) for b in lengths_per_batch if len(b))
    return 1 - real / padded if padded else 0.0


def pair_lengths(examples) -> list[int]:
    """Each PreferenceExample's width in a batch: its longer sequence (chosen and rejected share it)."""
    return [max(len(e.chosen.input_ids), len(e.rejected.input_ids)) for e in examples]


def megabatch_steps(pairs: int, step_size: int) -> int:
    """Steps per megabatch: MEGABATCH_STEPS, fewer on small data so that there are at least 4 megabatches
    (as transformers' LengthGroupedSampler): sorting a small data set whole puts the same lengths, often
    the same kind of pair, in every step, which measurably slowed learning on the 200-pair default task."""
    return max(1, min(MEGABATCH_STEPS, pairs // (4 * step_size)))


def grouped_order(lengths: Sequence[int], step_size: int, seed: int) -> list[int]:
    """Indices in steps of `step_size` pairs of similar length, steps in random order; deterministic in
    `seed`.

    A random permutation is cut into megabatches of `megabatch_steps` steps, each sorted by length (longest
    first, ties in random order, so equal lengths do not share the same steps every epoch) and cut into
    steps; the steps are shuffled. A last, short step stays last, so
    every other step is full and the batch boundaries fall where the sampler's steps do.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    mega = megabatch_steps(len(lengths), step_size) * step_size
    steps: list[list[int]] = []
    for start in range(0, len(order), mega):
        members = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        steps.extend(members[k : k + step_size] for k in range(0, len(members), step_size))
    short = [s for s in steps if len(s) < step_size]
    full = [s for s in steps if len(s) == step_size]
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return [i for step in shuffled + short for i in step]


class GroupedSampler(torch.utils.data.Sampler[int]):
    """`grouped_order` as a sampler; a new order each epoch (`set_epoch`, called by Trainer/accelerate)."""

    def __init__(self, lengths: Sequence[int], step_size: int, seed: int):
        self.lengths = list(lengths)
        self.step_size = step_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(grouped_order(self.lengths, self.step_size, self.seed + self.epoch))


@torch.no_grad()
def packing_supported(model: torch.nn.Module) -> bool:
    """Whether `model` gives the same log-probs packed as padded, checked on two short sequences (the
    attention must keep the sequences apart: `mrpo.modeling.packing` on SDPA, transformers' block-diagonal
    mask on eager, flash attention's variable-length path; others may attend across sequences)."""
    from mrpo.modeling.logprobs import response_logps

    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 2)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 0, 0]]) % vocab
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    response = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    device = next(model.parameters()).device
    args = [t.to(device) for t in (ids, attention, response)]
    was_training = model.training
    model.eval()
    try:
        padded = response_logps(model, *args)
        packed = response_logps(model, *args, packed=True)
    except (RuntimeError, ValueError, TypeError) as e:
        log.debug("packing probe failed: %s", e)
        return False
    finally:
        model.train(was_training)
    return bool(torch.allclose(packed, padded, rtol=0, atol=1e-4))


def resolve_batching(batching: str, model: torch.nn.Module) -> tuple[str, str | None]:
    """`train.batching`, with `packed` falling back to `grouped` where packing is not exact, and what to say
    about it when training starts (a fallback as a warning); the trainer logs it then, not here, because
    evaluation builds trainers too."""
    if batching != "packed":
        return batching, None
    if not packing_supported(model):
        return "grouped", (
            f"train: train.batching packed is not exact for {type(model).__name__} (its attention does not "
            "separate packed sequences); using grouped batching instead"
        )
    from mrpo.modeling.logprobs import unwrapped_model
    from mrpo.modeling.packing import packed_attention_note

    return "packed", f"train: packed batches: {packed_attention_note(unwrapped_model(model))}"
