"""The ViT-Adapter backbone: parameter parity with the official code, the ViT stream at init, every ablation
switch, window attention semantics and local weight loading."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from vit_adapter.cli import main
from vit_adapter.models.adapter import ViTAdapter
from vit_adapter.models.factory import create_model
from vit_adapter.models.vit import WeightLoadError, WindowBlock, load_vit_state_dict, read_state_dict


def _meta(name: str, **kw) -> ViTAdapter:
    with torch.device("meta"):
        return create_model(name, **kw)


# Adapter parameters measured by running the official code (reference §1.8 [C]).
@pytest.mark.parametrize(
    "name, expected",
    [
        ("vit_adapter_t", 2.438e6),
        ("vit_adapter_s", 5.830e6),
        ("vit_adapter_b", 13.681e6),
        ("vit_adapter_l", 23.237e6),
    ],
)
def test_adapter_param_counts_match_official(name: str, expected: float) -> None:
    got = _meta(name).param_breakdown()["adapter"]
    assert abs(got - expected) / expected < 0.002, got


@pytest.mark.parametrize("n, expected", [(1, 25.159e6), (2, 25.941e6), (4, 27.504e6), (6, 29.067e6)])
def test_vit_s_backbone_totals_over_n(n: int, expected: float) -> None:
    p = _meta("vit_adapter_s", n_interactions=n).param_breakdown()
    assert abs(p["vit"] + p["adapter"] - expected) < 0.002e6


def test_vit_s_baseline_total_and_neck() -> None:
    p = _meta("vit_s").param_breakdown()
    assert abs(p["vit"] + p["adapter"] - 23.448e6) < 0.002e6
    assert abs(p["adapter"] - 1.774e6) < 0.001e6  # the baseline neck alone (reference §3)


def _tiny(**kw) -> ViTAdapter:
    # Narrow and shallow so that it is fast; depth 12 where N = 6 must divide it.
    depth = 12 if kw.get("n_interactions") == 6 else 4
    base = dict(embed_dim=64, depth=depth, num_heads=2, deform_num_heads=2, conv_inplane=16, pretrain_size=64)
    return create_model("vit_adapter_cpu", **{**base, **kw})


# The rows of reference §7 (+ N sweep and dense attention).
ABLATIONS = {
    "baseline": dict(n_interactions=0, use_spm=False, injector="none", use_extractor=False, output_neck="baseline"),
    "variant1_add": dict(n_interactions=0, use_spm=True, injector="add", use_extractor=False, output_neck="baseline"),
    "variant2_injector": dict(use_extractor=False, output_neck="baseline"),
    "full": dict(),
    "no_spm": dict(use_spm=False),
    "no_injector": dict(injector="none"),
    "dense": dict(attention="dense"),
    "n1": dict(n_interactions=1),
    "n2": dict(n_interactions=2),
    "n6": dict(n_interactions=6),
    "no_cffn": dict(with_cffn=False),
}


@pytest.mark.parametrize("task", ["det", "seg"])
@pytest.mark.parametrize("variant", sorted(ABLATIONS))
def test_every_ablation_runs_forward_backward(variant: str, task: str) -> None:
    model = _tiny(task=task, **ABLATIONS[variant]).train()
    for size in (64, 128):
        x = torch.randn(2, 3, size, size, requires_grad=True)
        outs = model(x)
        assert [tuple(o.shape) for o in outs] == [(2, 64, size // s, size // s) for s in (4, 8, 16, 32)]
        sum(o.square().mean() for o in outs).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads[:5])
        model.zero_grad()


def test_input_not_multiple_of_32_is_rejected() -> None:
    model = _tiny()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 80, 64))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n_interactions=13), "n_interactions"),
        (dict(n_interactions=3), "divide"),
        (dict(depth=10), "multiple of 4"),
        (dict(injector="add"), "output_neck='baseline'"),
        (dict(attention="global"), "attention"),
    ],
)
def test_bad_flags_are_rejected(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _tiny(**kw)


def _timm_vit(dim: int = 64, depth: int = 4, heads: int = 2, img: int = 64, cls: bool = False, ls: bool = True):
    return timm.models.VisionTransformer(
        img_size=img,
        patch_size=16,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        class_token=cls,
        global_pool="avg" if not cls else "token",
        init_values=1.0 if ls else None,
        num_classes=0,
    )


def _block_outputs(blocks, run) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone())) for b in blocks]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("task", ["det", "seg"])
def test_gamma_zero_keeps_the_pretrained_vit_stream(task: str) -> None:
    ref = _timm_vit().eval()
    model = _tiny(task=task, window_attn=False, drop_path_rate=0.0).eval()
    report = load_vit_state_dict(model.vit, ref.state_dict())
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, 64, 64)
    want = _block_outputs(ref.blocks, lambda: ref.forward_features(x))
    got = _block_outputs(model.vit.blocks, lambda: model(x))
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

    with torch.no_grad():
        for blk in model.interactions:
            blk.injector.gamma.fill_(0.5)
    moved = _block_outputs(model.vit.blocks, lambda: model(x))
    assert (moved[0] - want[0]).abs().max() > 1e-3


def test_window_block_matches_official_padding_semantics() -> None:
    """Official windowed attention: LN, zero-pad the *normed* tokens to a multiple of 14, attend inside each
    window over all 196 slots (padded keys included), crop, residual."""
    torch.manual_seed(1)
    blk = WindowBlock(dim=32, num_heads=2, init_values=1.0, window_size=14).eval()
    h, w = 5, 17  # two windows wide, heavily padded
    x = torch.randn(2, h * w, 32)
    y = blk.forward_grid(x, (h, w))

    n = blk.norm1(x).view(2, h, w, 32)
    n = F.pad(n, (0, 0, 0, 28 - w, 0, 14 - h))
    outs = torch.zeros(2, 14, 28, 32)
    for j in range(2):
        win = n[:, :, 14 * j : 14 * (j + 1)].reshape(2, 196, 32)
        qkv = blk.attn.qkv(win).view(2, 196, 3, 2, 16).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(2, 196, 32)
        outs[:, :, 14 * j : 14 * (j + 1)] = blk.attn.proj(a).view(2, 14, 14, 32)
    z = x + blk.ls1(outs[:, :h, :w].reshape(2, h * w, 32))
    z = z + blk.ls2(blk.mlp(blk.norm2(z)))
    torch.testing.assert_close(y, z, atol=1e-5, rtol=1e-5)


def test_detection_preset_windows_all_but_each_quarter() -> None:
    model = _meta("vit_adapter_s", task="det")
    assert [i for i, f in enumerate(model.vit.window_flags) if not f] == [2, 5, 8, 11]
    assert not any(_meta("vit_adapter_s", task="seg").vit.window_flags)
    assert [i for i, f in enumerate(_meta("vit_adapter_l").vit.window_flags) if not f] == [5, 11, 17, 23]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_deit_style_checkpoint_with_pos_embed_resize(tmp_path, suffix: str) -> None:
    src = _timm_vit(img=224, cls=True, ls=False)
    path = tmp_path / f"deit{suffix}"
    if suffix == ".pth":
        torch.save({"model": src.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    model = _tiny(pretrain_size=64)  # pretrain grid 4x4: the 14x14 table must be resized
    report = load_vit_state_dict(model.vit, read_state_dict(path))
    assert "cls_token" in report.ignored and any(k.startswith("norm.") for k in report.ignored)
    assert report.resized and "(1, 197, 64)->(1, 16, 64)" in report.resized[0]
    assert all(".ls" in k for k in report.missing) and len(report.missing) == 8  # LayerScale absent in DeiT
    torch.testing.assert_close(model.vit.blocks[3].mlp.fc1.weight, src.blocks[3].mlp.fc1.weight)
    pe = src.pos_embed[:, 1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    want = F.interpolate(pe, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.vit.pos_embed.data, want)


def test_load_rejects_shape_mismatch_naming_keys(tmp_path) -> None:
    src = _timm_vit(dim=96, heads=2)
    with pytest.raises(WeightLoadError, match=r"blocks\.0\.attn\.qkv\.weight"):
        load_vit_state_dict(_tiny().vit, src.state_dict())
    with pytest.raises(WeightLoadError, match="not found"):
        read_state_dict(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightLoadError, match="bad.pth"):
        read_state_dict(bad)


def test_info_cli_reports_params(capsys) -> None:
    assert main(["info", "vit_adapter_s", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["params"]["head"] == 0
    assert abs(info["params"]["adapter"] - 5.830e6) < 0.01e6
    assert info["params"]["total"] == info["params"]["vit"] + info["params"]["adapter"]

    assert (
        main(
            [
                "info",
                "vit_adapter_s",
                "--set",
                "injector=add",
                "--set",
                "n_interactions=0",
                "--set",
                "use_extractor=false",
                "--set",
                "output_neck=baseline",
                "--json",
            ]
        )
        == 0
    )
    v1 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Variant 1 = baseline (23.448 M) + SPM (1.307 M), reference §3.
    assert abs(v1["params"]["total"] - (23.448e6 + 1.307e6)) < 0.002e6


def test_info_cli_bad_flag_exits_2(capsys) -> None:
    assert main(["info", "vit_adapter_s", "--set", "injektor=add"]) == 2
    err = capsys.readouterr().err
    assert "injektor" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# Model API (timm style): no_weight_decay, group_matcher, forward_intermediates, disabled parts, unused params.


@pytest.mark.parametrize("variant", sorted(ABLATIONS))
def test_no_weight_decay_names_the_official_embeddings(variant: str) -> None:
    model = _tiny(**ABLATIONS[variant])
    names = {n for n, _ in model.named_parameters()}
    # The official configs' no-decay names beyond norms and biases are level_embed and pos_embed (reference §2).
    assert model.no_weight_decay() == {n for n in names if "level_embed" in n or "pos_embed" in n}
    assert model.no_weight_decay() <= names and model.vit.no_weight_decay() == {"pos_embed"}


def test_pretrain_param_groups_use_the_vit_no_weight_decay_unchanged() -> None:
    from vit_adapter.engine.optim import listed_param_groups
    from vit_adapter.engine.pretrain import build_head

    vit = _tiny().vit
    head = build_head(64)
    groups = listed_param_groups([vit, head], 0.05)
    # The previous rule, written out: 1-D parameters and the position embedding get no decay.
    old_decay = [p for m in (vit, head) for n, p in m.named_parameters() if not (p.ndim <= 1 or n == "pos_embed")]
    old_skip = [p for m in (vit, head) for n, p in m.named_parameters() if p.ndim <= 1 or n == "pos_embed"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in old_decay]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in old_skip]


def test_group_matcher_agrees_with_the_layer_decay_ids() -> None:
    import re

    from vit_adapter.engine.optim import layer_id

    model = _tiny()
    gm = model.group_matcher()
    ((block_re, _),) = gm["blocks"]
    for name, _ in model.named_parameters():
        if re.match(gm["stem"], name):
            expected = 0
        elif m := re.match(block_re, name):
            expected = int(m.group(1)) + 1
        else:
            expected = model.depth + 1
        assert layer_id(f"backbone.{name}", model.depth) == expected, name
    assert model.group_matcher(coarse=True)["blocks"] == block_re


@pytest.mark.parametrize("task", ["det", "seg"])
def test_forward_intermediates_taps_and_outputs(task: str) -> None:
    torch.manual_seed(0)
    model = _tiny(task=task).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outs = model(x)
        got, taps = model.forward_intermediates(x)
        assert all(torch.equal(a, b) for a, b in zip(got, outs)) and len(got) == 4
        assert [tuple(t.shape) for t in taps] == [(2, 64, 4, 6)] * model.depth
        last2 = model.forward_intermediates(x, 2, output_fmt="NLC", intermediates_only=True)
        assert [tuple(t.shape) for t in last2] == [(2, 24, 64)] * 2
        assert torch.equal(last2[1].transpose(1, 2).reshape(2, 64, 4, 6), taps[-1])
        picked = model.forward_intermediates(x, [1], intermediates_only=True)
        assert len(picked) == 1 and torch.equal(picked[0], taps[1])
    with pytest.raises(ValueError, match="block indices"):
        model.forward_intermediates(x, [model.depth])


def test_plain_vit_forward_intermediates_is_the_adapter_baseline_stream() -> None:
    torch.manual_seed(0)
    model = _tiny(**ABLATIONS["baseline"]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, vit_taps = model.vit.forward_intermediates(x, model.tap_indices)
        _, taps = model.forward_intermediates(x, model.tap_indices)
        assert torch.equal(final, model.vit(x))
    assert all(torch.equal(a, b) for a, b in zip(vit_taps, taps)) and len(taps) == 4


def test_disabled_injector_is_an_identity_without_keys() -> None:
    from vit_adapter.models.adapter import PassThrough

    model = _tiny(**ABLATIONS["no_injector"])
    x, c = torch.randn(1, 16, 64), torch.randn(1, 84, 64)
    for blk in model.interactions:
        assert isinstance(blk.injector, PassThrough) and isinstance(blk.injector, torch.nn.Identity)
        assert blk.injector(x, c, None, ()) is x
    assert not [k for k in model.state_dict() if ".injector." in k]
    full = _tiny()
    assert all(not isinstance(blk.injector, PassThrough) for blk in full.interactions)


EDGE_CASES = {
    "baseline_neck_with_extractor": dict(output_neck="baseline"),
    "adapter_neck_no_vit_feature": dict(use_extractor=False, add_vit_feature=False),
}


@pytest.mark.parametrize("task", ["det", "seg"])
@pytest.mark.parametrize("variant", sorted(ABLATIONS) + sorted(EDGE_CASES))
def test_has_unused_parameters_matches_one_training_step(variant: str, task: str) -> None:
    """DDP's find_unused_parameters is set from this attribute: it must be True exactly when a step leaves some
    parameter without a gradient."""
    model = _tiny(task=task, **{**ABLATIONS, **EDGE_CASES}[variant]).train()
    sum(o.square().mean() for o in model(torch.randn(1, 3, 64, 64))).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert model.has_unused_parameters == bool(unused), unused
