"""Run under `torchrun --nproc_per_node 2` on a CUDA host: the real train + eval loop in a process group whose
backend, like NCCL's, is registered for CUDA only ("cuda:gloo": a CPU tensor in a collective raises "No backend
type associated with device type cpu"). Both ranks share GPU 0, which gloo allows and NCCL does not. Rank 0
writes the final metrics to ``<out>/metrics.json``."""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vit_adapter.engine.config import config_from_dict
from vit_adapter.engine.trainer import train


def main(cfg_json: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = "0"  # one GPU for both ranks
    dist.init_process_group("cuda:gloo", timeout=datetime.timedelta(seconds=120))
    cfg = config_from_dict(json.loads(cfg_json))
    result = train(cfg, Path(out) / "run", progress=False)
    if dist.get_rank() == 0:
        (Path(out) / "metrics.json").write_text(json.dumps(result["final"]), encoding="utf-8")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
