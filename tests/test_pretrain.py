"""`vit-adapter pretrain`: tiny runs (32 px, a few hundred images) checking files, loading, determinism and that
the reported top-1 is a real held-out measurement."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from vit_adapter.data.pretrain import TexturedFashionMNIST
from vit_adapter.engine.pretrain import (
    OBJECTIVES,
    PretrainConfig,
    batch_augment,
    build_head,
    head_path,
    load_pretrained,
    pretrain,
    validate,
)
from vit_adapter.engine.pretrain_objectives import OBJECTIVE_REGISTRY, classify
from vit_adapter.engine.weights import load_weights, sha256_file, sidecar_path
from vit_adapter.models.vit import PlainViT, load_vit_state_dict

# 2x2 tokens, depth-4 CPU preset: a step takes a few ms.
TINY = dict(image_size=32, steps=8, batch_size=16, n_train=96, n_val=60, warmup_steps=3, lr=2e-3, threads=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pt") / "vit.safetensors"
    return out, pretrain("vit_cpu", out=out, seed=0, **TINY)


def test_writes_loadable_vit_weights_and_sidecar(tiny_run: tuple[Path, dict]) -> None:
    out, result = tiny_run
    side = json.loads(sidecar_path(out).read_text(encoding="utf-8"))
    assert side == json.loads(json.dumps(result))  # the returned dict is what was written
    assert side["source"] == "pretrain" and side["preset"] == "vit_cpu" and side["image_size"] == 32
    assert side["steps"] == 8 and side["seed"] == 0 and side["config"]["n_train"] == 96
    assert side["render_version"] >= 1 and 0.0 <= side["top1"] <= 1.0 and side["seconds"] > 0
    assert side["output_sha256"] == sha256_file(out)
    assert side["head_sha256"] == sha256_file(head_path(out))

    sd = load_weights(out)  # also verifies the digest against the sidecar
    assert not any(k.startswith(("head", "norm.", "fc.")) for k in sd)  # the classifier head stays out
    assert {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"} <= set(sd)
    assert sd["pos_embed"].shape == (1, 4, 192)  # (32 / 16)^2 tokens, no class slot

    vit = PlainViT(embed_dim=192, depth=4, num_heads=3, pretrain_size=32)
    report = load_vit_state_dict(vit, sd)
    assert report.missing == [] and report.unexpected == [] and report.ignored == []
    assert any(k.startswith("blocks.3.") for k in report.loaded)
    # The adapter's ViT (built at another pretrain size) accepts the same file; pos_embed is resized.
    from vit_adapter.models.factory import create_model

    adapter_vit = create_model("vit_adapter_cpu", task="seg").vit
    report = load_vit_state_dict(adapter_vit, sd)
    assert report.missing == [] and report.unexpected == []
    assert adapter_vit.pretrain_grid != (2, 2) and report.resized  # 2x2 grid of the tiny run, resized


def test_reported_top1_is_an_independent_held_out_measurement(tiny_run: tuple[Path, dict]) -> None:
    out, result = tiny_run
    vit, head, meta = load_pretrained(out)
    # Re-render the held-out split through the dataset's own path (per-item normalisation) and re-measure.
    val = TexturedFashionMNIST("val", image_size=32, n=60, seed=0)
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = classify(vit, head, x)
    correct = int((logits.argmax(1) == y).sum())
    assert abs(correct - round(result["top1"] * 60)) <= 1  # allow one argmax tie flipped by float order
    # A freshly initialised head on the same ViT scores differently: the number depends on the trained weights.
    assert not torch.equal(logits, classify(vit, torch.nn.Sequential(head.norm, torch.nn.Linear(192, 10)), x))


def test_same_seed_same_weights_other_seed_differs(tmp_path: Path, tiny_run: tuple[Path, dict]) -> None:
    out, result = tiny_run
    again = pretrain("vit_cpu", out=tmp_path / "again.safetensors", seed=0, **TINY)
    assert again["output_sha256"] == result["output_sha256"]
    assert again["head_sha256"] == result["head_sha256"] and again["top1"] == result["top1"]
    other = pretrain("vit_cpu", out=tmp_path / "other.safetensors", seed=1, **{**TINY, "steps": 2})
    assert other["output_sha256"] != result["output_sha256"]


def test_learns_beyond_chance_on_train_items(tmp_path: Path) -> None:
    """Trained a little, the classifier fits its 16 training images far above chance (0.1)."""
    kw = {**TINY, "steps": 15, "n_train": 16, "n_val": 10, "log_every": 5}
    r = pretrain("vit_cpu", out=tmp_path / "fit.safetensors", **kw)
    assert r["history"][0]["train_top1"] < r["history"][-1]["train_top1"]
    assert r["history"][-1]["train_top1"] >= 0.6


def test_time_budget_stops_the_run(tmp_path: Path) -> None:
    t = time.perf_counter()
    kw = {**TINY, "steps": 100_000, "augment": "crop_flip", "invert_prob": 0.5}  # also runs the augmentations
    r = pretrain("vit_cpu", out=tmp_path / "b.safetensors", time_budget_s=3.0, **kw)
    assert r["time_limited"] and 0 < r["steps"] < 100_000
    assert time.perf_counter() - t < 8.0
    assert sidecar_path(tmp_path / "b.safetensors").is_file()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image_size=40), "multiple of 16"),
        (dict(preset="vit_huge"), "unknown model"),
        (dict(batch_size=0), "batch_size"),
        (dict(n_train=0), "n_train"),
        (dict(lr=-1.0), "lr"),
        (dict(augment="mixup"), "augment"),
        (dict(lr="1e-3"), "lr must be a number"),
        (dict(invert_prob=1.5), "invert_prob"),
        (dict(steps=2.5), "steps must be int"),
        (dict(colour=True), "unknown pretrain option"),
        (dict(out="w.pth"), r"\.safetensors"),
        (dict(objective="scene_tokens", augment="crop_flip"), "scene_tokens supports augment none|flip"),
        (dict(objective="scene_tokens", invert_prob=0.5), "scene_tokens has no photometric inversion"),
    ],
)
def test_bad_arguments_raise_clear_value_error(tmp_path: Path, kwargs: dict, match: str) -> None:
    kw = {**TINY, "out": tmp_path / "x.safetensors", **kwargs}
    with pytest.raises(ValueError, match=match):
        pretrain(kw.pop("preset", "vit_cpu"), **kw)
    assert not (tmp_path / "x.safetensors").exists()


def test_batch_augment_identity_and_determinism() -> None:
    x = torch.rand(4, 3, 32, 32)
    same = batch_augment(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    torch.testing.assert_close(same, x)
    a = batch_augment(x, torch.Generator().manual_seed(3))
    b = batch_augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, x)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_each_objective_scores_a_batch_with_a_scalar_loss(name: str) -> None:
    assert tuple(OBJECTIVE_REGISTRY) == OBJECTIVES  # the CLI choices are the registry
    cfg = PretrainConfig(objective=name, image_size=32)
    vkw = validate(cfg)
    objective = OBJECTIVE_REGISTRY[name](cfg, vkw)
    torch.manual_seed(0)
    vit, head = PlainViT(**vkw), build_head(vkw["embed_dim"], objective.num_classes)
    if name == "classify":
        targets = torch.tensor([1, 7])
    else:  # per-token class histograms, (B, 2x2 tokens, C)
        targets = torch.rand(2, 4, objective.num_classes).softmax(dim=-1)
    loss, hits, counted = objective.loss_and_hits(vit, head, torch.randn(2, 3, 32, 32), targets)
    assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss)
    assert 0 <= hits <= counted and counted > 0
    flip = torch.tensor([True, False])
    assert objective.flip_targets(targets, flip, vit.pretrain_grid).shape == targets.shape
