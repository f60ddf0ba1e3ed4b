"""Run the score stage under torchrun, recording which shards each rank computes; used by
tests/stages/test_scoring.py.

    torchrun --standalone --nproc_per_node 2 tests/ddp_score.py PARAMS REFERENCE RECORD_DIR [KILL_RANK]

Each rank appends the index of every shard it computes to RECORD_DIR/rank-<rank>.txt. With
KILL_RANK, that rank SIGKILLs itself right after writing its first shard (a rank lost mid-run).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from mrpo.config.load import load_config
from mrpo.runtime import setup_logging
from mrpo.stages.score import score_reference


def main() -> None:
    params, reference, record_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    kill_rank = int(sys.argv[4]) if len(sys.argv) > 4 else None
    rank = int(os.environ["RANK"])
    record_dir.mkdir(parents=True, exist_ok=True)

    def on_shard(index, n_shards, path):
        with (record_dir / f"rank-{rank}.txt").open("a") as f:
            f.write(f"{index}\n")
        if rank == kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)

    setup_logging()
    score_reference(load_config(params), reference, on_shard=on_shard)


if __name__ == "__main__":
    main()
