"""The CPU speed-ups of issues 5 and 14 keep the function, and the overhead benchmark runs in-process.

The same-function rule: for every output and every gradient, the optimised fp32 model's error against a
float64 evaluation of the straightforward reference path is <= max(1e-5 relative, 1.5 x the fp32 reference path's own
error against float64). Relative errors are ‖Δ‖/‖float64‖. (Issue 5's rule, ‖Δ‖/‖ref‖ <= 1e-5 against the fp32
reference, rejected changes whose only difference is fp32 rounding order, such as the channels-last SPM: train-mode
BatchNorm amplifies the convolutions' rounding in the stem's parameter gradients.)

The reference path is kept here on purpose: the plain implementations that the optimised code replaced (separate
Linear layers for offsets and attention logits and torch.softmax over them, per-map transpose copies around the
ConvFFN's depthwise conv, the unfused injector update, the out-of-place output neck, tokens left in the transposed
layout, the NCHW SPM, and the per-level grid_sample deformable core instead of the default backend), bound onto a
deep copy of the model so both paths share every weight. The cores' own equivalence, at their shapes and on the
borders, is tested in tests/test_ops.py.
"""

from __future__ import annotations

import copy
import json
import types
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vit_adapter.models.adapter import ConvFFN, Injector, SpatialPriorModule, ViTAdapter
from vit_adapter.models.attention import MSDeformAttn, _ShortSoftmax
from vit_adapter.models.factory import create_model
from vit_adapter.models.ops import ms_deform_attn
from vit_adapter.models.vit import PlainViT

TOL = 1e-5
# Biases whose only path to the loss is a per-channel constant into the train-mode BatchNorm of the stride-4 output
# (c1 = up(c2) + fc1(stem) + ..., then out_norms[0]): BN removes per-channel means, so their true gradient is
# exactly 0 and what autograd returns is rounding noise (~1e-6 of their weight's gradient), different in any two
# correct implementations. They are checked as zero up to that noise, relative to the weight's gradient.
BN_SHADOWED = {"up.bias": "up.weight", "prior.fc1.bias": "prior.fc1.weight"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster here and immune to oversubscription on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------------
# Reference (straightforward) forwards
def _ref_msdeform_forward(
    self: MSDeformAttn, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes
) -> Tensor:
    b, lq, _ = query.shape
    lv = value.shape[1]
    v = self.value_proj(value).view(b, lv, self.n_heads, self.head_dim)
    offsets = self.sampling_offsets(query).view(b, lq, self.n_heads, self.n_levels, self.n_points, 2)
    weights = self.attention_weights(query).view(b, lq, self.n_heads, self.n_levels * self.n_points)
    weights = weights.softmax(-1).view(b, lq, self.n_heads, self.n_levels, self.n_points)
    norm = offsets.new_tensor([[w, h] for h, w in spatial_shapes])
    loc = reference_points[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
    out = ms_deform_attn(v, spatial_shapes, loc, weights, backend="reference")  # the per-level grid_sample yardstick
    return self.output_proj(out.to(v.dtype))


def _ref_convffn_forward(self: ConvFFN, x: Tensor, shapes) -> Tensor:
    x = self.fc1(x)
    b, _, ch = x.shape
    parts = torch.split(x, [h * w for h, w in shapes], dim=1)
    maps = [self.dwconv(p.transpose(1, 2).reshape(b, ch, h, w)) for p, (h, w) in zip(parts, shapes)]
    x = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
    x = self.drop(self.act(x))
    return self.drop(self.fc2(x))


def _ref_spm_forward(self: SpatialPriorModule, image: Tensor, patches: Tensor) -> list[Tensor]:
    c1 = self.stem(image)  # NCHW throughout
    c2 = self.conv2(c1)
    c3 = self.conv3(c2)
    c4 = self.conv4(c3)
    return [self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)]


def _ref_injector_forward(self: Injector, x: Tensor, c: Tensor, ref: Tensor, shapes) -> Tensor:
    return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(c), shapes)


def _ref_embed(self: PlainViT, patches: Tensor) -> Tensor:
    grid = (patches.shape[2], patches.shape[3])
    tokens = patches.flatten(2).transpose(1, 2)
    return self.pos_drop(tokens + self.resized_pos_embed(grid))


def _ref_adapter_outputs(self: ViTAdapter, x, c, priors, taps, grid, c_shapes) -> list[Tensor]:
    b, _, d = x.shape
    if c is not None:
        parts = torch.split(c, [hh * ww for hh, ww in c_shapes], dim=1)
        c2, c3, c4 = (p.transpose(1, 2).reshape(b, d, hh, ww) for p, (hh, ww) in zip(parts, c_shapes))
    else:
        c2, c3, c4 = priors[1:]
    c1 = self.up(c2) + priors[0]
    outs = [c1, c2, c3, c4]
    if self.add_vit_feature:
        feats = [x] * 4 if self.task == "det" else [taps[i] for i in self.tap_indices]
        maps = [f.transpose(1, 2).reshape(b, d, *grid) for f in feats]
        scales = (4.0, 2.0, 1.0, 0.5)
        outs = [
            o + (m if s == 1.0 else F.interpolate(m, scale_factor=s, mode="bilinear", align_corners=False))
            for o, m, s in zip(outs, maps, scales)
        ]
    return [norm(o) for norm, o in zip(self.out_norms, outs)]


def reference_copy(model: ViTAdapter) -> ViTAdapter:
    """A deep copy of ``model`` (same weights) running the straightforward forwards."""
    ref = copy.deepcopy(model)
    patches = {
        MSDeformAttn: ("forward", _ref_msdeform_forward),
        ConvFFN: ("forward", _ref_convffn_forward),
        SpatialPriorModule: ("forward", _ref_spm_forward),
        Injector: ("forward", _ref_injector_forward),
        PlainViT: ("embed", _ref_embed),
        ViTAdapter: ("_adapter_outputs", _ref_adapter_outputs),
    }
    for m in ref.modules():
        for cls, (name, fn) in patches.items():
            if isinstance(m, cls):
                setattr(m, name, types.MethodType(fn, m))
    return ref


# ------------------------------------------------------------------------------------------------------------
def _rel(got: Tensor, ref: Tensor) -> float:
    diff = (got.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def _perturb(model: nn.Module, seed: int) -> None:
    """Move every parameter off its init so each path is exercised: nonzero γ (the injector's gradients vanish
    at γ = 0), nonzero offset weights (sampling locations then depend on the query)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _step(model: nn.Module, image: Tensor, seed: int) -> tuple[list[Tensor], dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    x = image.clone().to(next(model.parameters()).dtype).requires_grad_()
    torch.manual_seed(seed)  # same drop-path masks in both paths
    outs = model(x)
    gen = torch.Generator().manual_seed(seed + 1)  # the same upstream gradients in fp32 and float64
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs])
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads["<input>"] = x.grad
    return [o.detach() for o in outs], grads


def _tiny(**kw) -> ViTAdapter:
    base = dict(
        embed_dim=64, depth=4, num_heads=2, deform_num_heads=2, conv_inplane=16, pretrain_size=64, drop_path_rate=0.1
    )
    return create_model("vit_adapter_cpu", **{**base, **kw})


CASES = {  # together they run every changed line: both output-neck branches, the no-c branch, the PatchPrior
    "det": (dict(task="det"), (64, 96)),  # non-square: catches any h/w swap in the views
    "seg": (dict(task="seg"), (64, 64)),
    "prior_maps_only": (dict(use_spm=False, injector="none", use_extractor=False), (96, 64)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_optimised_model_matches_reference_path(case: str) -> None:
    kw, size = CASES[case]
    torch.manual_seed(0)
    model = _tiny(**kw).train()
    _perturb(model, seed=1)
    ref = reference_copy(model)
    image = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    outs, grads = _step(model, image, 3)
    ref_outs, ref_grads = _step(ref, image, 3)
    exact_outs, exact_grads = _step(copy.deepcopy(ref).double(), image, 3)
    for i, (o, r, e) in enumerate(zip(outs, ref_outs, exact_outs)):
        assert o.shape == r.shape and o.stride() == r.stride()  # same values and the same memory layout
        _check_rule(f"output {i}", o, r, e)
    _check_grads(grads, ref_grads, exact_grads)


def _check_rule(name: str, got: Tensor, ref: Tensor, exact: Tensor) -> None:
    """The float64 rule: error(fast) <= max(1e-5, 1.5 x error(fp32 reference)), both against float64."""
    bound = max(TOL, 1.5 * _rel(ref, exact))
    assert _rel(got, exact) <= bound, (
        f"{name}: {_rel(got, exact):.2e} > {bound:.2e} (fp32 reference {_rel(ref, exact):.2e})"
    )


def _check_grads(grads: dict[str, Tensor], ref_grads: dict[str, Tensor], exact_grads: dict[str, Tensor]) -> None:
    assert grads.keys() == ref_grads.keys() == exact_grads.keys()
    for name, ref_grad in ref_grads.items():
        if name in BN_SHADOWED:
            scale = exact_grads[BN_SHADOWED[name]].norm().item()
            assert max(grads[name].norm().item(), ref_grad.norm().item()) <= TOL * scale, name
        else:
            _check_rule(f"grad {name}", grads[name], ref_grad, exact_grads[name])


def test_vit_baseline_matches_reference_and_keeps_tokens_contiguous() -> None:
    torch.manual_seed(0)
    model = create_model("vit_cpu", window_attn=False).train()
    _perturb(model, seed=2)
    ref = reference_copy(model)
    image = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(5))
    outs, grads = _step(model, image, 5)
    ref_outs, ref_grads = _step(ref, image, 5)
    exact_outs, exact_grads = _step(copy.deepcopy(ref).double(), image, 5)
    for i, (o, r, e) in enumerate(zip(outs, ref_outs, exact_outs)):
        assert o.stride() == r.stride()
        _check_rule(f"output {i}", o, r, e)
    _check_grads(grads, ref_grads, exact_grads)
    # Why it is faster: the residual stream is contiguous from the first block on (was a transposed view).
    assert model.vit.embed(model.vit.patchify(image)).is_contiguous()


@pytest.mark.parametrize("shapes", [((8, 12), (4, 6), (2, 3)), ((2, 2), (1, 1), (1, 1))])
def test_convffn_matches_per_map_reference(shapes) -> None:
    torch.manual_seed(0)
    ffn = ConvFFN(dim=32, hidden=8)
    ref = copy.deepcopy(ffn)
    ref.forward = types.MethodType(_ref_convffn_forward, ref)
    n = sum(h * w for h, w in shapes)
    x = torch.randn(3, n, 32)
    g = torch.randn(3, n, 32)
    results = []
    for mod in (ffn, ref):
        xi = x.clone().requires_grad_()
        out = mod(xi, shapes)
        out.backward(g)
        results.append([out, xi.grad] + [p.grad for p in mod.parameters()])
    for got, want in zip(*results):
        assert _rel(got, want) <= TOL


def test_short_softmax_matches_float64() -> None:
    """MSDeformAttn's softmax over levels x points (4 and 12 values): forward and gradient against float64, and
    no overflow on large logits (the row max is subtracted)."""
    gen = torch.Generator().manual_seed(8)
    for n in (4, 12):
        x = torch.randn(3, 50, 6, n, generator=gen) * 4
        x[0, 0, 0] += 200.0
        g = torch.randn(x.shape, generator=gen)
        results = []
        paths = ((_ShortSoftmax.apply, torch.float32), (partial(torch.softmax, dim=-1), torch.float32))
        for fn, dtype in (*paths, (partial(torch.softmax, dim=-1), torch.float64)):
            xi = x.clone().to(dtype).requires_grad_()
            out = fn(xi)
            out.backward(g.to(dtype))
            results.append((out.detach(), xi.grad))
        (out, grad), (ref_out, ref_grad), (exact_out, exact_grad) = results
        assert torch.isfinite(out).all()
        _check_rule(f"softmax {n}", out, ref_out, exact_out)
        _check_rule(f"softmax grad {n}", grad, ref_grad, exact_grad)


# ------------------------------------------------------------------------------------------------------------
def test_overhead_bench_runs_in_process(capsys, tmp_path: Path) -> None:
    from bench import overhead

    threads = torch.get_num_threads()
    argv = ["--models", "vit_adapter_t", "--res", "64", "--repeats", "1", "--warmup", "0", "--threads", "1", "--json"]
    rc = overhead.main([*argv, "--out", str(tmp_path / "o.json")])
    assert rc == 0
    assert torch.get_num_threads() == threads  # restored for the rest of the test session
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)["vit_adapter_t@64"]
    for key in ("adapter_ms", "baseline_ms", "ratio", "timm_ms"):
        assert result[key] > 0
    assert abs(result["ratio"] - result["adapter_ms"] / result["baseline_ms"]) < 0.01
    written = json.loads((tmp_path / "o.json").read_text())  # the file adds the host the ratios belong to
    assert written["vit_adapter_t@64"] == result and "1 threads" in written["host"] and "torch" in written["host"]


def test_overhead_bench_embedded_row_and_compare_ref(capsys, tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: --compare-ref needs one")
    from bench import overhead

    factory_before = sys.modules["vit_adapter.models.factory"]
    from torchvision.models.detection import roi_heads

    fastrcnn_loss_before = roi_heads.fastrcnn_loss  # torchvision's own: neither checkout replaces it
    argv = ["--models", "vit_adapter_t", "--res", "64", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    assert overhead.main([*argv, "--json", "--embedded", "--compare-ref", "HEAD"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The embedded default's own workload: its profile's batch and thread count, full model, against its baseline.
    embedded = result["embedded@128"]
    assert embedded["batch"] == 4 and embedded["threads"] == 1 and "timm_ms" not in embedded
    for row in (embedded, result["vit_adapter_t@64"]):
        assert row["ref_adapter_ms"] > 0 and row["ref_baseline_ms"] > 0
        assert abs(row["adapter_speedup_vs_ref"] - row["ref_adapter_ms"] / row["adapter_ms"]) < 0.01
    # This checkout's modules are back in place and the temporary worktree is gone.
    assert sys.modules["vit_adapter.models.factory"] is factory_before
    # ...and torchvision is as it was: the other checkout's import patched nothing into it.
    assert roi_heads.fastrcnn_loss is fastrcnn_loss_before
    worktrees = subprocess.run(["git", "-C", str(root), "worktree", "list"], capture_output=True, text=True).stdout
    assert "vit_adapter_compare_" not in worktrees
    assert "| embedded@128 |" in overhead.markdown_table({"embedded@128": embedded})
