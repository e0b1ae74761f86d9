"""What a run cost: parameters, backbone forward FLOPs and peak memory (``costs.json``)."""

from __future__ import annotations

import resource

import torch
from torch import nn

from .build import backbone_of
from .config import Config

FLOPS_NOTE = (
    "torch.utils.flop_counter at data.image_size x data.image_size, batch 1, backbone forward only (ViT + adapter, "
    "no FPN/task head). Counted: convolutions, linear layers/matmuls, and attention's two matmuls (QK^T and AV, "
    "counted through the math SDPA kernel). Not counted: grid_sample (the deformable sampling), softmax, norms, "
    "activations and other elementwise ops."
)


# ---------------------------------------------------------------------------------------------------------


def count_flops(model: nn.Module, cfg: Config, device: torch.device) -> int | None:
    """Forward FLOPs of one eval-size image (see FLOPS_NOTE). The fused CPU/flash SDPA kernels are invisible to
    the flop counter (it counted 0 for attention), so attention runs through the math kernel here, whose QK^T
    and AV matmuls are counted: 2 * 2 * B * heads * N^2 * head_dim."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    s = cfg.data.image_size
    x = torch.zeros(1, 3, s, s, device=device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            backbone_of(model)(x)  # backbone only: detection heads' proposal counts make head FLOPs data-dependent
        return int(fc.get_total_flops())
    finally:
        model.train(was)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB (process peak RSS)
