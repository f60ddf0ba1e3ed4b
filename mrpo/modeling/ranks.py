"""This process's place in a torchrun / accelerate launch job, and what the ranks share.

Under WORLD_SIZE > 1 each rank joins the launcher's process group (gloo on CPU, nccl on CUDA, one GPU per
rank, or a run of GPUs per rank for a reference spread over several), takes its share of the work, and
waits at barriers for the others.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mrpo.errors import ConfigError

# A rank that has finished its work waits at a barrier for the slowest rank's, which for a large reference
# can take hours; the launcher (torchrun) still stops every rank as soon as one of them dies.
BARRIER_TIMEOUT = timedelta(hours=48)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun / accelerate launch job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this machine

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        return cls(
            int(env.get("RANK", 0)),
            world,
            int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", world)),
        )

    def mine(self, shards: Sequence[int]) -> list[int]:
        """This rank's share of the shards to compute: every world-th one, from its own rank on."""
        return list(shards[self.rank :: self.world])


def rank_gpus(n_gpus: int, local_rank: int, local_world: int, reference: str) -> list[int]:
    """The GPUs one rank spreads its copy of a large reference over: this machine's GPUs cut into
    `local_world` equal runs of consecutive indices (8 GPUs, 4 ranks: [0, 1], [2, 3], ...); leftovers
    unused."""
    per_rank = n_gpus // local_world
    if per_rank < 1:
        raise ConfigError(
            f"references.{reference}.device_map: {local_world} ranks on this machine share {n_gpus} visible "
            f"GPU(s), and each rank's copy needs at least one; launch at most {n_gpus} ranks per machine"
        )
    return list(range(local_rank * per_rank, (local_rank + 1) * per_rank))


def rank_device(ranks: Ranks, device: torch.device, ref) -> tuple[torch.device, list[int] | None]:
    """(this rank's device, the GPUs it spreads `ref` over or None): one GPU per rank, or for a reference
    with a device_map a run of GPUs per rank; `device` itself when alone or on CPU."""
    if ranks.world == 1 or device.type != "cuda":
        return device, None
    if ref.device_map is None:
        return torch.device("cuda", ranks.local_rank), None
    gpus = rank_gpus(torch.cuda.device_count(), ranks.local_rank, ranks.local_world, ref.name)
    return torch.device("cuda", gpus[0]), gpus


@contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Join the launcher's process group for the block (gloo on CPU, nccl on CUDA) unless alone or already in
    one."""
    if ranks.world == 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def from_rank0(ranks: Ranks, value):
    """`value` as rank 0 has it, on every rank."""
    if ranks.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()
