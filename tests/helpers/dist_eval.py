"""Run under `torchrun --nproc_per_node 2`: sharded evaluation of a seeded tiny model (evaluation.evaluate with the
process group); rank 0 writes the gathered metrics as JSON. The test compares them with one process's."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from vit_adapter.engine.build import build_datasets, build_model
from vit_adapter.engine.config import config_from_dict
from vit_adapter.engine.distributed import Dist
from vit_adapter.engine.evaluation import evaluate


def seeded_model(cfg):
    torch.manual_seed(0)
    return build_model(cfg)


def main(cfg_json: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    d = Dist(dist.get_rank(), dist.get_world_size())
    cfg = config_from_dict(json.loads(cfg_json))
    _, val_set, collate = build_datasets(cfg, cfg.train.seed)
    metrics = evaluate(seeded_model(cfg), val_set, collate, cfg, torch.device("cpu"), d)
    if d.main:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(metrics, f, sort_keys=True)
    else:
        assert metrics == {}, metrics  # only rank 0 computes the metric
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
