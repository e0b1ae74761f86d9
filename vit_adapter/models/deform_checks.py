"""Validation of the deformable-attention core's inputs (``ops.ms_deform_attn``): shapes, dtypes, devices.

Kept apart from ``ops`` so that each file stays one job: every backend receives inputs checked here.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from torch import Tensor

SpatialShapes = Tensor | Sequence[Sequence[int]]


def level_starts(shapes: Sequence[tuple[int, int]]) -> list[int]:
    starts, total = [], 0
    for h, w in shapes:
        starts.append(total)
        total += h * w
    return starts


def shapes_as_tuples(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """(L, 2) LongTensor or sequence of (H, W) -> list of python int pairs (one host sync for tensors)."""
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes must have shape (L, 2), got {tuple(spatial_shapes.shape)}")
        if spatial_shapes.is_floating_point() or spatial_shapes.is_complex():
            raise ValueError(f"spatial_shapes must be an integer tensor, got {spatial_shapes.dtype}")
        pairs = spatial_shapes.tolist()
    else:
        try:
            pairs = [tuple(p) for p in spatial_shapes]
        except TypeError as err:
            raise ValueError(f"spatial_shapes must be a sequence of (H, W) pairs, got {spatial_shapes!r}") from err
    shapes = []
    for pair in pairs:
        try:
            h, w = (operator.index(v) for v in pair)  # ints, numpy ints; not floats or bools-as-pairs
        except (TypeError, ValueError) as err:
            raise ValueError(f"spatial_shapes entries must be (H, W) int pairs, got {pair!r}") from err
        if h <= 0 or w <= 0:
            raise ValueError(f"spatial_shapes entries must be positive, got {pair!r}")
        shapes.append((h, w))
    if not shapes:
        raise ValueError("spatial_shapes is empty; need at least one level")
    return shapes


def check_inputs(
    value: Tensor, shapes: Sequence[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> None:
    for name, t, dims in (
        ("value", value, 4),
        ("sampling_locations", sampling_locations, 6),
        ("attention_weights", attention_weights, 5),
    ):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}")
    batch, length, heads, _ = value.shape
    expected_length = sum(h * w for h, w in shapes)
    if length != expected_length:
        raise ValueError(f"value length {length} != sum(H*W) = {expected_length} of spatial_shapes {list(shapes)}")
    b, n_query, m, n_levels, n_points, two = sampling_locations.shape
    if two != 2:
        raise ValueError(f"sampling_locations last dim must be 2 (x, y), got {two}")
    if b != batch:
        raise ValueError(f"batch mismatch: value has {batch}, sampling_locations has {b}")
    if m != heads:
        raise ValueError(f"heads mismatch: value has {heads}, sampling_locations has {m}")
    if n_levels != len(shapes):
        raise ValueError(f"levels mismatch: spatial_shapes has {len(shapes)}, sampling_locations has {n_levels}")
    expected = (batch, n_query, heads, n_levels, n_points)
    if tuple(attention_weights.shape) != expected:
        raise ValueError(
            f"attention_weights shape {tuple(attention_weights.shape)} != {expected} implied by "
            "sampling_locations (B, Lq, M, L, P)"
        )
