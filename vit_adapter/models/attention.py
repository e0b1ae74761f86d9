"""Cross-attention used by the injector and the extractor: multi-scale deformable (the paper's) or dense.

Both modules take ``(query (B,Lq,D), reference_points (1|B,Lq,1,2), value (B,Lv,D), spatial_shapes)`` and return
(B, Lq, D), so the ``attention`` switch swaps one for the other without touching the callers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import ms_deform_attn

Shapes = Sequence[tuple[int, int]]


class _ShortSoftmax(torch.autograd.Function):
    """Softmax over the last dim, for rows of a few values (4 per head in the extractor, 12 in the injector).

    ``torch.softmax`` vectorises along the reduced dim, so on rows this short its CPU kernel and its backward run
    at a fraction of memory speed (docs/performance.md: about 8 % of an embedded extractor call). Built from
    whole-tensor elementwise ops and one reduction each, forward + backward at the embedded default's shapes
    (1 thread) take 0.32 instead of 0.82 ms per extractor call (4 x 336 queries, 6 heads, 4 values) and 0.14
    instead of 0.41 ms per injector call (4 x 64 queries, 12 values). Same function: exp(x - max) / sum, backward
    w * (g - sum(g * w)); the float64 rule is checked in tests/test_speed_equivalence.py. No double backward
    (nothing here needs one).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        w = (x - x.amax(-1, keepdim=True)).exp_()  # shift by the row max: exp never overflows
        w = w.div_(w.sum(-1, keepdim=True))
        ctx.save_for_backward(w)
        return w

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (w,) = ctx.saved_tensors
        gw = grad * w
        return gw.sub_(w * gw.sum(-1, keepdim=True))


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
        # Softmax jointly over levels x points per head (reference §1.7), by the short-row softmax above. At least
        # fp32, as autocast runs torch.softmax and as the deformable core consumes the weights (a no-op for fp32
        # input); float64 stays float64, since a float64 evaluation is the yardstick of the same-function rule.
        if weights.dtype != torch.float64:
            weights = weights.float()
        weights = _ShortSoftmax.apply(weights).view(b, lq, self.n_heads, self.n_levels, self.n_points)
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
