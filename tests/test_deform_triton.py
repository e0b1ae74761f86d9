"""The Triton deformable-attention kernels (vit_adapter/models/deform_triton.py), run on CPU through Triton's
interpreter, the backend choice on CUDA and CPU, and float64 kept float64 through the full model.

The interpreter is switched on per test (``TRITON_INTERPRET=1`` through monkeypatch): the kernel module wraps its
kernels with ``triton.jit`` at call time, not at import, so one pytest process runs them interpreted whatever was
imported before. The interpreter executes each program in Python, so the shapes here are small.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import triton  # noqa: F401  not skipped when missing: CI must run these tests (triton comes with CUDA torch)

from tests.test_ops import UNEVEN_SHAPES, assert_float64_rule, explicit_bilinear, grads_of, random_inputs
from vit_adapter.models import attention, ops
from vit_adapter.models.factory import create_model
from vit_adapter.models.ops import BackendUnavailable, ms_deform_attn

ODD_SHAPES = [(5, 7), (3, 4), (1, 3)]  # three levels, odd and uneven sizes
NAMES = ("output", "grad value", "grad locations", "grad attention")


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _with_outside_points(loc: torch.Tensor) -> torch.Tensor:
    """Hand-placed points on top of the draw: far outside, exactly on the map edges, a pixel centre."""
    loc[0, 0, 0, :, 0] = torch.tensor([-5.0, 7.0], dtype=loc.dtype)
    loc[0, 1, 1, :, 1] = torch.tensor([0.0, 1.0], dtype=loc.dtype)
    loc[1, 2, 0, :, 0] = torch.tensor([1.0, 0.0], dtype=loc.dtype)
    loc[1, 3, 1, 0, 1] = torch.tensor([2.5 / 7, 1.5 / 5], dtype=loc.dtype)
    loc[1, 0, 0, 1, 1] = torch.tensor([1e9, -1e9], dtype=loc.dtype)  # would overflow an int32 pixel index
    return loc


@pytest.mark.usefixtures("interpret")
def test_triton_meets_float64_rule_in_fp32_and_equals_reference_in_float64() -> None:
    # head_dim 5: the channel tile (8) is masked; points over [-0.3, 1.3] sample across the borders.
    value, loc, attn = random_inputs(ODD_SHAPES, n_query=5, heads=2, head_dim=5, n_points=2, loc_range=(-0.3, 1.3))
    loc = _with_outside_points(loc)
    grad_out = torch.randn(2, 5, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = grads_of("reference", ODD_SHAPES, (value, loc, attn), grad_out)
    # float64 in, float64 through the kernel: equal to the reference up to float64 rounding.
    got64 = grads_of("triton", ODD_SHAPES, (value, loc, attn), grad_out)
    for name, g, e in zip(NAMES, got64, exact):
        assert g.dtype == torch.float64, name
        torch.testing.assert_close(g, e, atol=1e-12, rtol=0, msg=name)
    # fp32: the project's same-function rule against the float64 evaluation of the reference.
    inputs32 = tuple(t.float() for t in (value, loc, attn))
    ref32 = grads_of("reference", ODD_SHAPES, inputs32, grad_out.float())
    assert_float64_rule(grads_of("triton", ODD_SHAPES, inputs32, grad_out.float()), ref32, exact)


@pytest.mark.usefixtures("interpret")
def test_triton_matches_the_explicit_sampler_and_each_gradient_alone() -> None:
    value, loc, attn = random_inputs(UNEVEN_SHAPES, batch=1, n_query=4, heads=2, head_dim=4, n_points=3, seed=7)
    out = ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend="triton")
    torch.testing.assert_close(out, explicit_bilinear(value, UNEVEN_SHAPES, loc, attn), atol=1e-12, rtol=0)
    grad_out = torch.randn(1, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    full = grads_of("triton", UNEVEN_SHAPES, (value, loc, attn), grad_out)
    leaves = [value.clone().requires_grad_(), loc, attn]  # only d value asked for: the others stay None
    ms_deform_attn(leaves[0], UNEVEN_SHAPES, leaves[1], leaves[2], backend="triton").backward(grad_out)
    assert torch.equal(leaves[0].grad, full[1]) and loc.grad is None and attn.grad is None


@pytest.mark.usefixtures("interpret")
def test_triton_upcasts_half_inputs_and_handles_empty_queries() -> None:
    value, loc, attn = random_inputs(UNEVEN_SHAPES, batch=1, n_query=2, heads=1, head_dim=4, n_points=1)
    for low in (torch.float16, torch.bfloat16):
        out = ms_deform_attn(value.to(low), UNEVEN_SHAPES, loc.to(low), attn.to(low), backend="triton")
        assert out.dtype == torch.float32  # fp32 accumulation, as the official custom_fwd(cast_inputs=float32)
        expected = ms_deform_attn(value.to(low), UNEVEN_SHAPES, loc.to(low), attn.to(low), backend="reference")
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    empty = ms_deform_attn(value, UNEVEN_SHAPES, loc[:, :0], attn[:, :0], backend="triton")
    assert empty.shape == (1, 0, 4)


def test_triton_on_cpu_outside_the_interpreter_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    value, loc, attn = random_inputs(UNEVEN_SHAPES, batch=1, n_query=1, heads=1, head_dim=2, n_points=1)
    with pytest.raises(RuntimeError, match="needs a CUDA device") as err:
        ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend="triton")
    assert "\n" not in str(err.value)
    monkeypatch.setenv(ops.ENV_BACKEND, "triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1") as err:  # ValueError too: the CLI's exit-2 path
        ops.resolve_backend("cpu")
    assert isinstance(err.value, BackendUnavailable) and "\n" not in str(err.value)


def test_backend_choice_on_cuda_and_forcing_by_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    cuda = torch.device("cuda")  # resolving needs no GPU: only availability checks run
    assert not ops.triton_supports(cuda)  # this host has no GPU (nor a compute capability to read)
    monkeypatch.setattr(ops, "triton_supports", lambda device: True)
    monkeypatch.setattr(ops, "mmcv_available", lambda: True)
    ops._announce_backend.cache_clear()
    with caplog.at_level("INFO"):
        assert ops.resolve_backend(cuda) == "triton"  # the default when triton imports, even beside mmcv
    assert "ms_deform_attn backend on cuda: triton" in caplog.text + capsys.readouterr().err
    for forced, expected in (("mmcv", "mmcv"), ("torch", "pytorch"), ("pytorch", "pytorch"), ("cpp", "pytorch")):
        monkeypatch.setenv(ops.ENV_BACKEND, forced)
        assert ops.resolve_backend(cuda) == expected, forced
    monkeypatch.setenv(ops.ENV_BACKEND, "reference")
    assert ops.resolve_backend("cpu") == "reference"
    monkeypatch.setenv(ops.ENV_BACKEND, "auto")
    monkeypatch.setattr(ops, "triton_supports", lambda device: False)  # no triton: mmcv, then pure PyTorch
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    assert ops.resolve_backend(cuda) == "mmcv"
    monkeypatch.setattr(ops, "mmcv_available", lambda: False)
    assert ops.resolve_backend(cuda) == "pytorch"
    monkeypatch.setenv(ops.ENV_BACKEND, "triton")
    with pytest.raises(BackendUnavailable, match="triton is not importable"):
        ops.resolve_backend(cuda)
    monkeypatch.setenv(ops.ENV_BACKEND, "mmcv")
    with pytest.raises(BackendUnavailable, match="mmcv.ops is not importable"):
        ops.resolve_backend(cuda)
    monkeypatch.setenv(ops.ENV_BACKEND, "Tritonn")
    with pytest.raises(ValueError, match="'tritonn'; expected one of auto, cpp, torch, pytorch, triton") as err:
        ops.resolve_backend(cuda)
    assert "\n" not in str(err.value)


def test_triton_available_is_false_when_triton_cannot_be_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    ops.triton_available.cache_clear()
    try:
        assert ops.triton_available() is True
        ops.triton_available.cache_clear()
        monkeypatch.setitem(sys.modules, "triton", None)  # what a CPU-only torch install without triton looks like
        assert ops.triton_available() is False
    finally:
        monkeypatch.undo()
        ops.triton_available.cache_clear()


@pytest.mark.usefixtures("interpret")
def test_env_forces_triton_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    value, loc, attn = random_inputs(UNEVEN_SHAPES, batch=1, n_query=2, heads=1, head_dim=2, n_points=1)
    monkeypatch.setenv(ops.ENV_BACKEND, "triton")
    assert ops.resolve_backend("cpu") == "triton"
    auto = ms_deform_attn(value, UNEVEN_SHAPES, loc, attn)
    assert torch.equal(auto, ms_deform_attn(value, UNEVEN_SHAPES, loc, attn, backend="triton"))


# ----------------------------------------------------------------------------------------------------------------
# float64 stays float64 through the deformable attention of the full model
# ----------------------------------------------------------------------------------------------------------------
def _straightforward_msdeform(
    self: attention.MSDeformAttn, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor, shapes
) -> torch.Tensor:
    """The official module's forward written plainly (separate linears, torch.softmax, grid_sample core)."""
    b, lq, _ = query.shape
    m, n_l, n_p = self.n_heads, self.n_levels, self.n_points
    v = self.value_proj(value).view(b, value.shape[1], m, self.head_dim)
    offsets = self.sampling_offsets(query).view(b, lq, m, n_l, n_p, 2)
    weights = torch.softmax(self.attention_weights(query).view(b, lq, m, n_l * n_p), -1).view(b, lq, m, n_l, n_p)
    norm = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype)
    loc = reference_points[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
    return self.output_proj(ops.ms_deform_attn_reference(v, list(shapes), loc, weights))


@pytest.mark.parametrize("backend", ["pytorch", "triton"])
def test_float64_model_forward_stays_float64_through_deformable_attention(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(ops.ENV_BACKEND, backend)
    model = create_model(
        "vit_adapter_cpu",
        embed_dim=32,
        depth=4,
        num_heads=2,
        deform_num_heads=2,
        conv_inplane=8,
        pretrain_size=32,
        n_interactions=1,
    )
    model = model.double().eval()
    with torch.no_grad():  # the injector's gamma starts at 0: make its deformable attention reach the output
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    image = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen: list[torch.dtype] = []
    core = attention.ms_deform_attn

    def spy(v: torch.Tensor, shapes, loc: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        seen.extend(t.dtype for t in (v, loc, weights))
        return core(v, shapes, loc, weights)

    monkeypatch.setattr(attention, "ms_deform_attn", spy)
    with torch.no_grad():
        got = model(image)
        assert seen and set(seen) == {torch.float64}
        monkeypatch.setattr(attention.MSDeformAttn, "forward", _straightforward_msdeform)
        expected = model(image)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float64
        assert float((g - e).norm() / e.norm()) <= 1e-12


# ----------------------------------------------------------------------------------------------------------------
# the backend benchmark's CPU-interpreter smoke mode, in-process
# ----------------------------------------------------------------------------------------------------------------
def test_deform_backends_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).resolve().parents[1] / "bench" / "deform_backends.py"
    spec = importlib.util.spec_from_file_location("bench_deform_backends", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert {r["backend"] for r in rows} >= {"triton", "pytorch", "reference"}
    for r in rows:
        assert r["device"] == "cpu" and r["ms_forward_backward"] > 0 and r["meets_float64_rule"], r
        assert r["shape"] in bench.SMOKE_SHAPES
