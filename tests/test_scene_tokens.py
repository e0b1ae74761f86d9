"""The dense pretraining objective (scene_tokens): token class histograms, the weighted soft cross-entropy, the
flip of token targets, a tiny pretraining run, and the class-weighted segmentation loss downstream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vit_adapter.data.scene_tokens import SEED_OFFSET, render_token_split, token_histograms
from vit_adapter.data.sources import load_silhouettes
from vit_adapter.data.synth import SceneConfig, render_scene, scene_rng
from vit_adapter.engine.pretrain import load_pretrained, pretrain
from vit_adapter.engine.pretrain_objectives import evaluate_tokens, flip_tokens, token_hits, token_loss
from vit_adapter.engine.weights import sidecar_path


def test_token_histograms_are_patch_class_fractions() -> None:
    sem = np.zeros((32, 32), dtype=np.uint8)
    sem[:16, :8] = 3  # half of the top-left token
    sem[16:, 16:] = 10  # all of the bottom-right token
    h = token_histograms(sem, 16)
    assert h.shape == (4, 11) and np.allclose(h.sum(1), 1.0)
    assert h[0, 3] == pytest.approx(0.5) and h[0, 0] == pytest.approx(0.5)
    assert h[3, 10] == 1.0 and h[1, 0] == 1.0 and h[2, 0] == 1.0  # row-major token order
    with pytest.raises(ValueError, match="multiple of the patch"):
        token_histograms(sem[:30], 16)


def test_targets_match_the_rendered_scene_and_never_the_downstream_seed() -> None:
    images, targets, _ = render_token_split("train", n=3, image_size=64, data_seed=5)
    cfg = SceneConfig.from_difficulty(0.5, image_size=64)
    scene = render_scene(scene_rng(5 + SEED_OFFSET, "train", 1), cfg, load_silhouettes("train"))
    assert np.array_equal(images[1], scene.image)
    assert np.allclose(targets[1], token_histograms(scene.semantic(), 16))
    downstream = render_scene(scene_rng(5, "train", 1), cfg, load_silhouettes("train"))
    assert not np.array_equal(images[1], downstream.image)


def test_cache_and_workers_give_the_same_arrays(tmp_path: Path) -> None:
    a = render_token_split("val", n=16, image_size=32, workers=2, cache_dir=tmp_path)
    b = render_token_split("val", n=16, image_size=32, cache_dir=tmp_path)  # read back from the npz
    c = render_token_split("val", n=16, image_size=32)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    for x, y, z in zip(a[:2], b[:2], c[:2], strict=True):
        assert np.array_equal(x, y) and np.array_equal(x, z)


def test_token_loss_is_objectness_bce_plus_object_weighted_class_ce() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 11, dtype=torch.float64)
    targets = torch.softmax(torch.randn(2, 4, 11, dtype=torch.float64) * 3, dim=-1)
    fg = 1 - targets[..., 0]
    bce = F.binary_cross_entropy_with_logits(logits[..., 0], fg)
    mix = targets[..., 1:] / fg[..., None]
    ce = -(mix * logits[..., 1:].log_softmax(-1)).sum(-1)
    assert torch.allclose(token_loss(logits, targets), bce + (fg * ce).sum() / fg.sum())
    # All-background targets: only the objectness term remains, and it is finite.
    bg = torch.zeros(1, 3, 11, dtype=torch.float64)
    bg[..., 0] = 1
    out = token_loss(logits[:1, :3], bg)
    assert torch.isfinite(out) and torch.allclose(
        out, F.binary_cross_entropy_with_logits(logits[:1, :3, 0], bg[..., 1])
    )


def test_token_hits_count_object_majority_tokens_only() -> None:
    targets = torch.zeros(1, 3, 11)
    targets[0, 0, 0] = 1  # background token: never counted
    targets[0, 1, 4] = 1
    targets[0, 2, 7] = 0.6
    targets[0, 2, 0] = 0.4
    logits = torch.zeros(1, 3, 11)
    logits[0, :, 4] = 5  # right on token 1, wrong on token 2
    logits[0, :, 0] = 9  # the objectness channel never enters the class argmax
    assert token_hits(logits, targets) == (1, 2)


def test_flip_tokens_matches_flipping_the_label_map() -> None:
    sem = np.random.default_rng(0).integers(0, 11, (32, 48)).astype(np.uint8)
    t = torch.from_numpy(token_histograms(sem, 16))[None]
    flipped = torch.from_numpy(token_histograms(np.ascontiguousarray(sem[:, ::-1]), 16))[None]
    assert torch.equal(flip_tokens(t, (2, 3)), flipped)


def test_tiny_scene_token_pretraining_writes_weights_and_a_held_out_score(tmp_path: Path) -> None:
    out = tmp_path / "vit.safetensors"
    kw = dict(image_size=32, steps=6, batch_size=8, n_train=24, n_val=12, warmup_steps=2, threads=1)
    r = pretrain("vit_cpu", out=out, objective="scene_tokens", augment="flip", **kw)
    side = json.loads(sidecar_path(out).read_text(encoding="utf-8"))
    assert side["objective"] == "scene_tokens" and side["num_classes"] == 11 and side["steps"] == 6
    vit, head, _ = load_pretrained(out)
    images, targets, _ = render_token_split("val", n=12, image_size=32)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    assert evaluate_tokens(vit, head, x, torch.from_numpy(targets)) == pytest.approx(r["top1"])
    again = pretrain("vit_cpu", out=tmp_path / "again.safetensors", objective="scene_tokens", augment="flip", **kw)
    assert again["output_sha256"] == r["output_sha256"]  # deterministic for a seed


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"objective": "mae"}, "objective must be one of"),
        ({"objective": "scene_tokens", "augment": "crop_flip"}, "supports augment"),
        ({"objective": "scene_tokens", "scene_difficulty": 2.0}, "scene_difficulty"),
    ],
)
def test_bad_scene_token_options_raise(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pretrain("vit_cpu", out=tmp_path / "x.safetensors", steps=1, **kwargs)


def test_class_weighted_segmentation_loss_is_mmseg_weighted_mean() -> None:
    from vit_adapter.engine.build import build_model
    from vit_adapter.engine.config import load_config
    from vit_adapter.models.heads import build_head_model

    torch.manual_seed(0)
    cfg = load_config(
        "cpu_default",
        ["baseline"],
        ["data.label_mode=classes", "head.num_classes=3", "head.class_weight=[0.2,1.0,2.0]", "weights.init=scratch"],
    )
    model = build_model(cfg).double().eval()  # eval: both passes see the same BN statistics
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    targets = torch.randint(0, 3, (1, 64, 64))
    loss = model.losses(images, targets)["loss_ce"]
    logits = model(images)
    ce = F.cross_entropy(logits, targets, reduction="none")
    w = torch.tensor([0.2, 1.0, 2.0], dtype=torch.float64)[targets]
    assert torch.allclose(loss, (w * ce).sum() / targets.numel())
    with pytest.raises(ValueError, match="class_weight has 2 entries"):
        build_head_model("seg", "semfpn", model.backbone, num_classes=3, class_weight=[1.0, 1.0])
    from vit_adapter.engine.config import ConfigError

    with pytest.raises(ConfigError, match="head.class_weight"):
        load_config("cpu_default", [], ["data.label_mode=classes", "head.num_classes=3", "head.class_weight=[1,2]"])
