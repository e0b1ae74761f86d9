"""fetch_weights: local files, file:// URLs (the download code path), sha256 checks, formats, timm names."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vit_adapter.engine import weights as W
from vit_adapter.engine.weights import WeightsError, fetch_weights, load_weights, sidecar_path


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "patch_embed.proj.weight": torch.randn(8, 3, 4, 4, generator=g),
        "pos_embed": torch.randn(1, 5, 8, generator=g),
        "blocks.0.attn.qkv.bias": torch.randn(24, generator=g),
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_same(out: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(str(out))
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_local_pth(tmp_path: Path) -> None:
    sd = _state_dict()
    src = tmp_path / "plain.pth"
    torch.save(sd, src)
    out = fetch_weights(str(src), tmp_path / "w" / "plain.safetensors")
    _assert_same(out, sd)
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["source"] == str(src) and meta["kind"] == "file"
    assert meta["input_sha256"] == _sha(src) and meta["output_sha256"] == _sha(out)
    assert meta["n_tensors"] == 3 and meta["n_params"] == sum(v.numel() for v in sd.values())
    assert sorted(p.name for p in out.parent.iterdir()) == ["plain.safetensors", "plain.safetensors.json"]


def test_deit_style_wrapper_and_module_prefix(tmp_path: Path) -> None:
    sd = _state_dict()
    src = tmp_path / "deit.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 299}, src)
    _assert_same(fetch_weights(str(src), tmp_path / "deit.safetensors"), sd)
    src2 = tmp_path / "mm.pt"
    torch.save({"state_dict": sd, "meta": {"iter": 3}}, src2)
    _assert_same(fetch_weights(str(src2), tmp_path / "mm.safetensors"), sd)


def test_safetensors_round_trip(tmp_path: Path) -> None:
    sd = _state_dict()
    src = tmp_path / "in.safetensors"
    save_file(sd, str(src))
    out = fetch_weights(str(src), tmp_path / "out.safetensors", sha256=_sha(src))
    _assert_same(out, sd)
    loaded = load_weights(out)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_file_url_with_sha(tmp_path: Path) -> None:
    sd = _state_dict()
    src = tmp_path / "remote.pth"
    torch.save({"model": sd}, src)
    url = src.as_uri()
    out = fetch_weights(url, tmp_path / "dl" / "r.safetensors", sha256=_sha(src))
    _assert_same(out, sd)
    assert json.loads(sidecar_path(out).read_text())["kind"] == "url"
    # The download's temp file is gone.
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.safetensors", "r.safetensors.json"]


def test_file_url_wrong_sha(tmp_path: Path) -> None:
    src = tmp_path / "remote.pth"
    torch.save(_state_dict(), src)
    wrong = "0" * 64
    out = tmp_path / "dl" / "r.safetensors"
    with pytest.raises(WeightsError) as err:
        fetch_weights(src.as_uri(), out, sha256=wrong)
    msg = str(err.value)
    assert wrong in msg and _sha(src) in msg and src.as_uri() in msg
    assert not out.exists() and list(out.parent.iterdir()) == []  # nothing half-written


def test_url_needs_sha_unless_hub_prefix(tmp_path: Path) -> None:
    src = tmp_path / "noprefix.pth"
    torch.save(_state_dict(), src)
    with pytest.raises(WeightsError, match="needs a sha256"):
        fetch_weights(src.as_uri(), tmp_path / "a.safetensors")
    # torch.hub naming: <name>-<first 8+ hex of the sha256>.pth is verified without an explicit sha.
    digest = _sha(src)
    good = tmp_path / f"deit_x-{digest[:8]}.pth"
    good.write_bytes(src.read_bytes())
    _assert_same(fetch_weights(good.as_uri(), tmp_path / "b.safetensors"), _state_dict())
    bad_prefix = "00000000" if not digest.startswith("00000000") else "11111111"
    bad = tmp_path / f"deit_x-{bad_prefix}.pth"
    bad.write_bytes(src.read_bytes())
    with pytest.raises(WeightsError, match=rf"sha256 prefix mismatch .*expected {bad_prefix}, got {digest}"):
        fetch_weights(bad.as_uri(), tmp_path / "c.safetensors")


def test_local_wrong_sha_and_missing(tmp_path: Path) -> None:
    src = tmp_path / "w.pth"
    torch.save(_state_dict(), src)
    wrong = "ab" * 32
    with pytest.raises(WeightsError, match=rf"sha256 mismatch for {src}: expected {wrong}, got {_sha(src)}"):
        fetch_weights(str(src), tmp_path / "o.safetensors", sha256=wrong)
    assert not (tmp_path / "o.safetensors").exists()
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match=rf"weights file not found: {missing}"):
        fetch_weights(str(missing), tmp_path / "o.safetensors")
    with pytest.raises(WeightsError, match="64 hex digits"):
        fetch_weights(str(src), tmp_path / "o.safetensors", sha256="abc")
    assert issubclass(WeightsError, ValueError)


def test_bad_formats(tmp_path: Path) -> None:
    npz = tmp_path / "augreg.npz"
    npz.write_bytes(b"PK")
    with pytest.raises(WeightsError, match=r"unsupported weights format '\.npz'"):
        fetch_weights(str(npz), tmp_path / "o.safetensors")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=rf"cannot read {junk}"):
        fetch_weights(str(junk), tmp_path / "o.safetensors")
    mixed = tmp_path / "mixed.pth"
    torch.save({"a": torch.zeros(1), "b": 3}, mixed)
    with pytest.raises(WeightsError, match="entry 'b' is int, not a tensor"):
        fetch_weights(str(mixed), tmp_path / "o.safetensors")
    with pytest.raises(WeightsError, match="must be a .safetensors"):
        fetch_weights(str(mixed), tmp_path / "o.pth")


def test_cache_reuse_and_refetch(tmp_path: Path) -> None:
    src = tmp_path / "w.pth"
    torch.save(_state_dict(), src)
    out = tmp_path / "o.safetensors"
    fetch_weights(str(src), out)
    stamp = sidecar_path(out).stat().st_mtime_ns
    fetch_weights(str(src), out)
    assert sidecar_path(out).stat().st_mtime_ns == stamp  # reused, not rewritten
    # A corrupted output is detected and fetched again.
    out.write_bytes(b"corrupt")
    fetch_weights(str(src), out)
    _assert_same(out, _state_dict())
    with pytest.raises(WeightsError, match="mismatch"):
        out.write_bytes(b"corrupt")
        load_weights(out)


def test_timm_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    model = torch.nn.Linear(3, 2)
    calls: list[tuple[str, bool]] = []

    def fake_create(name: str, pretrained: bool = False) -> torch.nn.Module:
        calls.append((name, pretrained))
        return model

    monkeypatch.setattr(timm, "create_model", fake_create)
    name = "deit_tiny_patch16_224.fb_in1k"
    out = fetch_weights(name, tmp_path / "t.safetensors")
    assert calls == [(name, True)]
    _assert_same(out, {k: v.detach() for k, v in model.state_dict().items()})
    assert json.loads(sidecar_path(out).read_text())["kind"] == "timm"

    def offline(name: str, pretrained: bool = False) -> torch.nn.Module:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match=r"cannot fetch pretrained timm weights 'vit_small_patch16_2.*network"):
        fetch_weights("vit_small_patch16_224", tmp_path / "u.safetensors")
    with pytest.raises(WeightsError, match="neither an existing file, a URL nor a timm model name"):
        fetch_weights("no_such_model_xyz", tmp_path / "v.safetensors")


def test_source_kind_and_default_path(tmp_path: Path) -> None:
    assert W.source_kind("https://x/y.pth") == "url" and W.source_kind("file:///a/b.pth") == "url"
    assert W.source_kind("vit_large_patch16_384.augreg_in21k_ft_in1k") == "timm"
    assert W.source_kind("weights/deit.pth") == "file" and W.source_kind("deit.safetensors") == "file"
    url = "https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth"
    p = W.weights_path_for(url, tmp_path)
    assert p.parent == tmp_path and p.suffix == ".safetensors"
    assert p.name.startswith("deit_tiny_patch16_224-a1311bcf-")
    assert W.weights_path_for(url, tmp_path) == p != W.weights_path_for(url + "?v=2", tmp_path)
