"""The default profile's tiny model zoo: real transformers checkpoints built locally, no hub.

Each member (params.yaml `zoo.members`) gets its own tokenizer (a small
byte-level BPE or a character-level one, both built with `tokenizers`), an
architecture (Llama or GPT-2) and a short SFT run on its own part of the
synthetic fact world (mrpo/data/synthetic.py): the `attributes` it learns right and the
`misled` ones it learns wrong (the decoys), with its own seed, so the references'
knowledge, and so their preferences, genuinely differ. Everything is deterministic
under `cfg.seed`; the facts are those of `cfg.seed`'s world, the data's too: building
again with the same settings writes the same bytes. How long it took varies run to
run, so it goes to `zoo.metrics_file` (git-ignored logs/, no DVC output), never into the
zoo folder that the score stages depend on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import string
import time
from pathlib import Path

import torch

from mrpo.config.schema import zoo_attention_heads
from mrpo.data.synthetic import generate_pairs, sft_examples, total_pairs
from mrpo.data.tokenization import encode_response
from mrpo.io import replace_directory, write_json_atomically
from mrpo.modeling.logprobs import collate_responses, response_logps
from mrpo.modeling.models import torch_threads
from mrpo.preflight import check_stage
from mrpo.reporting.records import ZOO_MANIFEST
from mrpo.runtime import progress

log = logging.getLogger("mrpo")

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
BPE_VOCAB_SIZE = 400
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
MAX_POSITIONS = 1024
DISABLED_MARKER = "ZOO_DISABLED"


def member_seed(seed: int, name: str) -> int:
    """A per-member seed derived from the global one, so members see different data and initialisations."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)


# ---------------------------------------------------------------- tokenizers


def _corpus(seed: int) -> list[str]:
    pairs = generate_pairs(total_pairs(), seed)  # every wording, every value
    return [text for p in pairs for text in (p["prompt"], p["chosen"], p["rejected"])]


def build_bpe_tokenizer(seed: int, vocab_size: int = BPE_VOCAB_SIZE):
    """A small byte-level BPE trained on synthetic text (any input text still encodes, byte by byte)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return _wrap(tok)


def build_char_tokenizer():
    """One token per character of printable ASCII (plus newline); anything else is <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS.values())}
    for ch in chars:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join back without spaces
    return _wrap(tok)


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)


def build_tokenizer(kind: str, seed: int):
    if kind == "bpe":
        return build_bpe_tokenizer(seed)
    if kind == "char":
        return build_char_tokenizer()
    raise ValueError(f"unknown zoo tokenizer kind {kind!r}; allowed: bpe, char")


# ---------------------------------------------------------------- models


def build_model(member, tokenizer, seed: int):
    """A freshly initialised Llama- or GPT-2-style causal LM sized by the member's settings."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    heads = zoo_attention_heads(member.hidden_size)  # params.yaml validation relies on the same rule
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    if member.architecture == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=member.hidden_size,
            intermediate_size=4 * member.hidden_size,
            num_hidden_layers=member.num_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=True,
            **ids,
        )
        return LlamaForCausalLM(config)
    if member.architecture == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=member.hidden_size,
            n_layer=member.num_layers,
            n_head=heads,
            n_positions=MAX_POSITIONS,
            # GPT-2's default 0.1 dropouts (Llama has none) slow memorising the facts several-fold.
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **ids,
        )
        return GPT2LMHeadModel(config)
    raise ValueError(f"unknown zoo architecture {member.architecture!r}; allowed: llama, gpt2")


def sft_train(
    model, tokenizer, pairs: list[dict], steps: int, seed: int, batch_size: int = BATCH_SIZE
) -> list[float]:
    """SFT on the chosen responses (loss on response tokens only), AdamW, linear decay.
    Returns the loss curve."""
    if steps == 0:
        return []
    encoded = [
        encode_response(tokenizer, p["prompt"], p["chosen"], MAX_POSITIONS, chat_template=False)
        for p in pairs
    ]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.9 * s / steps)
    model.train()
    losses = []
    order = torch.randperm(len(encoded), generator=generator).tolist()
    cursor = 0
    for _ in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(encoded), generator=generator).tolist(), 0
        batch = collate_responses(
            [encoded[i] for i in order[cursor : cursor + batch_size]], tokenizer.pad_token_id
        )
        cursor += batch_size
        n_tokens = batch["response_mask"][:, 1:].sum()
        loss = -response_logps(model, **batch).sum() / n_tokens
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------- the stage


def build_member(member, seed: int, output_dir: Path) -> dict:
    """Build, train and save one member into output_dir/<name>, atomically (a temp dir renamed into place)."""
    # Zoo models are tiny (~0.2M parameters): one thread is fastest (see models.SMALL_MODEL_PARAMETERS).
    with torch_threads(1):
        return _build_member(member, seed, Path(output_dir))


def _build_member(member, seed: int, output_dir: Path) -> dict:
    """The member's manifest, as written to output_dir/<name>/mrpo_zoo.json, plus "seconds" (not written)."""
    start = time.perf_counter()
    mseed = member_seed(seed, member.name)
    tokenizer = build_tokenizer(member.tokenizer, mseed)
    model = build_model(member, tokenizer, mseed)
    # The global seed's world: a member knows (or is misled on) the facts the preference data asks about.
    examples = sft_examples(seed, member.attributes, member.misled)
    pairs = [{"prompt": prompt, "chosen": response} for prompt, response in examples]
    losses = sft_train(model, tokenizer, pairs, member.train_steps, mseed)

    manifest = {
        "name": member.name,
        "architecture": member.architecture,
        "tokenizer": member.tokenizer,
        "hidden_size": member.hidden_size,
        "num_layers": member.num_layers,
        "train_steps": member.train_steps,
        "attributes": list(member.attributes),
        "misled": list(member.misled),
        "seed": seed,
        "member_seed": mseed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "train_pairs": len(pairs),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
    }  # settings and seeded results only: anything run-varying here would re-run every score stage
    final = output_dir / member.name
    tmp = output_dir / f".{member.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / ZOO_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_directory(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing in the stage's output
    manifest["seconds"] = round(time.perf_counter() - start, 2)
    return manifest


def build_zoo(cfg) -> list[dict]:
    """Build every `cfg.zoo.members` entry under `cfg.zoo.output_dir` and the build's timings to
    `cfg.zoo.metrics_file`; with zoo.enabled false write only a marker (and timings of nothing)."""
    check_stage(cfg, "zoo")
    output_dir = Path(cfg.zoo.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    marker = output_dir / DISABLED_MARKER
    if not cfg.zoo.enabled:
        marker.write_text("zoo.enabled is false in params.yaml; references come from elsewhere\n")
        log.info("zoo disabled: wrote %s", marker)
        write_json_atomically(cfg.zoo.metrics_file, zoo_timings([], 0.0, 0))
        return []
    marker.unlink(missing_ok=True)
    # Leftovers of a killed build would otherwise become part of the stage's (DVC-hashed) output.
    for leftover in [*output_dir.glob(".*.tmp-*"), *output_dir.glob(".*.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    if not cfg.zoo.members:
        log.warning("zoo.members is empty: nothing to build")
    start = time.perf_counter()
    workers = zoo_workers(len(cfg.zoo.members))
    built = []
    for member, info in zip(cfg.zoo.members, _build_all(cfg, output_dir, workers), strict=True):
        loss = info["final_loss"]
        log.info(
            "zoo: built %s (%s/%s, %d params, %d steps, loss %s) in %.1fs",
            member.name,
            member.architecture,
            member.tokenizer,
            info["parameters"],
            member.train_steps,
            "n/a" if loss is None or math.isnan(loss) else f"{info['first_loss']:.3f} -> {loss:.3f}",
            info["seconds"],
        )
        built.append(info)
    seconds = time.perf_counter() - start
    write_json_atomically(cfg.zoo.metrics_file, zoo_timings(built, seconds, workers))
    log.info(
        "zoo: %d members in %.1fs (%d process(es), 1 CPU thread each); timings in %s",
        len(built),
        seconds,
        workers,
        cfg.zoo.metrics_file,
    )
    return built


def zoo_timings(built: list[dict], seconds: float, workers: int) -> dict:
    """The `zoo.metrics_file` payload: wall-clock seconds of the whole build and of each member, and the
    processes it used. Kept apart from the zoo folder because it differs on every run."""
    return {
        "seconds": round(seconds, 2),
        "workers": workers,
        "members": {info["name"]: {"seconds": info["seconds"]} for info in built},
    }


def zoo_workers(members: int) -> int:
    """Processes to build the members in: one per usable CPU core (each trains on one thread), at most one per
    member. Members are independent and seeded by name, so the result does not depend on this."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(members, cores))


def _build_all(cfg, output_dir: Path, workers: int) -> list[dict]:
    members = list(cfg.zoo.members)
    if workers <= 1:
        return [build_member(m, cfg.seed, output_dir) for m in progress(members, desc="zoo", unit="model")]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a fresh interpreter per worker (forking a process that has used torch's thread pool can hang).
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(build_member, m, cfg.seed, output_dir) for m in members]
        return [f.result() for f in progress(futures, desc="zoo", unit="model")]
