"""Cross-attention used by the injector and the extractor: multi-scale deformable (the paper's) or dense.

Both modules take ``(query (B,Lq,D), reference_points (1|B,Lq,1,2), value (B,Lv,D), spatial_shapes)`` and return
(B, Lq, D), so the ``attention`` switch swaps one for the other without touching the callers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import ms_deform_attn

Shapes = Sequence[tuple[int, int]]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the official projections and initialisation (reference §1.7)."""

    def __init__(self, *, dim: int, n_levels: int, n_heads: int, n_points: int = 4, ratio: float = 1.0) -> None:
        super().__init__()
        value_dim = int(dim * ratio)
        if value_dim % n_heads:
            raise ValueError(f"dim*ratio={value_dim} must be divisible by n_heads={n_heads}")
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.head_dim = value_dim // n_heads
        self.sampling_offsets = nn.Linear(dim, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start on a fixed star: head m points along angle 2*pi*m/M, scaled to the unit square and
        # stretched by (p+1) for point p, identical for every level; attention starts uniform.
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Shapes) -> Tensor:
        b, lq, _ = query.shape
        lv = value.shape[1]
        if len(spatial_shapes) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels, got spatial_shapes {list(spatial_shapes)}")
        v = self.value_proj(value).view(b, lv, self.n_heads, self.head_dim)
        # sampling_offsets and attention_weights read the same query: one GEMM over their stacked weights gives
        # the same values, reads the query once, and its backward forms the query gradient in one GEMM instead of
        # two GEMMs and an add (the extractor runs this on all 21/16·HW multi-scale tokens). Parameters unchanged.
        n_off = self.sampling_offsets.out_features
        proj = F.linear(
            query,
            torch.cat([self.sampling_offsets.weight, self.attention_weights.weight]),
            torch.cat([self.sampling_offsets.bias, self.attention_weights.bias]),
        )
        offsets = proj[..., :n_off].view(b, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = proj[..., n_off:].view(b, lq, self.n_heads, self.n_levels * self.n_points)
        # Softmax jointly over levels x points per head (reference §1.7).
        weights = weights.softmax(-1).view(b, lq, self.n_heads, self.n_levels, self.n_points)
        # Offsets are in pixels of each level: normalise x by its width and y by its height (one fused op).
        norm = offsets.new_tensor([[w, h] for h, w in spatial_shapes])
        loc = torch.addcdiv(reference_points[:, :, None, :, None, :], offsets, norm[None, None, None, :, None, :])
        out = ms_deform_attn(v, spatial_shapes, loc, weights)  # always computed in fp32
        return self.output_proj(out.to(v.dtype))


class DenseCrossAttention(nn.Module):
    """Standard multi-head attention over all value tokens with its own q/k/v/out projections (the ablation's
    "Global" attention, paper Table 7). Reference points and level shapes are accepted and unused."""

    def __init__(self, *, dim: int, n_heads: int, ratio: float = 1.0, **_: object) -> None:
        super().__init__()
        inner = int(dim * ratio)
        if inner % n_heads:
            raise ValueError(f"dim*ratio={inner} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Shapes) -> Tensor:
        b, lq, _ = query.shape
        lv = value.shape[1]
        q = self.q_proj(query).view(b, lq, self.n_heads, -1).transpose(1, 2)
        k = self.k_proj(value).view(b, lv, self.n_heads, -1).transpose(1, 2)
        v = self.v_proj(value).view(b, lv, self.n_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, -1))


def build_cross_attention(
    kind: str, *, dim: int, n_levels: int, n_heads: int, n_points: int, ratio: float
) -> nn.Module:
    if kind == "deformable":
        return MSDeformAttn(dim=dim, n_levels=n_levels, n_heads=n_heads, n_points=n_points, ratio=ratio)
    if kind == "dense":
        return DenseCrossAttention(dim=dim, n_heads=n_heads, ratio=ratio)
    raise ValueError(f"attention must be 'deformable' or 'dense', got {kind!r}")
