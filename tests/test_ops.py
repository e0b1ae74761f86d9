"""Tests of the multi-scale deformable attention core (vit_adapter/models/ops.py, reference §1.7).

The yardstick is a slow, explicit bilinear sampler written here with python loops; the fast path and the
per-level grid_sample reference must both equal it, including points outside the maps and uneven levels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vit_adapter.models import ops
from vit_adapter.models.ops import cpp_available, mmcv_available, ms_deform_attn

UNEVEN_SHAPES = [(3, 5), (2, 2), (1, 3)]
INJECTOR_SHAPES = [(32, 32), (16, 16), (8, 8)]  # ViT-Adapter-T injector at 256x256 (reference §1.3)
# The compiled kernel runs wherever a compiler exists (CI has gcc/g++/ninja); the pure-PyTorch fallback always.
needs_cpp = pytest.mark.skipif(not cpp_available(), reason="compiled CPU kernel unavailable (no compiler?)")
CPP = pytest.param("cpp", marks=needs_cpp)


def random_inputs(
    shapes: list[tuple[int, int]],
    batch: int = 2,
    n_query: int = 3,
    heads: int = 2,
    head_dim: int = 3,
    n_points: int = 2,
    dtype: torch.dtype = torch.float64,
    loc_range: tuple[float, float] = (-0.2, 1.2),
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    length = sum(h * w for h, w in shapes)
    value = torch.randn(batch, length, heads, head_dim, generator=gen, dtype=dtype)
    low, high = loc_range
    loc = low + (high - low) * torch.rand(batch, n_query, heads, len(shapes), n_points, 2, generator=gen, dtype=dtype)
    logits = torch.randn(batch, n_query, heads, len(shapes) * n_points, generator=gen, dtype=dtype)
    attn = logits.softmax(-1).view(batch, n_query, heads, len(shapes), n_points)
    return value, loc, attn


def explicit_bilinear(
    value: torch.Tensor, shapes: list[tuple[int, int]], loc: torch.Tensor, attn: torch.Tensor
) -> torch.Tensor:
    """Slow yardstick: per (batch, query, head, level, point), 4 neighbours with zero padding.

    Pixel coordinates follow align_corners=False: px = x*W - 0.5, py = y*H - 0.5 (reference §1.7).
    """
    batch, _, heads, head_dim = value.shape
    _, n_query, _, n_levels, n_points, _ = loc.shape
    out = torch.zeros(batch, n_query, heads, head_dim, dtype=value.dtype)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for b in range(batch):
        for q in range(n_query):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(n_points):
                        px = loc[b, q, m, lvl, p, 0].item() * w - 0.5
                        py = loc[b, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(px), math.floor(py)
                        fx, fy = px - x0, py - y0
                        sample = torch.zeros(head_dim, dtype=value.dtype)
                        for dy, wy in ((0, 1 - fy), (1, fy)):
                            for dx, wx in ((0, 1 - fx), (1, fx)):
                                x, y = x0 + dx, y0 + dy
                                if 0 <= x < w and 0 <= y < h:  # zero padding outside the map
                                    sample += wy * wx * value[b, starts[lvl] + y * w + x, m]
                        out[b, q, m] += attn[b, q, m, lvl, p] * sample
    return out.reshape(batch, n_query, heads * head_dim)


def grads_of(
    backend: str,
    shapes: list[tuple[int, int]],
    inputs: tuple[torch.Tensor, ...],
    grad_out: torch.Tensor,
) -> list[torch.Tensor]:
    """[output, d value, d locations, d attention] of one forward+backward."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2], backend=backend)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


# ----------------------------------------------------------------------------------------------------------------
# (a) exactness against the explicit bilinear sampler
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [CPP, "pytorch", "reference"])
def test_matches_explicit_bilinear_with_outside_points_and_uneven_levels(backend: str) -> None:
    value, loc, attn = random_inputs(UNEVEN_SHAPES, n_query=4)
    # Hand-placed corner cases on top of the uniform [-0.2, 1.2] draw: far outside, map edges, pixel centres.
    loc[0, 0, 0, :, 0] = torch.tensor([-5.0, 7.0], dtype=loc.dtype)
    loc[0, 0, 1, :, 0] = torch.tensor([0.0, 1.0], dtype=loc.dtype)
    loc[1, 1, 0, :, 1] = torch.tensor([1.0, 0.0], dtype=loc.dtype)
    loc[1, 2, 1, 0, 0] = torch.tensor([0.5 / 5, 1.5 / 3], dtype=loc.dtype)  # exact centre of pixel (0, 1)
    assert (loc < 0).any() and (loc > 1).any()
    expected = explicit_bilinear(value, UNEVEN_SHAPES, loc, attn)
    got = ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend=backend)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_point_far_outside_contributes_nothing() -> None:
    value, loc, attn = random_inputs(UNEVEN_SHAPES, n_query=1, heads=1, n_points=1)
    loc.fill_(3.0)  # every level: pixel >= 2*size, all four neighbours in the zero padding
    out = ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend="pytorch")
    assert torch.equal(out, torch.zeros_like(out))


def test_tensor_and_python_spatial_shapes_agree() -> None:
    value, loc, attn = random_inputs(UNEVEN_SHAPES)
    from_list = ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend="pytorch")
    from_tensor = ms_deform_attn(value, torch.tensor(UNEVEN_SHAPES), loc, attn, backend="pytorch")
    assert torch.equal(from_list, from_tensor)


# ----------------------------------------------------------------------------------------------------------------
# (b) gradients
# ----------------------------------------------------------------------------------------------------------------
def test_gradcheck_fast_path_float64() -> None:
    value, loc, attn = random_inputs([(3, 4), (2, 2)], batch=2, n_query=2, heads=2, head_dim=2, n_points=2)
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, s, a: ms_deform_attn(v, [(3, 4), (2, 2)], s, a, backend="pytorch"), inputs, eps=1e-6, atol=1e-5
    )


def test_partial_requires_grad_matches_full_backward() -> None:
    value, loc, attn = random_inputs(UNEVEN_SHAPES)
    grad_out = torch.randn(2, 3, 6, dtype=torch.float64)
    full = grads_of("pytorch", UNEVEN_SHAPES, (value, loc, attn), grad_out)
    for which in range(3):  # only one input requires grad: the hand-written backward skips the other branches
        leaves = [t.clone() for t in (value, loc, attn)]
        leaves[which].requires_grad_()
        ms_deform_attn(leaves[0], UNEVEN_SHAPES, leaves[1], leaves[2], backend="pytorch").backward(grad_out)
        torch.testing.assert_close(leaves[which].grad, full[which + 1], atol=1e-12, rtol=0)


def test_fast_backward_is_once_differentiable() -> None:
    # The hand-written backward is not itself differentiable: double backward must fail loudly, not be wrong.
    value, loc, attn = (t.requires_grad_() for t in random_inputs(UNEVEN_SHAPES))
    out = ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend="pytorch")
    (g,) = torch.autograd.grad(out.sum(), loc, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


# ----------------------------------------------------------------------------------------------------------------
# (c) fast vs reference at the ViT-Adapter-T injector shapes, fp32
# ----------------------------------------------------------------------------------------------------------------
def test_fast_matches_reference_at_injector_shapes_fp32() -> None:
    inputs = random_inputs(
        INJECTOR_SHAPES, batch=2, n_query=256, heads=6, head_dim=32, n_points=4, dtype=torch.float32,
        loc_range=(-0.1, 1.1),
    )  # fmt: skip
    grad_out = torch.randn(2, 256, 192, generator=torch.Generator().manual_seed(1))
    fast = grads_of("pytorch", INJECTOR_SHAPES, inputs, grad_out)
    ref = grads_of("reference", INJECTOR_SHAPES, inputs, grad_out)
    exact = grads_of("reference", INJECTOR_SHAPES, tuple(t.double() for t in inputs), grad_out.double())
    names = ["output", "grad value", "grad locations", "grad attention"]
    for name, f, r, e in zip(names, fast, ref, exact):
        assert f.dtype == torch.float32, name
        # Both fp32 paths within 1e-4 of the float64 truth ...
        assert (f.double() - e).abs().max() <= 1e-4, name
        # ... and of each other; d(locations) reaches |g| ~ 300 here, where the reference's own fp32 rounding is
        # ~1e-4 (the fast path's is ~4x smaller), so that comparison allows for the reference's error.
        slack = (r.double() - e).abs().max() if name == "grad locations" else 0.0
        assert (f - r).abs().max() <= 1e-4 + slack, name


# ----------------------------------------------------------------------------------------------------------------
# (d) autocast: always fp32 inside
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [CPP, "pytorch", "reference"])
def test_bf16_autocast_computes_in_fp32(backend: str) -> None:
    value, loc, attn = (t.bfloat16() for t in random_inputs(UNEVEN_SHAPES, head_dim=8, dtype=torch.float32))
    expected = ms_deform_attn(value.float(), UNEVEN_SHAPES, loc.float(), attn.float(), backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_fp16_inputs_give_fp32_and_float64_stays_float64() -> None:
    value, loc, attn = random_inputs(UNEVEN_SHAPES)
    assert ms_deform_attn(value, UNEVEN_SHAPES, loc, attn).dtype == torch.float64
    assert ms_deform_attn(value.half(), UNEVEN_SHAPES, loc.half(), attn.half()).dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# (e) backends
# ----------------------------------------------------------------------------------------------------------------
def test_mmcv_backend_without_mmcv_raises_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "mmcv_available", lambda: False)
    value, loc, attn = random_inputs(UNEVEN_SHAPES)
    with pytest.raises(RuntimeError, match="mmcv"):
        ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend="mmcv")


def test_mmcv_available_is_a_bool_and_auto_is_a_cpu_backend_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    assert isinstance(mmcv_available(), bool)
    expected = "cpp" if cpp_available() else "pytorch"
    assert ops.resolve_backend("cpu") == expected
    value, loc, attn = random_inputs(UNEVEN_SHAPES)
    auto = ms_deform_attn(value, UNEVEN_SHAPES, loc, attn)
    assert torch.equal(auto, ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend=expected))


def test_deterministic_outputs_and_grads() -> None:
    inputs = random_inputs(INJECTOR_SHAPES, n_query=64, heads=6, head_dim=32, n_points=4, dtype=torch.float32)
    grad_out = torch.randn(2, 64, 192, generator=torch.Generator().manual_seed(3))
    first = grads_of("pytorch", INJECTOR_SHAPES, inputs, grad_out)
    second = grads_of("pytorch", INJECTOR_SHAPES, inputs, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_nan_location_gives_nan_like_grid_sample() -> None:
    value, loc, attn = random_inputs(UNEVEN_SHAPES)
    loc[0, 1, 0, 0, 0, 0] = float("nan")
    fast = ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend="pytorch")
    ref = ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend="reference")
    torch.testing.assert_close(fast, ref, equal_nan=True)
    assert fast[0, 1, :3].isnan().all() and not fast[0, 0].isnan().any()


def test_empty_batch_and_queries() -> None:
    for batch, n_query in ((0, 3), (2, 0)):
        value, loc, attn = random_inputs(UNEVEN_SHAPES, batch=batch, n_query=n_query)
        assert ms_deform_attn(value, UNEVEN_SHAPES, loc, attn).shape == (batch, n_query, 6)


# ----------------------------------------------------------------------------------------------------------------
# (f) bad input
# ----------------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_error_naming_the_problem() -> None:
    value, loc, attn = random_inputs(UNEVEN_SHAPES)
    cases = [
        ((value[:, :-1], UNEVEN_SHAPES, loc, attn), r"value length 21 != sum\(H\*W\) = 22"),
        ((value, UNEVEN_SHAPES, loc[:, :, :1], attn), "heads mismatch"),
        ((value, UNEVEN_SHAPES, loc[1:], attn), "batch mismatch"),
        ((value, UNEVEN_SHAPES[:2], loc, attn), r"value length 22 != sum\(H\*W\) = 19"),
        ((value, [(3, 5), (2, 2), (1, 3), (0, 0)], loc, attn), "positive"),
        ((value, [(3, 5), (2, 2), (1.0, 3)], loc, attn), "int pairs"),
        ((value, torch.tensor([[3.0, 5.0]]), loc, attn), "integer tensor"),
        ((value, UNEVEN_SHAPES, loc, attn[..., :1]), "attention_weights shape"),
        ((value, UNEVEN_SHAPES, loc[..., :1], attn), "last dim must be 2"),
        ((value[0], UNEVEN_SHAPES, loc, attn), "value must be 4-D"),
        ((value, UNEVEN_SHAPES, loc.long(), attn), "floating-point"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            ms_deform_attn(*args)
    with pytest.raises(ValueError, match="levels mismatch"):
        ms_deform_attn(value[:, :19], UNEVEN_SHAPES[:2], loc, attn)
    with pytest.raises(ValueError, match="unknown ms_deform_attn backend"):
        ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend="cuda")


# ----------------------------------------------------------------------------------------------------------------
# benchmark script, in-process with tiny repeats
# ----------------------------------------------------------------------------------------------------------------
def test_bench_script_runs_and_reports_json(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import deform_attn as bench

    threads = torch.get_num_threads()
    assert bench.main(["--threads", "1", "--repeats", "1", "--warmup", "0", "--batch", "1", "--json"]) == 0
    assert torch.get_num_threads() == threads  # restored for the rest of the session
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["case"] for r in report["results"]] == ["injector", "extractor"]
    for r in report["results"]:
        assert r["reference_ms"] > 0 and r["pytorch_ms"] > 0
        assert r["max_diff_out"] < 1e-4 and r["max_diff_grad_value"] < 1e-4
        # the 1e-4 bar, against the exact (float64) result: the fp32 reference misses it on d(locations)
        assert r["within_1e-4_of_f64"] and r["max_err_vs_f64_pytorch"] <= 1e-4
        assert r["max_err_vs_f64_pytorch"] <= r["max_err_vs_f64_reference"] * 1.5
        assert r["meets_float64_rule"]
        if cpp_available():  # the compiled kernel is timed and judged beside the other two
            assert r["cpp_ms"] > 0 and r["cpp_speedup"] > 0 and r["cpp_meets_float64_rule"]
            assert r["cpp_max_diff_out"] < 1e-4 and r["cpp_max_diff_grad_value"] < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# (g) the compiled CPU kernel, judged like every fast path: against a float64 evaluation of the reference, its
# error must be <= max(1e-5 relative, 1.5 x the fp32 reference's own error)
# ----------------------------------------------------------------------------------------------------------------
NAMES = ("output", "grad value", "grad locations", "grad attention")
ADAPTER_CASES = {  # ViT-Adapter-T at 256x256: (value levels, query count)
    "injector": (INJECTOR_SHAPES, 256),
    "extractor": ([(16, 16)], 32 * 32 + 16 * 16 + 8 * 8),
}


def _rel(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.double() - exact).norm() / exact.norm())


def assert_float64_rule(fast: list[torch.Tensor], ref32: list[torch.Tensor], exact: list[torch.Tensor]) -> None:
    for name, f, r, e in zip(NAMES, fast, ref32, exact):
        assert f.dtype == r.dtype and f.shape == r.shape, name
        bound = max(1e-5, 1.5 * _rel(r, e))
        assert _rel(f, e) <= bound, f"{name}: {_rel(f, e):.2e} > {bound:.2e}"


@pytest.mark.parametrize("backend", [CPP, "pytorch"])
@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_fast_paths_meet_float64_rule_at_adapter_shapes(backend: str, case: str) -> None:
    levels, n_query = ADAPTER_CASES[case]
    # Locations drawn over [-0.1, 1.1]: a share of the points sample across the border or fully outside.
    inputs = random_inputs(
        levels, batch=2, n_query=n_query, heads=6, head_dim=32, n_points=4, dtype=torch.float32, loc_range=(-0.1, 1.1)
    )
    grad_out = torch.randn(2, n_query, 192, generator=torch.Generator().manual_seed(1))
    exact = grads_of("reference", levels, tuple(t.double() for t in inputs), grad_out.double())
    ref32 = grads_of("reference", levels, inputs, grad_out)
    assert_float64_rule(grads_of(backend, levels, inputs, grad_out), ref32, exact)


POW2_SHAPES = [(4, 8), (2, 2), (1, 4)]  # powers of two: the border locations below are exact in binary


@pytest.mark.parametrize("backend", [CPP, "pytorch"])
def test_border_and_out_of_bounds_points_match_grid_sample_in_float64(backend: str) -> None:
    # Pixel coordinates px = loc*W - 0.5 exactly on and around the borders: fully outside (-1.5, W + 0.5), on the
    # last point with a corner inside (-1, W), half a pixel in, on pixel centres, and the far edge.
    value, loc, attn = random_inputs(POW2_SHAPES, batch=2, n_query=11, heads=2, head_dim=4, n_points=3, seed=4)
    near = (-1.5, -1.0, -0.75, -0.5, 0.0, 0.25)  # pixel coordinates from the left/top edge; then the far edge
    for lvl, (h, w) in enumerate(POW2_SHAPES):
        far_x, far_y = ([s - 1.0, s - 0.5, s - 0.25, float(s), s + 0.5] for s in (w, h))
        for q, (px, py) in enumerate(zip([*near, *far_x], [*near, *far_y])):
            loc[:, q, :, lvl, 0, 0] = (px + 0.5) / w  # x on the border, y random
            loc[:, q, :, lvl, 1, 1] = (py + 0.5) / h  # y on the border, x random
            loc[:, q, :, lvl, 2] = torch.tensor([(px + 0.5) / w, (py + 0.5) / h], dtype=loc.dtype)  # both
    grad_out = torch.randn(2, 11, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = grads_of("reference", POW2_SHAPES, (value, loc, attn), grad_out)
    got = grads_of(backend, POW2_SHAPES, (value, loc, attn), grad_out)
    for name, g, e in zip(NAMES, got, expected):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=0, msg=name)


@needs_cpp
@pytest.mark.parametrize("head_dim", [16, 32, 64, 5])  # the kernel's compiled channel counts, and a run-time one
def test_cpp_every_channel_path_matches_reference_in_float64(head_dim: int) -> None:
    value, loc, attn = random_inputs(UNEVEN_SHAPES, n_query=5, heads=3, head_dim=head_dim, n_points=3, seed=5)
    grad_out = torch.randn(2, 5, 3 * head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    expected = grads_of("reference", UNEVEN_SHAPES, (value, loc, attn), grad_out)
    for name, g, e in zip(NAMES, grads_of("cpp", UNEVEN_SHAPES, (value, loc, attn), grad_out), expected):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=0, msg=name)


@needs_cpp
def test_gradcheck_cpp_float64() -> None:
    value, loc, attn = random_inputs([(3, 4), (2, 2)], batch=2, n_query=2, heads=2, head_dim=2, n_points=2, seed=3)
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, s, a: ms_deform_attn(v, [(3, 4), (2, 2)], s, a, backend="cpp"), inputs, eps=1e-6, atol=1e-5
    )


@needs_cpp
def test_cpp_partial_grads_noncontiguous_inputs_and_thread_count_invariance() -> None:
    value, loc, attn = random_inputs(INJECTOR_SHAPES, n_query=40, heads=6, head_dim=8, n_points=4, dtype=torch.float32)
    grad_out = torch.randn(2, 40, 48, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads_of("cpp", INJECTOR_SHAPES, (value, loc, attn), grad_out)
        torch.set_num_threads(2)
        two = grads_of("cpp", INJECTOR_SHAPES, (value, loc, attn), grad_out)
    finally:
        torch.set_num_threads(threads)
    # Forward rows and backward (batch, head) chunks are owned by one thread each: bitwise the same.
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    # Non-contiguous views of the same values give the same result.
    strided = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (value, loc, attn)]
    assert not strided[0].is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(one, grads_of("cpp", INJECTOR_SHAPES, tuple(strided), grad_out)))
    for which in range(3):
        leaves = [t.clone() for t in (value, loc, attn)]
        leaves[which].requires_grad_()
        ms_deform_attn(leaves[0], INJECTOR_SHAPES, leaves[1], leaves[2], backend="cpp").backward(grad_out)
        assert torch.equal(leaves[which].grad, one[which + 1])


@needs_cpp
def test_cpp_nan_location_gives_nan_like_grid_sample() -> None:
    value, loc, attn = random_inputs(UNEVEN_SHAPES)
    loc[0, 1, 0, 0, 0, 0] = float("nan")
    fast = ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend="cpp")
    ref = ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend="reference")
    torch.testing.assert_close(fast, ref, equal_nan=True)
    assert fast[0, 1, :3].isnan().all() and not fast[0, 0].isnan().any()


def test_env_var_forces_backend_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    value, loc, attn = random_inputs(UNEVEN_SHAPES)
    pytorch = ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend="pytorch")
    monkeypatch.setenv(ops.ENV_BACKEND, "torch")
    assert ops.resolve_backend("cpu") == "pytorch"
    assert torch.equal(ms_deform_attn(value, UNEVEN_SHAPES, loc, attn), pytorch)
    monkeypatch.setenv(ops.ENV_BACKEND, "bogus")
    with pytest.raises(ValueError, match="auto, cpp, torch"):
        ms_deform_attn(value, UNEVEN_SHAPES, loc, attn)
    # No kernel (no compiler, failed build): "auto" is the pure-PyTorch fallback, a forced "cpp" fails loudly.
    monkeypatch.setattr(ops, "cpp_available", lambda: False)
    monkeypatch.setenv(ops.ENV_BACKEND, "auto")
    assert ops.resolve_backend("cpu") == "pytorch"
    assert torch.equal(ms_deform_attn(value, UNEVEN_SHAPES, loc, attn), pytorch)
    monkeypatch.setenv(ops.ENV_BACKEND, "cpp")
    with pytest.raises(RuntimeError, match="could not be built"):
        ms_deform_attn(value, UNEVEN_SHAPES, loc, attn)


def test_backend_choice_is_announced_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ops.ENV_BACKEND, "torch")
    ops._announce_backend.cache_clear()
    with caplog.at_level("INFO"):
        ops.resolve_backend("cpu")
        ops.resolve_backend("cpu")
    text = caplog.text + capsys.readouterr().err
    assert text.count("ms_deform_attn backend on cpu: pytorch") == 1


def test_failed_build_falls_back_without_raising(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from vit_adapter.models import deform_ext

    monkeypatch.setenv(deform_ext.ENV_DIR, str(tmp_path / "ext"))
    assert deform_ext.cache_root() == tmp_path / "ext"
    with caplog.at_level("INFO"):
        # No compiler on PATH. (Uncached calls: the process-wide kernel cache stays intact.)
        with monkeypatch.context() as m:
            m.setenv("CXX", str(tmp_path / "no-such-compiler"))
            assert deform_ext.load_kernel.__wrapped__() is None
        # A compile error (the source does not compile), where a compiler exists.
        if cpp_available():
            broken = tmp_path / "broken.cpp"
            broken.write_text("this is not C++\n")
            monkeypatch.setattr(deform_ext, "SOURCE", broken)
            assert deform_ext.load_kernel.__wrapped__() is None
    text = caplog.text + capsys.readouterr().err
    assert text.count("compiled CPU kernel unavailable") == (2 if cpp_available() else 1)


_CONCURRENT_SCRIPT = """
import torch
from vit_adapter.models.ops import ms_deform_attn
gen = torch.Generator().manual_seed(0)
value = torch.randn(1, 20, 2, 4, generator=gen)
loc = torch.rand(1, 5, 2, 2, 2, 2, generator=gen)
attn = torch.rand(1, 5, 2, 2, 2, generator=gen)
out = ms_deform_attn(value, [(4, 4), (2, 2)], loc, attn)  # auto, forced to cpp by the environment
print(repr(out.sum().item()))
"""


@pytest.mark.slow
@needs_cpp
def test_concurrent_first_use_builds_once_and_both_processes_load(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from vit_adapter.models import deform_ext

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, deform_ext.ENV_DIR: str(tmp_path / "ext"), ops.ENV_BACKEND: "cpp", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen([sys.executable, "-c", _CONCURRENT_SCRIPT], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and outs[0].strip()
    assert len(list((tmp_path / "ext").glob("*/*.so"))) == 1
