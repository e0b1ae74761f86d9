"""Triton kernels of the multi-scale deformable attention core: CUDA with nothing to compile at install time.

Same contract and semantics as ``ops.ms_deform_attn`` (bilinear, align_corners=False, zero padding, the official
CUDA kernel's ``ms_deform_im2col_cuda.cuh``): pixel = loc * size - 0.5, and each of a point's 4 corners
contributes only when it lies inside the map. Gradients equal grid_sample's and the project's other backends' also
on the measure-zero border pixel = -1 (where the CUDA op drops the point). A NaN location contributes 0, as in the
CUDA op (grid_sample and the pure-PyTorch paths give NaN).

One program handles ``BLOCK_Q`` queries of one (batch, head) pair, with all ``C_h`` channels of a row in one tile
(the value row of a corner is contiguous: (B, S, M, C_h) layout). Forward: gather the 4 corner rows per
(level, point) and accumulate ``attention * bilinear`` in the input dtype (the caller upcasts fp16/bf16 to fp32,
float64 stays float64). Backward: the same gathers give the 4 dot products <grad_out, corner row>, from which the
attention and location gradients follow by the chain rule; the value gradient is scattered with atomic adds (its
summation order on a GPU is therefore not fixed; the fp32 rounding differences are within the float64 rule).

The kernels are wrapped by ``triton.jit`` on first use, not at import: ``triton.jit`` decides at decoration time
whether to build a GPU kernel or Triton's interpreter (``TRITON_INTERPRET=1``, which runs on CPU tensors), so
deciding per call lets one process (a test session) use the interpreter without re-importing this module.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

ENV_INTERPRET = "TRITON_INTERPRET"
_SUM = tl.standard._sum_combine  # the interpreter recognises this combiner and sums with numpy


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (read per call, like triton itself)."""
    return os.environ.get(ENV_INTERPRET, "0").strip().lower() in ("1", "true", "on", "yes")


def _forward_kernel(
    value_ptr,
    shapes_ptr,  # (L, 2) int64: H, W
    starts_ptr,  # (L,) int64: first token of each level
    loc_ptr,
    attn_ptr,
    out_ptr,
    n_query,
    n_value,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    N_LEVELS: tl.constexpr,
    N_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bm = tl.program_id(1)
    b = pid_bm // HEADS
    m = pid_bm % HEADS
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    c = tl.arange(0, BLOCK_C)
    q_ok = q < n_query
    c_ok = c < HEAD_DIM
    # Flat (b, q, m) index of each query-head row, as int64: its (L, P) block in attn and loc, and its output row.
    row = (b * n_query + q).to(tl.int64) * HEADS + m
    acc = tl.full([BLOCK_Q, BLOCK_C], 0, value_ptr.dtype.element_ty)
    for lvl in tl.static_range(N_LEVELS):
        h = tl.load(shapes_ptr + 2 * lvl)
        w = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        hf = h.to(acc.dtype)
        wf = w.to(acc.dtype)
        for pt in tl.static_range(N_POINTS):
            k = row * (N_LEVELS * N_POINTS) + lvl * N_POINTS + pt
            a = tl.load(attn_ptr + k, mask=q_ok, other=0.0)
            px = tl.load(loc_ptr + 2 * k, mask=q_ok, other=0.0) * wf - 0.5
            py = tl.load(loc_ptr + 2 * k + 1, mask=q_ok, other=0.0) * hf - 0.5
            live = q_ok & (px > -2.0) & (py > -2.0) & (px < wf + 1.0) & (py < hf + 1.0)
            # Beyond these bounds every corner is outside the map; the bounds only keep the integer coordinates
            # finite and small (a NaN or huge location). Dead points: any coordinate, every access is masked.
            px = tl.where(live, px, 0.0)
            py = tl.where(live, py, 0.0)
            x0f = tl.floor(px)
            y0f = tl.floor(py)
            fx = px - x0f
            fy = py - y0f
            x0 = x0f.to(tl.int64)
            y0 = y0f.to(tl.int64)
            x_lo = live & (x0 >= 0) & (x0 < w)  # corner column x0 inside the map
            x_hi = live & (x0 >= -1) & (x0 + 1 < w)  # corner column x0 + 1
            y_lo = (y0 >= 0) & (y0 < h)
            y_hi = (y0 >= -1) & (y0 + 1 < h)
            # Value element of corner (x0, y0), channel c: ((b*S + start + y*W + x) * M + m) * C_h + c.
            base = ((b * n_value + start + y0 * w + x0) * HEADS + m) * HEAD_DIM
            ptr = value_ptr + base[:, None] + c[None, :]
            step_y = w * HEADS * HEAD_DIM
            step_x = HEADS * HEAD_DIM
            v00 = tl.load(ptr, mask=(x_lo & y_lo)[:, None] & c_ok[None, :], other=0.0)
            v01 = tl.load(ptr + step_x, mask=(x_hi & y_lo)[:, None] & c_ok[None, :], other=0.0)
            v10 = tl.load(ptr + step_y, mask=(x_lo & y_hi)[:, None] & c_ok[None, :], other=0.0)
            v11 = tl.load(ptr + step_y + step_x, mask=(x_hi & y_hi)[:, None] & c_ok[None, :], other=0.0)
            a_y1 = a * fy
            a_y0 = a - a_y1
            w01 = a_y0 * fx
            w11 = a_y1 * fx
            acc += (a_y0 - w01)[:, None] * v00 + w01[:, None] * v01 + (a_y1 - w11)[:, None] * v10 + w11[:, None] * v11
    out = out_ptr + row[:, None] * HEAD_DIM + c[None, :]
    tl.store(out, acc, mask=q_ok[:, None] & c_ok[None, :])


def _backward_kernel(
    grad_out_ptr,
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    grad_attn_ptr,
    n_query,
    n_value,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    N_LEVELS: tl.constexpr,
    N_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bm = tl.program_id(1)
    b = pid_bm // HEADS
    m = pid_bm % HEADS
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    c = tl.arange(0, BLOCK_C)
    q_ok = q < n_query
    c_ok = c < HEAD_DIM
    row = (b * n_query + q).to(tl.int64) * HEADS + m
    tile_ok = q_ok[:, None] & c_ok[None, :]
    g = tl.load(grad_out_ptr + row[:, None] * HEAD_DIM + c[None, :], mask=tile_ok, other=0.0)
    for lvl in tl.static_range(N_LEVELS):
        h = tl.load(shapes_ptr + 2 * lvl)
        w = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        hf = h.to(g.dtype)
        wf = w.to(g.dtype)
        for pt in tl.static_range(N_POINTS):
            k = row * (N_LEVELS * N_POINTS) + lvl * N_POINTS + pt
            a = tl.load(attn_ptr + k, mask=q_ok, other=0.0)
            px = tl.load(loc_ptr + 2 * k, mask=q_ok, other=0.0) * wf - 0.5
            py = tl.load(loc_ptr + 2 * k + 1, mask=q_ok, other=0.0) * hf - 0.5
            live = q_ok & (px > -2.0) & (py > -2.0) & (px < wf + 1.0) & (py < hf + 1.0)
            px = tl.where(live, px, 0.0)
            py = tl.where(live, py, 0.0)
            x0f = tl.floor(px)
            y0f = tl.floor(py)
            fx = px - x0f
            fy = py - y0f
            x0 = x0f.to(tl.int64)
            y0 = y0f.to(tl.int64)
            x_lo = live & (x0 >= 0) & (x0 < w)  # corner column x0 inside the map
            x_hi = live & (x0 >= -1) & (x0 + 1 < w)  # corner column x0 + 1
            y_lo = (y0 >= 0) & (y0 < h)
            y_hi = (y0 >= -1) & (y0 + 1 < h)
            m00 = (x_lo & y_lo)[:, None] & c_ok[None, :]
            m01 = (x_hi & y_lo)[:, None] & c_ok[None, :]
            m10 = (x_lo & y_hi)[:, None] & c_ok[None, :]
            m11 = (x_hi & y_hi)[:, None] & c_ok[None, :]
            base = ((b * n_value + start + y0 * w + x0) * HEADS + m) * HEAD_DIM
            offs = base[:, None] + c[None, :]
            step_y = w * HEADS * HEAD_DIM
            step_x = HEADS * HEAD_DIM
            # <grad_out row, corner row>: d out / d (corner weight) per unit attention. tl.reduce with the standard
            # sum combiner is what tl.sum runs; called directly, it also runs under an interpreter switched on
            # after triton was imported (tl.sum itself is a jit function, bound to the mode of import time).
            d00 = tl.reduce(g * tl.load(value_ptr + offs, mask=m00, other=0.0), 1, _SUM)
            d01 = tl.reduce(g * tl.load(value_ptr + offs + step_x, mask=m01, other=0.0), 1, _SUM)
            d10 = tl.reduce(g * tl.load(value_ptr + offs + step_y, mask=m10, other=0.0), 1, _SUM)
            d11 = tl.reduce(g * tl.load(value_ptr + offs + step_y + step_x, mask=m11, other=0.0), 1, _SUM)
            gx = 1.0 - fx
            gy = 1.0 - fy
            d_y0 = gx * d00 + fx * d01  # x-interpolated rows y0 and y1
            d_y1 = gx * d10 + fx * d11
            tl.store(grad_attn_ptr + k, gy * d_y0 + fy * d_y1, mask=q_ok)
            # d pixel / d loc = size; dead points have all corners masked, so both are 0 there.
            g_px = a * (gy * (d01 - d00) + fy * (d11 - d10)) * wf
            g_py = a * (d_y1 - d_y0) * hf
            tl.store(grad_loc_ptr + 2 * k, g_px, mask=q_ok)
            tl.store(grad_loc_ptr + 2 * k + 1, g_py, mask=q_ok)
            # Scatter attention * bilinear weight * grad_out into the 4 corner rows (relaxed: only the sums matter,
            # as with CUDA's atomicAdd in the official op).
            a_y1 = a * fy
            a_y0 = a - a_y1
            w01 = a_y0 * fx
            w11 = a_y1 * fx
            tl.atomic_add(grad_value_ptr + offs, (a_y0 - w01)[:, None] * g, mask=m00, sem="relaxed")
            tl.atomic_add(grad_value_ptr + offs + step_x, w01[:, None] * g, mask=m01, sem="relaxed")
            tl.atomic_add(grad_value_ptr + offs + step_y, (a_y1 - w11)[:, None] * g, mask=m10, sem="relaxed")
            tl.atomic_add(grad_value_ptr + offs + step_y + step_x, w11[:, None] * g, mask=m11, sem="relaxed")


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any]:
    """(forward, backward) wrapped for the GPU compiler or the interpreter (triton.jit reads the switch now)."""
    previous = os.environ.get(ENV_INTERPRET)
    os.environ[ENV_INTERPRET] = "1" if interpret else "0"
    try:
        return triton.jit(_forward_kernel), triton.jit(_backward_kernel)
    finally:
        if previous is None:
            del os.environ[ENV_INTERPRET]
        else:
            os.environ[ENV_INTERPRET] = previous


def _blocks(head_dim: int, elements: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_C): all channels of a head in one tile of about ``elements`` values per program. Not tuned
    on a GPU yet (the project had none): 4096 forward, 2048 backward, which holds 5 such tiles live."""
    block_c = triton.next_power_of_2(head_dim)
    return max(16, min(128, elements // block_c)), block_c


def supports(device: torch.device) -> bool:
    """Whether the GPU compiler targets ``device``: CUDA of compute capability 7.0+ (the bar torch's inductor
    applies to Triton). Never raises."""
    try:
        return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 0)
    except Exception:  # noqa: BLE001  no driver, no such device: not supported
        return False


def check_device(device: torch.device, what: str = "ms_deform_attn backend 'triton'") -> None:
    """Raise a one-line error unless the kernels can run on ``device`` (CUDA, or CPU under the interpreter)."""
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        return
    raise RuntimeError(f"{what} needs a CUDA device (got {device}); on CPU only under {ENV_INTERPRET}=1")


def ms_deform_attn_triton(
    value: Tensor, spatial_shapes: Sequence[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Raw backend like ``ops.ms_deform_attn_pytorch``: validated inputs of one float dtype (fp32 or float64)."""
    check_device(value.device)
    shapes, starts = _level_tables(tuple((int(h), int(w)) for h, w in spatial_shapes), value.device)
    return _TritonDeformAttn.apply(value, sampling_locations, attention_weights, shapes, starts)


@functools.lru_cache(maxsize=64)
def _level_tables(shapes: tuple[tuple[int, int], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """(L, 2) H, W and (L,) first tokens as int64 on ``device``, cached: no host-to-device copy per call."""
    with torch.inference_mode(False):  # usable by later autograd-enabled calls
        table = torch.tensor(shapes, dtype=torch.int64)
        sizes = table[:, 0] * table[:, 1]
        return table.to(device), (torch.cumsum(sizes, 0) - sizes).to(device)


def _launch_geometry(value: Tensor, loc: Tensor, elements: int) -> tuple[dict[str, int], tuple[int, int]]:
    batch, _, heads, head_dim = value.shape
    n_query, n_levels, n_points = loc.shape[1], loc.shape[3], loc.shape[4]
    block_q, block_c = _blocks(head_dim, elements)
    meta = dict(HEADS=heads, HEAD_DIM=head_dim, N_LEVELS=n_levels, N_POINTS=n_points, BLOCK_Q=block_q, BLOCK_C=block_c)
    return meta, (triton.cdiv(n_query, block_q), batch * heads)


def _on_device(t: Tensor) -> Any:
    """Launch on the tensors' GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class _TritonDeformAttn(torch.autograd.Function):
    """Autograd wrapper: one forward launch; one backward launch gives all three gradients."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, loc: Tensor, attn: Tensor, shapes: Tensor, starts: Tensor) -> Tensor:
        value, loc, attn = value.contiguous(), loc.contiguous(), attn.contiguous()
        batch, n_value, heads, head_dim = value.shape
        n_query = loc.shape[1]
        out = value.new_empty(batch, n_query, heads, head_dim)
        meta, grid = _launch_geometry(value, loc, 4096)
        forward, _ = _kernels(value.device.type == "cpu" or interpreter_enabled())
        with _on_device(value):
            forward[grid](value, shapes, starts, loc, attn, out, n_query, n_value, **meta)
        ctx.save_for_backward(value, loc, attn, shapes, starts)
        return out.view(batch, n_query, heads * head_dim)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        value, loc, attn, shapes, starts = ctx.saved_tensors
        grad_out = grad_out.to(value.dtype).contiguous()
        grad_value = torch.zeros_like(value)  # atomic adds accumulate into it
        grad_loc = torch.empty_like(loc)
        grad_attn = torch.empty_like(attn)
        meta, grid = _launch_geometry(value, loc, 2048)
        _, backward = _kernels(value.device.type == "cpu" or interpreter_enabled())
        n_query, n_value = loc.shape[1], value.shape[1]
        with _on_device(value):
            backward[grid](
                grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc, grad_attn, n_query, n_value, **meta
            )
        need = ctx.needs_input_grad
        return (
            grad_value if need[0] else None,
            grad_loc if need[1] else None,
            grad_attn if need[2] else None,
            None,
            None,
        )
