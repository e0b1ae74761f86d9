"""Building blocks shared by the segmentation and detection heads: parameter count, conv-norm-ReLU, resizing and
input checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

NormKind = Literal["bn", "syncbn"]


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared tensors counted once; buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in module.parameters())


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "syncbn":
        # Needs an initialised process group at train time (reference §4.5); use "bn" for single-process runs.
        return nn.SyncBatchNorm(channels)
    raise ValueError(f"norm must be 'bn' or 'syncbn', got {kind!r}")


class ConvNormAct(nn.Sequential):
    """conv (no bias, the norm has one) -> BN/SyncBN -> ReLU; mmcv's ``ConvModule`` with a norm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, norm: NormKind = "bn") -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        # mmcv ConvModule init: kaiming-normal, fan_out, relu.
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, norm_layer(norm, out_channels), nn.ReLU(inplace=True))


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    # mmseg configs use align_corners=False everywhere (reference §2).
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def check_features(features: Sequence[Tensor], in_channels: Sequence[int], who: str) -> None:
    if not isinstance(features, (list, tuple)) or len(features) != len(in_channels):
        n = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
        raise ValueError(f"{who} expects a list of {len(in_channels)} feature maps, got {n}")
    for i, (f, c) in enumerate(zip(features, in_channels)):
        if not isinstance(f, Tensor) or f.dim() != 4 or f.shape[1] != c:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"{who}: feature {i} must be (B,{c},H,W), got {shape}")


def check_channels(in_channels: Sequence[int], n: int, who: str) -> list[int]:
    chans = [int(c) for c in in_channels]
    if len(chans) != n or any(c <= 0 for c in chans):
        raise ValueError(f"{who} needs {n} positive in_channels, got {list(in_channels)}")
    return chans
