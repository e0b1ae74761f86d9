"""Run under `torchrun --nproc_per_node 2`: the real training loop where only rank 1 sees an infinite loss at
iteration 2 (a hook the test installs). Each rank writes what ended its training to ``<out>/rank<r>.txt``; a
rank left waiting in a collective would instead hit the group's timeout."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from vit_adapter.engine.config import config_from_dict
from vit_adapter.engine.hooks import DivergedError, Hook
from vit_adapter.engine.trainer import train


class InfOnRank1(Hook):
    def after_loss(self, loop, losses) -> None:
        if loop.d.rank == 1 and loop.done + 1 == 2:
            losses["loss"] = losses["loss"] * float("inf")


def main(cfg_json: str, out: str) -> None:
    torch.set_num_threads(1)
    cfg = config_from_dict(json.loads(cfg_json))
    rank = int(os.environ["RANK"])
    try:
        train(cfg, Path(out) / "run", progress=False, hooks=[InfOnRank1()])
        ended = "finished"
    except DivergedError as err:
        ended = f"diverged: {err}"
    (Path(out) / f"rank{rank}.txt").write_text(ended, encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
