"""Run the train stage under torchrun (one process per rank, gloo on CPU); used by
tests/training/test_trainer.py.

    torchrun --standalone --nproc_per_node 2 tests/ddp_train.py PARAMS OVERRIDES_JSON

OVERRIDES_JSON maps dotted params keys to values (as `mrpo --set`). Rank 0 writes
the stage's usual outputs (metrics file, plots, policy).
"""

from __future__ import annotations

import json
import sys

from mrpo.config.load import load_config
from mrpo.runtime import setup_logging
from mrpo.stages.train import train


def main() -> None:
    params, overrides = sys.argv[1], json.loads(sys.argv[2])
    setup_logging()
    train(load_config(params, overrides), track=False)


if __name__ == "__main__":
    main()
