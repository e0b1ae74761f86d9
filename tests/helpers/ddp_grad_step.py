"""Run under `torchrun --nproc_per_node 2`: one DDP step of a tiny segmentation model on this rank's half of a
fixed global batch; rank 0 saves the synchronised gradients. BatchNorm uses running statistics (eval mode):
on CPU, SyncBatchNorm is unavailable, and per-rank batch statistics would make ranks differ by design."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from vit_adapter.engine.build import build_model
from vit_adapter.engine.config import config_from_dict
from vit_adapter.engine.trainer import LossModule


def global_batch(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    s = cfg.data.image_size
    images = torch.randn(4, 3, s, s, generator=g)
    targets = torch.randint(0, cfg.head.num_classes, (4, s, s), generator=g)
    targets[:, :4] = 255  # some ignored pixels
    return images, targets


def step_gradients(cfg, images, targets, ddp: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    net = LossModule(model)
    if ddp:
        # As the trainer: the unused-parameter search only where the variant needs it.
        net = torch.nn.parallel.DistributedDataParallel(
            net, find_unused_parameters=model.backbone_module.has_unused_parameters
        )
    net(images, targets)["loss"].backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def main(cfg_json: str, out: str) -> None:
    import json

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = config_from_dict(json.loads(cfg_json))
    images, targets = global_batch(cfg)
    per = images.shape[0] // world
    grads = step_gradients(cfg, images[rank * per : (rank + 1) * per], targets[rank * per : (rank + 1) * per], True)
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
