"""Multi-scale deformable attention core (reference §1.7): pure PyTorch, a compiled CPU kernel, Triton, mmcv.

`ms_deform_attn` has the tensor contract of the official `ms_deform_attn_core_pytorch` and of mmcv's
`multi_scale_deformable_attn_pytorch`:

- value               (B, sum(H_l*W_l), M, C_h)   M heads, C_h channels per head, levels concatenated
- spatial_shapes      (L, 2) LongTensor of (H_l, W_l), or a python sequence of (H, W) int pairs
- sampling_locations  (B, Lq, M, L, P, 2)         normalised (x, y); 0/1 are the map's outer edges
- attention_weights   (B, Lq, M, L, P)            already softmaxed by the caller
- returns             (B, Lq, M*C_h)

Sampling is bilinear with align_corners=False (pixel = loc*size - 0.5) and zero padding, which is what the
official CUDA kernel does (`ms_deform_im2col_cuda.cuh`). The op always computes in fp32 (float64 stays float64),
like the official autograd Function's `custom_fwd(cast_inputs=float32)`.

Backends:
- "cpp"       the compiled CPU kernel (`csrc/ms_deform_attn_cpu.cpp`, built on first use by `deform_ext`); forward
              and backward per sampling point, OpenMP over (batch, query) forward and (batch, head) backward.
- "pytorch"   the fast pure-PyTorch path below, a weighted `embedding_bag` over bilinear corners; the fallback.
- "reference" the straightforward per-level `grid_sample` algorithm of the official repo; kept as the yardstick.
- "mmcv"      mmcv's compiled `MultiScaleDeformableAttnFunction`; CUDA tensors only, optional extra.
- "triton"    the Triton kernels (`deform_triton`), compiled at first use: CUDA tensors, or CPU tensors under
              `TRITON_INTERPRET=1` (Triton's interpreter, how the tests run it).
- "auto"      CUDA: "triton" when triton imports and the GPU has compute capability 7.0+, else "mmcv" when it
              imports, else "pytorch". CPU: "cpp" when the kernel builds, else "pytorch".
              `$VIT_ADAPTER_DEFORM_BACKEND` = auto | cpp | torch | pytorch | triton | mmcv | reference overrides
              what "auto" picks (a forced backend that cannot run on the device fails with a one-line error; "cpp"
              on CUDA means the pure-PyTorch path, the compiled kernel being CPU-only). The first call that
              resolves "auto" prints one line naming the backend.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import deform_ext
from .deform_checks import SpatialShapes
from .deform_checks import check_inputs as _check_inputs
from .deform_checks import level_starts as _level_starts
from .deform_checks import shapes_as_tuples as _shapes_as_tuples

__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "BackendUnavailable",
    "cpp_available",
    "ms_deform_attn",
    "ms_deform_attn_cpp",
    "ms_deform_attn_reference",
    "ms_deform_attn_pytorch",
    "mmcv_available",
    "resolve_backend",
    "triton_available",
    "triton_supports",
]

BACKENDS = ("auto", "cpp", "pytorch", "reference", "mmcv", "triton")
ENV_BACKEND = "VIT_ADAPTER_DEFORM_BACKEND"
_ENV_CHOICES = {
    "auto": "auto",
    "cpp": "cpp",
    "torch": "pytorch",
    "pytorch": "pytorch",
    "triton": "triton",
    "mmcv": "mmcv",
    "reference": "reference",
}
# The official module passes im2col_step=64 to the CUDA op (reference §1.7).
MMCV_IM2COL_STEP = 64


class BackendUnavailable(RuntimeError, ValueError):
    """A requested backend cannot run here. A RuntimeError for callers of the op, and a ValueError so that the
    CLI reports a bad ``$VIT_ADAPTER_DEFORM_BACKEND`` as its one-line ``error: ...`` like any other bad input."""


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------
def ms_deform_attn(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str = "auto",
) -> Tensor:
    """Multi-scale deformable attention core; see the module docstring for shapes and semantics.

    Half/bfloat16 inputs are cast to float32 and autocast is disabled inside, so the result is float32 (the
    caller decides whether to cast back); float64 inputs give a float64 result (for gradcheck).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown ms_deform_attn backend {backend!r}; expected one of {BACKENDS}")
    shapes = _shapes_as_tuples(spatial_shapes)
    _check_inputs(value, shapes, sampling_locations, attention_weights)
    if backend == "auto":
        backend = resolve_backend(value.device)

    # fp32 always (half/bf16 are upcast, like the official custom_fwd(cast_inputs=float32)); float64 stays.
    inputs = (value, sampling_locations, attention_weights)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32
    value, sampling_locations, attention_weights = (t.to(dtype) for t in inputs)
    with torch.autocast(device_type=value.device.type, enabled=False):
        if backend == "cpp":
            return ms_deform_attn_cpp(value, shapes, sampling_locations, attention_weights)
        if backend == "pytorch":
            return ms_deform_attn_pytorch(value, shapes, sampling_locations, attention_weights)
        if backend == "reference":
            return ms_deform_attn_reference(value, shapes, sampling_locations, attention_weights)
        if backend == "triton":
            return _ms_deform_attn_triton(value, shapes, sampling_locations, attention_weights)
        return _ms_deform_attn_mmcv(value, spatial_shapes, shapes, sampling_locations, attention_weights)


def resolve_backend(device: torch.device | str = "cpu") -> str:
    """The backend "auto" runs on ``device``, honouring ``$VIT_ADAPTER_DEFORM_BACKEND`` (see the module docstring).

    Read on every call (a dict lookup), so a test or a launcher can switch it; the choice is announced once per
    (device type, backend) in the process. An unknown value raises ValueError, a forced backend that cannot run
    on ``device`` raises `BackendUnavailable`; both one line.
    """
    device = torch.device(device)
    raw = os.environ.get(ENV_BACKEND, "").strip().lower() or "auto"
    if raw not in _ENV_CHOICES:
        raise ValueError(f"{ENV_BACKEND}={raw!r}; expected one of auto, cpp, torch, pytorch, triton, mmcv, reference")
    choice = _ENV_CHOICES[raw]
    if choice in ("pytorch", "reference"):  # run on every device
        backend = choice
    elif choice == "triton":
        _require_triton(device, f"{ENV_BACKEND}=triton")
        backend = "triton"
    elif choice == "mmcv":
        _require_mmcv(device, f"{ENV_BACKEND}=mmcv")
        backend = "mmcv"
    elif device.type == "cuda":  # auto, or cpp (CPU-only; there it means "not triton/mmcv")
        if choice == "auto" and triton_supports(device):
            backend = "triton"
        elif choice == "auto" and mmcv_available():
            backend = "mmcv"
        else:
            backend = "pytorch"
    elif device.type != "cpu":  # other accelerators: the pure-PyTorch path is the only fast one that runs there
        backend = "pytorch"
    elif choice == "auto":
        backend = "cpp" if cpp_available() else "pytorch"
    else:
        backend = choice
        if backend == "cpp" and not cpp_available():
            raise RuntimeError(f"{ENV_BACKEND}=cpp but the compiled CPU kernel could not be built (see the log line)")
    _announce_backend(device.type, backend, raw)
    return backend


@functools.cache
def _announce_backend(device_type: str, backend: str, requested: str) -> None:
    detail = {
        "cpp": "compiled CPU kernel",
        "pytorch": "pure-PyTorch embedding_bag path",
        "mmcv": "mmcv CUDA op",
        "triton": "Triton kernel" + (" under the interpreter" if device_type == "cpu" else ""),
        "reference": "per-level grid_sample reference",
    }.get(backend, backend)
    deform_ext.announce(f"ms_deform_attn backend on {device_type}: {backend} ({detail}; {ENV_BACKEND}={requested})")


def cpp_available() -> bool:
    """True when the compiled CPU kernel is built (or builds now, on first call) and loads. Never raises."""
    return deform_ext.load_kernel() is not None


@functools.cache
def triton_available() -> bool:
    """True when triton and the kernel module import (it needs a GPU or the interpreter only to run). Never raises."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
        from . import deform_triton  # noqa: F401
    except Exception:  # a broken triton install fails in many ways (ImportError, OSError, AttributeError, ...)
        return False
    return True


def _require_triton(device: torch.device, what: str) -> None:
    if not triton_available():
        raise BackendUnavailable(f"{what}: triton is not importable; install it (it comes with CUDA torch wheels)")
    from . import deform_triton

    try:
        deform_triton.check_device(device, what)
    except RuntimeError as err:
        raise BackendUnavailable(str(err)) from None


def triton_supports(device: torch.device) -> bool:
    """Whether "auto" may pick the Triton kernels on this CUDA device (compute capability 7.0+). Never raises."""
    if not triton_available():
        return False
    from . import deform_triton

    return deform_triton.supports(device)


def _require_mmcv(device: torch.device, what: str) -> None:
    if not mmcv_available():
        raise BackendUnavailable(
            f"{what} requested but mmcv.ops is not importable; install the optional extra (pip install "
            "'.[mmcv]', a CUDA build) or use backend='pytorch'"
        )
    if device.type != "cuda":
        raise BackendUnavailable(f"{what} needs CUDA tensors; use backend='pytorch' on CPU")


@functools.cache
def mmcv_available() -> bool:
    """True when mmcv's compiled deformable-attention op can be imported. Never raises."""
    try:
        if importlib.util.find_spec("mmcv") is None:
            return False
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction  # noqa: F401
    except Exception:  # a broken mmcv build fails in many ways (ImportError, OSError, AttributeError, ...)
        return False
    return True


# --------------------------------------------------------------------------------------------------------------
# Compiled CPU kernel
# --------------------------------------------------------------------------------------------------------------
def ms_deform_attn_cpp(
    value: Tensor, spatial_shapes: Sequence[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The compiled CPU kernel (forward and backward in C++). Raw backend: validated inputs of one float dtype."""
    kernel = deform_ext.load_kernel()
    if kernel is None:
        raise RuntimeError("ms_deform_attn backend 'cpp': the compiled CPU kernel could not be built (see the log)")
    if value.device.type != "cpu":
        raise RuntimeError(f"ms_deform_attn backend 'cpp' needs CPU tensors, got {value.device}")
    if value.numel() == 0 or sampling_locations.numel() == 0:
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
    flat = [int(v) for hw in spatial_shapes for v in hw]
    return _CppDeformAttn.apply(value, sampling_locations, attention_weights, flat, kernel)


class _CppDeformAttn(torch.autograd.Function):
    """Autograd wrapper of the compiled kernel; its backward returns all three gradients in one pass."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, loc: Tensor, attn: Tensor, shapes: list[int], kernel: Any) -> Tensor:
        value, loc, attn = value.contiguous(), loc.contiguous(), attn.contiguous()
        ctx.save_for_backward(value, loc, attn)
        ctx.shapes, ctx.kernel = shapes, kernel
        return kernel.forward(value, shapes, loc, attn)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        value, loc, attn = ctx.saved_tensors
        g_value, g_loc, g_attn = ctx.kernel.backward(grad_out.contiguous(), value, ctx.shapes, loc, attn)
        need = ctx.needs_input_grad
        return (g_value if need[0] else None, g_loc if need[1] else None, g_attn if need[2] else None, None, None)


# --------------------------------------------------------------------------------------------------------------
# Fast pure-PyTorch path (the fallback)
# --------------------------------------------------------------------------------------------------------------
def ms_deform_attn_pytorch(
    value: Tensor, spatial_shapes: Sequence[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Fast pure-PyTorch core: a weighted `embedding_bag` over the 4 bilinear corners of every point.

    Raw backend: expects validated inputs of one float dtype and python (H, W) shapes; use `ms_deform_attn`.

    The trick: each output row (b, q, m) is a weighted sum of value rows. Copy value (B, S, M, C_h) into a table
    whose levels carry a zero border (1 pixel before, 2 after), viewed as B*S'*M rows of C_h channels. A point's
    4 bilinear corners are then 4 table rows (border rows are zero, which *is* zero padding, so no bounds masks
    are needed once the pixel coordinate is clamped into the border), with weights `attention * bilinear`. The
    output is one `embedding_bag(mode="sum")` over bags of 4*L*P (row, weight) pairs, and its (B*Lq*M, C_h)
    result reshapes to (B, Lq, M*C_h) for free. No (B*M, C_h, H, W) transposes, no per-level calls and no
    (B*M, C_h, Lq, L*P) intermediate as in the grid_sample algorithm.

    The backward is hand-written (`_BilinearBagAttn`), because autograd through embedding_bag is slow on CPU:
    - d/d(corner weight) = <grad_out row, table row>: a sampled dense-dense product (`torch.sparse.sampled_addmm`
      on the CSR pattern of the corner rows); the bilinear chain rule turns it into d/d(attention) and d/d(loc).
    - d/d(value) is the transposed problem. The points are sorted by their top-left corner row (L*P per query,
      4x fewer keys than corners), so one more `embedding_bag` sums, for each table row and corner k, the
      gradient rows that used it as corner k. The 4 per-corner tables are then shifted onto each other per level
      and the zero border is dropped.
    Indices are piecewise constant in the locations, exactly as in bilinear grid_sample.
    """
    if value.numel() == 0 or sampling_locations.numel() == 0:  # nothing to gather; the simple path copes
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)  # hashable: it keys the plan cache
    return _BilinearBagAttn.apply(value, sampling_locations, attention_weights, shapes)


@dataclass(frozen=True)
class _Plan:
    """Shape-only constants of the padded table, cached per (shapes, points, device, dtype)."""

    pad_starts: tuple[int, ...]  # first padded-table token of each level
    padded_length: int  # S' = sum((H+3)(W+3))
    dest: Tensor  # (S,) padded-table token of each value token
    size_xy: Tensor  # (L*P*2,) (W_l, H_l) per point, interleaved like the (x, y) locations
    stride_y: Tensor  # (L*P,) int, padded width W_l+3 per point
    origin: Tensor  # (L*P,) int, padded token of pixel (0, 0) per point: pad_start + (W+3) + 1
    corners: Tensor  # (4, L*P) token offsets of the corners (x0,y0), (x1,y0), (x0,y1), (x1,y1)


@functools.lru_cache(maxsize=64)
def _plan(shapes: tuple[tuple[int, int], ...], n_points: int, device: torch.device, dtype: torch.dtype) -> _Plan:
    # Built outside inference mode so the cached tensors stay usable by later autograd-enabled calls.
    with torch.inference_mode(False):
        pad_starts, dest, total = [], [], 0
        for h, w in shapes:
            pad_starts.append(total)
            yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            dest.append((total + (yy + 1) * (w + 3) + xx + 1).flatten())
            total += (h + 3) * (w + 3)

        def per_point(values: list) -> Tensor:  # per-level values -> one entry per (level, point)
            return torch.tensor(values).repeat_interleave(n_points, dim=0)

        widths = [w for _, w in shapes]
        return _Plan(
            pad_starts=tuple(pad_starts),
            padded_length=total,
            dest=torch.cat(dest).to(device),
            size_xy=per_point([[w, h] for h, w in shapes]).flatten().to(device, dtype),
            stride_y=per_point([w + 3 for w in widths]).to(device),
            origin=per_point([s + w + 4 for s, w in zip(pad_starts, widths)]).to(device),
            corners=per_point([[0, 1, w + 3, w + 4] for w in widths]).t().contiguous().to(device),
        )


@functools.lru_cache(maxsize=64)
def _row_constants(
    shapes: tuple[tuple[int, int], ...],
    n_points: int,
    device: torch.device,
    batch: int,
    heads: int,
    index_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Integer constants of the table-row formula: (b*S' + origin_l)*M + m as (B, 1, M, L*P), the y step
    (W_l+3)*M as (L*P,) and the 4 corner offsets * M as (4, L*P)."""
    plan = _plan(shapes, n_points, device, torch.float32)  # only shape fields are used
    with torch.inference_mode(False):
        b = torch.arange(batch, device=device)[:, None, None, None] * plan.padded_length
        m = torch.arange(heads, device=device)[None, None, :, None]
        row_origin = (b + plan.origin) * heads + m
        return (
            row_origin.to(index_dtype),
            (plan.stride_y * heads).to(index_dtype),
            (plan.corners * heads).to(index_dtype),
        )


class _BilinearBagAttn(torch.autograd.Function):
    """Autograd wrapper of the fast path; see `ms_deform_attn_pytorch` for the algorithm."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, loc: Tensor, attn: Tensor, shapes: tuple[tuple[int, int], ...]) -> Tensor:
        batch, _, heads, head_dim = value.shape
        _, n_query, _, n_levels, n_points, _ = loc.shape
        n_bags, lp = batch * n_query * heads, n_levels * n_points
        plan = _plan(shapes, n_points, value.device, value.dtype)
        n_rows = batch * plan.padded_length * heads
        index_dtype = torch.int32 if n_rows < 2**31 else torch.int64

        table = value.new_zeros(batch, plan.padded_length, heads, head_dim)
        table.index_copy_(1, plan.dest, value)

        # Pixel coordinates (align_corners=False), clamped into the zero border: any point further out has all
        # 4 corners in the border, and its gradient is 0 as in grid_sample. Everything is laid out
        # (bags, L*P[*2]) so that broadcasts run over long contiguous rows (tiny inner dims are slow on CPU).
        pix = torch.addcmul(_scalar(-0.5, value), loc.reshape(n_bags, lp * 2), plan.size_xy)
        clamped = torch.clamp(pix, min=_scalar(-1.0, value), max=plan.size_xy)
        inside = clamped == pix  # where d(clamped)/d(pix) = 1
        base = clamped.floor()
        frac = clamped.sub_(base).view(n_bags, lp, 2)
        # A NaN location keeps NaN weights (NaN output, as grid_sample gives) but needs a valid index.
        base = base.nan_to_num_(nan=-1.0).view(n_bags, lp, 2)

        # Table row of the top-left corner: (b*S' + origin + y*(W+3) + x) * M + m, in two fused integer ops.
        base = base.to(index_dtype)
        row_origin, y_step, corner_offsets = _row_constants(shapes, n_points, value.device, batch, heads, index_dtype)
        top_left = torch.add(row_origin, base[..., 0].view(batch, n_query, heads, lp), alpha=heads)
        top_left = top_left.addcmul_(base[..., 1].view(batch, n_query, heads, lp), y_step).view(n_bags, lp)
        rows = top_left[:, None, :] + corner_offsets  # (bags, 4, L*P)

        # Corner weights attention * (1-fy|fy) * (1-fx|fx), in the corner order of `corners`.
        fx, fy = frac[..., 0], frac[..., 1]
        a = attn.reshape(n_bags, lp)
        a_y1 = a * fy
        a_y0 = a - a_y1
        weights = torch.empty(n_bags, 4, lp, dtype=value.dtype, device=value.device)
        torch.mul(a_y0, fx, out=weights[:, 1])
        torch.sub(a_y0, weights[:, 1], out=weights[:, 0])
        torch.mul(a_y1, fx, out=weights[:, 3])
        torch.sub(a_y1, weights[:, 3], out=weights[:, 2])

        out = F.embedding_bag(
            rows.view(n_bags, 4 * lp),
            table.view(n_rows, head_dim),
            per_sample_weights=weights.view(n_bags, 4 * lp),
            mode="sum",
        )
        ctx.save_for_backward(table, rows, top_left, weights, frac, a, inside)
        ctx.shapes, ctx.plan = shapes, plan
        ctx.loc_shape, ctx.attn_shape = loc.shape, attn.shape
        return out.view(batch, n_query, heads * head_dim)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        table, rows, top_left, weights, frac, a, inside = ctx.saved_tensors
        head_dim = table.shape[-1]
        grad_rows = grad_out.reshape(rows.shape[0], head_dim)
        need_value, need_loc, need_attn = ctx.needs_input_grad[:3]
        g_value = g_loc = g_attn = None
        if need_loc or need_attn:
            g_w = _corner_weight_grads(grad_rows, table.view(-1, head_dim), rows)
            g_loc, g_attn = _chain_bilinear(g_w, frac, a, inside, ctx.plan.size_xy, need_loc, need_attn)
            g_loc = g_loc.view(ctx.loc_shape) if g_loc is not None else None
            g_attn = g_attn.view(ctx.attn_shape) if g_attn is not None else None
        if need_value:
            g_value = _value_grad(grad_rows, top_left, weights, table.shape, ctx.shapes, ctx.plan)
        return g_value, g_loc, g_attn, None


def _corner_weight_grads(grad_rows: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """d out / d corner weight = <grad_out row, table row> for every (bag, corner): (bags, 4, L*P)."""
    n_bags, bag_size = rows.shape[0], rows[0].numel()
    nnz = n_bags * bag_size
    crow = torch.arange(0, nnz + 1, bag_size, dtype=rows.dtype, device=rows.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            crow, rows.reshape(-1), grad_rows.new_zeros(nnz), (n_bags, table.shape[0]), check_invariants=False
        )
        # beta=0 still reads the values (0 * NaN = NaN), hence zeros above.
        dots = torch.sparse.sampled_addmm(pattern, grad_rows, table.t(), beta=0.0)
    return dots.values().view(rows.shape)


def _chain_bilinear(
    g_w: Tensor, frac: Tensor, a: Tensor, inside: Tensor, size_xy: Tensor, need_loc: bool, need_attn: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Chain rule from corner-weight gradients to attention weights and sampling locations."""
    fx, fy = frac[..., 0], frac[..., 1]
    d_x_top = g_w[:, 1] - g_w[:, 0]  # d/dfx of the row-y0 pair, per unit weight
    d_x_bottom = g_w[:, 3] - g_w[:, 2]
    g_y0 = torch.addcmul(g_w[:, 0], d_x_top, fx)  # x-interpolated gradients of rows y0 and y1
    g_dy = torch.addcmul(g_w[:, 2], d_x_bottom, fx).sub_(g_y0)
    g_attn = torch.addcmul(g_y0, g_dy, fy) if need_attn else None
    g_loc = None
    if need_loc:
        g_dx = torch.addcmul(d_x_top, d_x_bottom.sub_(d_x_top), fy)
        g_pix = torch.stack((g_dx.mul_(a), g_dy.mul_(a)), dim=-1).view(a.shape[0], -1)
        g_loc = g_pix.mul_(size_xy).mul_(inside)  # d pix / d loc = size; 0 where the clamp was active
    return g_loc, g_attn


def _value_grad(
    grad_rows: Tensor,
    top_left: Tensor,
    weights: Tensor,
    table_shape: torch.Size,
    shapes: tuple[tuple[int, int], ...],
    plan: _Plan,
) -> Tensor:
    """Transposed embedding_bag grouped by top-left corner, then the 4 corner tables shifted together."""
    batch, padded_length, heads, head_dim = table_shape
    n_rows = batch * padded_length * heads
    keys = top_left.reshape(-1)
    n_points = keys.numel()
    order = torch.sort(keys).indices
    counts = torch.bincount(keys, minlength=n_rows)
    starts = counts.cumsum(0).sub_(counts)
    lp = top_left.shape[1]
    bag_of_point = torch.div(order, lp, rounding_mode="floor")  # which grad row each sorted point reads
    # Corner-major samples: corner k of the sorted points feeds output block k (rows k*n_rows ...).
    corner_weights = weights.transpose(0, 1).reshape(4, n_points).index_select(1, order)
    offsets = (starts + torch.arange(0, 4 * n_points, n_points, device=starts.device)[:, None]).view(-1)
    per_corner = F.embedding_bag(
        bag_of_point.repeat(4), grad_rows, offsets, per_sample_weights=corner_weights.view(-1), mode="sum"
    ).view(4, batch, padded_length, heads, head_dim)
    # Pixel (y, x) was corner k of the top-left (y - dy_k, x - dx_k); crop away the zero border.
    g_value = grad_rows.new_empty(batch, sum(h * w for h, w in shapes), heads, head_dim)
    token = 0
    for (h, w), start in zip(shapes, plan.pad_starts):
        lv = per_corner[:, :, start : start + (h + 3) * (w + 3)].view(4, batch, h + 3, w + 3, heads, head_dim)
        acc = g_value[:, token : token + h * w].view(batch, h, w, heads, head_dim)
        torch.add(lv[0, :, 1 : h + 1, 1 : w + 1], lv[1, :, 1 : h + 1, 0:w], out=acc)
        acc += lv[2, :, 0:h, 1 : w + 1]
        acc += lv[3, :, 0:h, 0:w]
        token += h * w
    return g_value


def _scalar(x: float, like: Tensor) -> Tensor:
    return torch.tensor(x, dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------------------------------------------
# Reference path (the official algorithm, reference §1.7)
# --------------------------------------------------------------------------------------------------------------
def ms_deform_attn_reference(
    value: Tensor, spatial_shapes: Sequence[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Straightforward per-level grid_sample algorithm (the official `ms_deform_attn_core_pytorch`).

    Raw backend like `ms_deform_attn_pytorch` (validated inputs, python shapes).

    Split value by level, view each level as (B*M, C_h, H_l, W_l), grid_sample it at grid 2*loc-1 per level,
    stack the levels, weight and sum over (L, P).
    """
    batch, _, heads, head_dim = value.shape
    _, n_query, _, n_levels, n_points, _ = sampling_locations.shape
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2.0 * sampling_locations - 1.0
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # (B, HW, M, C_h) -> (B*M, C_h, H, W)
        v = per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, h, w)
        # (B, Lq, M, P, 2) -> (B*M, Lq, P, 2)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*M, C_h, Lq, L, P) * (B*M, 1, Lq, L, P) -> sum -> (B*M, C_h, Lq)
    stacked = torch.stack(sampled, dim=-2)
    attn = attention_weights.transpose(1, 2).reshape(batch * heads, 1, n_query, n_levels, n_points)
    out = (stacked * attn).flatten(-2).sum(-1).view(batch, heads * head_dim, n_query)
    return out.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Triton and mmcv paths
# --------------------------------------------------------------------------------------------------------------
def _ms_deform_attn_triton(
    value: Tensor, shapes: Sequence[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    _require_triton(value.device, "ms_deform_attn backend 'triton'")
    if value.numel() == 0 or sampling_locations.numel() == 0:  # no programs to launch; the simple path copes
        return ms_deform_attn_reference(value, shapes, sampling_locations, attention_weights)
    from .deform_triton import ms_deform_attn_triton

    return ms_deform_attn_triton(value, shapes, sampling_locations, attention_weights)


# --------------------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------------------
def _ms_deform_attn_mmcv(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    _require_mmcv(value.device, "ms_deform_attn backend 'mmcv'")
    from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction

    if isinstance(spatial_shapes, Tensor):
        shapes_t = spatial_shapes.to(device=value.device, dtype=torch.long)
    else:
        shapes_t = torch.tensor(shapes, dtype=torch.long, device=value.device)
    starts = torch.tensor(_level_starts(shapes), dtype=torch.long, device=value.device)
    out = MultiScaleDeformableAttnFunction.apply(
        value, shapes_t, starts, sampling_locations, attention_weights, MMCV_IM2COL_STEP
    )
    return out
