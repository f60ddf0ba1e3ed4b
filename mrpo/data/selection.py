"""Subsets of a PreferenceDataset for one comparison member: its references' columns, its seed's pairs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mrpo.data.preference import PreferenceDataset


def select_references(dataset: PreferenceDataset, names: Sequence[str]) -> PreferenceDataset:
    """The same pairs with only the columns of `names` (in that order): a member's K references."""
    cols = [dataset.reference_names.index(n) for n in names]

    def pick(x):
        return None if x is None else x[cols]

    examples = [
        dataclasses.replace(
            e,
            ref_chosen_logps=e.ref_chosen_logps[cols],
            ref_rejected_logps=e.ref_rejected_logps[cols],
            ref_chosen_tokens=pick(e.ref_chosen_tokens),
            ref_rejected_tokens=pick(e.ref_rejected_tokens),
        )
        for e in dataset.examples
    ]
    return PreferenceDataset(examples, names, dataset.skipped)


def draw_pairs(dataset: PreferenceDataset, n: int, seed: int) -> PreferenceDataset:
    """`n` training pairs drawn without replacement, determined by `seed` (all of them when there are
    fewer)."""
    order = np.random.default_rng(seed).permutation(len(dataset))[:n]
    return PreferenceDataset([dataset.examples[i] for i in sorted(order)], dataset.reference_names)
