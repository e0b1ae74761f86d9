"""Process group, device and batch split: ``torchrun`` sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, NCCL on GPU.

Every tensor collective of training and evaluation goes through ``all_reduce_sum`` / ``any_rank`` here, on the
group's device (``Dist.device``): NCCL accepts only CUDA tensors, so a CPU tensor in a collective of an NCCL
group raises ("No backend type associated with device type cpu").
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .config import Config


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, timeout_s: int = 1800) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, NCCL on GPU. ``timeout_s`` bounds every
    collective (train.dist_timeout_s; NCCL's own default is 10 minutes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """``t`` summed over the ranks, on ``t``'s device; the collective itself runs on the group's device."""
    if d.world == 1:
        return t
    buf = t.to(d.device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when ``flag`` is true on any: a decision all ranks take together, so none waits in a
    collective the others have left (e.g. a divergence seen by one rank only)."""
    if d.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def per_process_batch(cfg: Config, world: int) -> int:
    """Images per process and micro-batch: ``data.batch_size`` is the global batch of one optimiser step
    (the paper's 16 = 8 GPUs x 2), split over ``world`` processes and ``train.grad_accum`` micro-batches."""
    total, accum = cfg.data.batch_size, cfg.train.grad_accum
    if total % (world * accum):
        raise ValueError(
            f"data.batch_size = {total} (the global batch) does not divide into {world} process(es) x "
            f"train.grad_accum = {accum}; use a multiple of {world * accum}"
        )
    return total // (world * accum)


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def use_syncbn(cfg: Config, world: int, device: torch.device) -> bool:
    """SyncBN by default under DDP on CUDA (model.norm null), as the official configs; gloo on CPU cannot
    synchronise BatchNorm, so CPU DDP keeps per-process BN. An explicit model.norm=bn keeps BN everywhere."""
    if world == 1:
        return False
    return cfg.model.norm == "syncbn" or (cfg.model.norm is None and device.type == "cuda")
