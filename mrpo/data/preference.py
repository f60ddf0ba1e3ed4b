"""The training data: prepared pairs joined by pair_id with their K references' stored log-probs, tokenized
for the policy with the anchor's tokenizer (`mrpo.data.tokenization.encode_response`, exactly as scoring
did, so at
step 0 the policy's log-probs equal the anchor's scores), and collated into one 2B-row batch per step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from mrpo.data.scorefile import ReferenceScores
from mrpo.data.tokenization import EncodedResponse, encode_response, render_prompt
from mrpo.errors import ScoreDataError
from mrpo.modeling.logprobs import collate_responses

log = logging.getLogger("mrpo")


@dataclass(frozen=True)
class JoinedScores:
    """Reference log-probs for the pairs of one split, in the pairs' order:
    (N, K) each, reference order as given."""

    chosen: np.ndarray
    rejected: np.ndarray
    fits: np.ndarray  # (N,) bool: every reference could score both responses
    chosen_tokens: np.ndarray  # (N, K) response lengths in each reference's tokenizer (for ipo_norm)
    rejected_tokens: np.ndarray
    reference_fits: np.ndarray  # (N, K) bool: which references could


def join_scores(pair_ids: Sequence[str], scores: Sequence[ReferenceScores], split: str) -> JoinedScores:
    """Look every pair up in every score table;
    refuse (naming pair, reference and file) a pair without a score."""
    chosen, rejected, each_fits = [], [], []
    chosen_tokens, rejected_tokens = [], []
    index = pd.Index(pair_ids)
    for s in scores:
        missing = index.difference(s.frame.index)
        if len(missing):
            raise ScoreDataError(
                f"{s.path}: {len(missing)} {split} pair(s) have no score for reference {s.name!r}, "
                f"e.g. pair_id {missing[0]!r}; the score file is incomplete or stale: "
                f"re-run `mrpo score --reference {s.name}`"
            )
        rows = s.frame.loc[index]
        chosen.append(rows["chosen_logp"].to_numpy(np.float64))
        rejected.append(rows["rejected_logp"].to_numpy(np.float64))
        chosen_tokens.append(rows["chosen_tokens"].to_numpy(np.int64))
        rejected_tokens.append(rows["rejected_tokens"].to_numpy(np.int64))
        each_fits.append(rows["fits"].to_numpy(bool))
    reference_fits = np.stack(each_fits, axis=1) if each_fits else np.ones((len(pair_ids), 0), dtype=bool)
    return JoinedScores(
        np.stack(chosen, axis=1),
        np.stack(rejected, axis=1),
        reference_fits.all(axis=1),
        np.stack(chosen_tokens, axis=1),
        np.stack(rejected_tokens, axis=1),
        reference_fits,
    )


# ---------------------------------------------------------------- dataset and collator


@dataclass(frozen=True)
class PreferenceExample:
    pair_id: str
    chosen: EncodedResponse
    rejected: EncodedResponse
    ref_chosen_logps: np.ndarray  # (K,)
    ref_rejected_logps: np.ndarray  # (K,)
    ref_chosen_tokens: np.ndarray | None = None  # (K,) response lengths in each reference's tokenizer
    ref_rejected_tokens: np.ndarray | None = None


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized pairs with their K reference log-probs;
    `skipped` counts pairs left out because they do not fit.

    `skipped_by_reference[name]`: pairs that reference's score file flags fits=False (longer than its
    score.max_length; a pair may be flagged by several); `skipped_by_length`: pairs every reference scored
    that do not fit the policy's train.max_length. `skipped_summary()` says it in words, for messages.
    """

    def __init__(
        self,
        examples: list[PreferenceExample],
        reference_names: Sequence[str],
        skipped: int = 0,
        skipped_by_reference: dict[str, int] | None = None,
        skipped_by_length: int = 0,
        total: int | None = None,
    ):
        self.examples = examples
        self.reference_names = tuple(reference_names)
        self.skipped = skipped
        self.skipped_by_reference = dict(skipped_by_reference or {})
        self.skipped_by_length = skipped_by_length
        self.total = len(examples) + skipped if total is None else total

    def skipped_summary(self) -> str:
        """E.g.
        "of 200 pairs, 200 skipped: reference 'gpt2_char' flagged 200 as not fitting score.max_length"."""
        parts = [
            f"reference {name!r} flagged {n} as not fitting score.max_length"
            for name, n in self.skipped_by_reference.items()
            if n
        ]
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
        examples.append(
            PreferenceExample(
                row.pair_id,
                enc_w,
                enc_l,
                joined.chosen[i],
                joined.rejected[i],
                joined.chosen_tokens[i],
                joined.rejected_tokens[i],
            )
        )
    by_reference = {s.name: int((~joined.reference_fits[:, k]).sum()) for k, s in enumerate(scores)}
    dataset = PreferenceDataset(
        examples,
        [s.name for s in scores],
        skipped,
        skipped_by_reference=by_reference,
        skipped_by_length=too_long,
        total=len(pairs),
    )
    if skipped:
        log.warning("%s: %s (fits=False)", split, dataset.skipped_summary())
    return dataset


@dataclass
class PreferenceCollator:
    """Pads a list of PreferenceExample into ONE batch of 2B rows:
    the B chosen sequences, then the B rejected.

    Returns input_ids, attention_mask, response_mask (2B, T),
    ref_chosen_logps, ref_rejected_logps (B, K) float32 and, when the examples carry them,
    ref_chosen_tokens, ref_rejected_tokens (B, K) int64.
    """

    pad_token_id: int

    def __call__(self, examples: list[PreferenceExample]) -> dict[str, torch.Tensor]:
        batch = collate_responses(
            [e.chosen for e in examples] + [e.rejected for e in examples], self.pad_token_id
        )
        # float64 scores keep their precision until the loss; the loss runs in fp32 like the policy log-probs.
        batch["ref_chosen_logps"] = torch.tensor(
            np.stack([e.ref_chosen_logps for e in examples]), dtype=torch.float32
        )
        batch["ref_rejected_logps"] = torch.tensor(
            np.stack([e.ref_rejected_logps for e in examples]), dtype=torch.float32
        )
        if all(e.ref_chosen_tokens is not None for e in examples):
            batch["ref_chosen_tokens"] = torch.tensor(np.stack([e.ref_chosen_tokens for e in examples]))
            batch["ref_rejected_tokens"] = torch.tensor(np.stack([e.ref_rejected_tokens for e in examples]))
        return batch
