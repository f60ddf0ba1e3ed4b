"""The train stage's policy, batches and loss under FSDP2 (torch's `fully_shard`) on gloo CPU processes;
used by tests/training/test_trainer.py.

accelerate 1.15 turns FSDP on only for accelerator process groups (CUDA, XPU, NPU, ...): with CPU processes
its state is MULTI_CPU and the Trainer wraps the policy in DDP whatever the FSDP config says. torch 2.13
itself shards on CPU, so this drives the stage's own pieces (load_policy, MRPOTrainer.compute_loss and its
collator, trained-policy gathering and saving) through torch's FSDP2 by hand.

    torchrun --standalone --nproc_per_node N tests/fsdp_train.py PARAMS OVERRIDES_JSON OUT_DIR MODE

MODE "run": two optimizer steps over global batches of 8 pairs (8 / N per rank), a sharded checkpoint
(torch.distributed.checkpoint: model and optimizer) in OUT_DIR/ckpt after the first, the global losses in
OUT_DIR/losses.json, the policy gathered and saved by the stage's save path into OUT_DIR/policy, and its
log-probs of the first batch, under the sharded model and the saved one reloaded, in OUT_DIR/logps.json. MODE
"resume": load OUT_DIR/ckpt, take the second step, its loss in OUT_DIR/resumed.json. With N = 1 nothing is
sharded: the one-process reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from mrpo.config.load import load_config
from mrpo.config.schema import ReferenceConfig
from mrpo.modeling.models import load_model
from mrpo.runtime import seed_everything, setup_logging
from mrpo.training.policy import policy_from_state_dict, save_policy
from mrpo.training.setup import build_trainer, prepare_training

GLOBAL_BATCH = 8


def shard(model) -> None:
    """One FSDP unit per decoder layer (the model's _no_split_modules), then the rest: accelerate's
    TRANSFORMER_BASED_WRAP, as configs/accelerate/fsdp.yaml asks for."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(base._no_split_modules or ())
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(model)


def main() -> None:
    params, overrides, out, mode = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    setup_logging()
    cfg = load_config(params, overrides)
    seed_everything(cfg.seed)
    setup = prepare_training(cfg)
    trainer = build_trainer(cfg, setup)  # its TrainingArguments join torchrun's gloo group
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    model = trainer.model
    if world > 1:
        shard(model)
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.train.learning_rate,
        weight_decay=cfg.train.weight_decay,
    )
    data = setup.datasets["train"]
    per_rank = GLOBAL_BATCH // world

    def batch(step: int, whole: bool = False):
        lo = step * GLOBAL_BATCH + (0 if whole else rank * per_rank)
        return trainer.data_collator([data[i] for i in range(lo, lo + (GLOBAL_BATCH if whole else per_rank))])

    def take_step(step: int) -> float:
        loss = trainer.compute_loss(model, batch(step))  # the mean over this rank's pairs
        loss.backward()  # FSDP averages the gradients over the ranks, as DDP does
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        return total.item() / world

    if mode == "resume":
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=str(out / "ckpt"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        second = take_step(1)
        if rank == 0:
            (out / "resumed.json").write_text(json.dumps([second]))
        return

    losses = [take_step(0)]
    if world > 1:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=str(out / "ckpt"))
    losses.append(take_step(1))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model.eval()
    with torch.no_grad():
        logps = trainer._policy_logps(model, batch(0, whole=True))
    if rank == 0:
        policy = policy_from_state_dict(cfg, full)
        save_policy(policy, setup.tokenizer, out / "policy", merge_lora=cfg.train.lora.merge)
        with torch.no_grad():  # the saved directory, loaded as any reference or evaluation loads a model
            reloaded = trainer._policy_logps(
                load_model(ReferenceConfig("policy", str(out / "policy"))), batch(0, True)
            )
        (out / "losses.json").write_text(json.dumps(losses))
        (out / "logps.json").write_text(
            json.dumps({"sharded": [x.tolist() for x in logps], "saved": [x.tolist() for x in reloaded]})
        )


if __name__ == "__main__":
    main()
