"""Dense-prediction heads: shapes, losses, Mask R-CNN I/O, parameter parity with the paper (reference §1.8)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vit_adapter.models.heads import (
    FCNHead,
    MaskRCNNDetector,
    SegmentationModel,
    SemanticFPNHead,
    UperNetHead,
    build_head_model,
    count_params,
)

NUM_SEG_CLASSES = 5


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    # The 2 cores are shared with other jobs; 2 intra-op threads under contention made this file ~10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinyBackbone(nn.Module):
    """4 maps at strides 4/8/16/32 with ``dim`` channels each (stands in for ViT-Adapter)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.downs = nn.ModuleList(nn.Conv2d(dim, dim, 2, stride=2) for _ in range(3))
        self.out_channels = [dim] * 4

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = [self.stem(x)]
        for down in self.downs:
            outs.append(down(outs[-1]))
        return outs


class ChannelsOnly(nn.Module):
    """Parameter-free stand-in for parameter counting on the meta device."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_channels = [dim] * 4


def tiny_seg(head: str, **kw: object) -> SegmentationModel:
    sizes = {"upernet": {"channels": 16, "aux_channels": 8}, "semfpn": {"fpn_channels": 16, "channels": 8}}[head]
    model = build_head_model("seg", head, TinyBackbone(), num_classes=NUM_SEG_CLASSES, **sizes, **kw)
    assert isinstance(model, SegmentationModel)
    return model


def tiny_det(**kw: object) -> MaskRCNNDetector:
    opts: dict = dict(
        num_classes=3,
        fpn_channels=16,
        representation_size=32,
        mask_channels=8,
        mask_convs=1,
        anchor_sizes=(8, 16, 32, 64, 128),
        rpn_pre_nms_top_n_train=100,
        rpn_post_nms_top_n_train=50,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        rpn_batch_size_per_image=32,
        box_batch_size_per_image=32,
    )
    opts.update(kw)
    return MaskRCNNDetector(TinyBackbone(), **opts)


def det_batch() -> tuple[Tensor, list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=g)
    boxes = torch.tensor([[8.0, 10.0, 40.0, 36.0], [30.0, 28.0, 60.0, 62.0]])
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
        m[y1:y2, x1:x2] = 1
    t0 = {"boxes": boxes, "labels": torch.tensor([1, 3]), "masks": masks}
    # second image has no instances (crops can lose all objects); torchvision must handle it
    t1 = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 64, 64),
    }
    return images, [t0, t1]


def seg_batch() -> tuple[Tensor, Tensor]:
    """Learnable batch: 8x8-pixel blocks of random classes, each painted with its class colour plus noise."""
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, NUM_SEG_CLASSES, (2, 8, 8), generator=g)
    targets = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    colours = torch.randn(NUM_SEG_CLASSES, 3, generator=g)
    images = colours[targets].permute(0, 3, 1, 2) + 0.1 * torch.randn(2, 3, 64, 64, generator=g)
    targets[:, :8] = 255
    return images.contiguous(), targets


def train_steps(model: nn.Module, step_loss, steps: int = 6, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    history = []
    for _ in range(steps):
        loss = step_loss()["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


# --------------------------------------------------------------------------------------------------
# segmentation
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["upernet", "semfpn"])
def test_seg_logit_shapes(head: str) -> None:
    model = tiny_seg(head).eval()
    images = torch.randn(2, 3, 64, 96)
    feats = model.backbone(images)
    assert model.decode_head(feats).shape == (2, NUM_SEG_CLASSES, 16, 24)  # stride 4
    assert model(images).shape == (2, NUM_SEG_CLASSES, 64, 96)  # input size


def test_fcn_head_variants() -> None:
    feats = TinyBackbone()(torch.randn(2, 3, 64, 64))
    aux = FCNHead(8, 4, num_classes=NUM_SEG_CLASSES)
    assert aux(feats).shape == (2, NUM_SEG_CLASSES, 4, 4)  # in_index=2 -> stride 16
    cat = FCNHead(8, 4, num_convs=2, concat_input=True, num_classes=3, in_index=0)
    assert cat(feats).shape == (2, 3, 16, 16)
    assert FCNHead(8, 8, num_convs=0, num_classes=3)(feats).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="num_convs=0"):
        FCNHead(8, 4, num_convs=0, num_classes=3)


def test_upernet_uses_every_level() -> None:
    head = UperNetHead([8] * 4, 16, num_classes=3).eval()
    feats = TinyBackbone()(torch.randn(2, 3, 64, 64))
    base = head(feats)
    for i in range(4):
        changed = list(feats)
        changed[i] = changed[i] + 1.0
        assert not torch.allclose(head(changed), base), f"level {i} does not reach the logits"


def test_seg_losses_match_manual_cross_entropy() -> None:
    model = tiny_seg("upernet").eval()  # eval: no dropout, so forward() and losses() see the same logits
    images, targets = seg_batch()
    out = model.losses(images, targets)
    assert set(out) == {"loss_ce", "loss_aux", "loss"}
    logits = model(images)
    summed = F.cross_entropy(logits, targets, ignore_index=255, reduction="sum")
    torch.testing.assert_close(out["loss_ce"], summed / targets.numel())  # mmseg 0.20: mean over all pixels
    feats = model.backbone(images)
    aux_logits = F.interpolate(model.aux_head(feats), size=(64, 64), mode="bilinear", align_corners=False)
    aux = F.cross_entropy(aux_logits, targets, ignore_index=255, reduction="sum") / targets.numel()
    torch.testing.assert_close(out["loss_aux"], 0.4 * aux)
    torch.testing.assert_close(out["loss"], out["loss_ce"] + out["loss_aux"])

    model.avg_non_ignore = True
    valid = (targets != 255).sum()
    torch.testing.assert_close(model.losses(images, targets)["loss_ce"], summed / valid)


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_all_ignore_batch_gives_zero_loss(avg_non_ignore: bool) -> None:
    model = tiny_seg("upernet", avg_non_ignore=avg_non_ignore).train()
    images = torch.randn(2, 3, 64, 64)
    out = model.losses(images, torch.full((2, 64, 64), 255, dtype=torch.long))
    assert out["loss"].item() == 0.0 and out["loss_ce"].item() == 0.0
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


@pytest.mark.parametrize("head", ["upernet", "semfpn"])
def test_seg_loss_decreases(head: str) -> None:
    model = tiny_seg(head)
    images, targets = seg_batch()
    history = train_steps(model, lambda: model.losses(images, targets), steps=10)
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < 0.85 * history[0], history


def test_seg_bad_inputs() -> None:
    model = tiny_seg("semfpn")
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 60, 64))
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="targets must be"):
        model.losses(images, torch.zeros(2, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="LongTensor"):
        model.losses(images, torch.zeros(2, 64, 64))
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        model.losses(images, torch.full((2, 64, 64), 7, dtype=torch.long))
    with pytest.raises(ValueError, match="list of 4 feature maps"):
        model.decode_head(model.backbone(images)[:3])
    with pytest.raises(ValueError, match="norm must be"):
        UperNetHead([8] * 4, 16, num_classes=3, norm="ln")  # type: ignore[arg-type]
    assert any(
        isinstance(m, nn.SyncBatchNorm) for m in UperNetHead([8] * 4, 16, num_classes=3, norm="syncbn").modules()
    )


def test_build_head_model_dispatch() -> None:
    assert tiny_seg("upernet").aux_head is not None  # Swin/ViT-Adapter UperNet configs carry the aux head
    assert tiny_seg("semfpn").aux_head is None  # PVT's Semantic FPN has none
    assert isinstance(tiny_seg("semfpn").decode_head, SemanticFPNHead)
    assert tiny_seg("upernet", aux=False).aux_head is None
    assert isinstance(build_head_model("det", "mask_rcnn", TinyBackbone(), num_classes=3), MaskRCNNDetector)
    with pytest.raises(ValueError, match="not available for task 'seg'"):
        build_head_model("seg", "mask_rcnn", TinyBackbone(), num_classes=3)
    with pytest.raises(ValueError, match="task must be"):
        build_head_model("cls", "upernet", TinyBackbone())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        build_head_model("seg", "upernet", TinyBackbone())
    with pytest.raises(ValueError, match="out_channels"):
        build_head_model("seg", "upernet", nn.Identity(), num_classes=3)


# --------------------------------------------------------------------------------------------------
# Mask R-CNN
# ----------------------------------------------------------------------------------------------------
def test_det_transform_pads_only() -> None:
    det = tiny_det().eval()
    a, b = torch.randn(3, 64, 96), torch.randn(3, 50, 70)
    image_list, _ = det.transform([a, b])
    assert image_list.tensors.shape == (2, 3, 64, 96)  # padded to the batch max, multiple of 32
    assert image_list.image_sizes == [(64, 96), (50, 70)]  # no resize
    torch.testing.assert_close(image_list.tensors[0], a, rtol=0, atol=0)  # no re-normalisation
    torch.testing.assert_close(image_list.tensors[1, :, :50, :70], b, rtol=0, atol=0)
    assert not image_list.tensors[1, :, 50:].any()


def test_det_train_losses_and_decrease() -> None:
    det = tiny_det()
    images, targets = det_batch()
    det.train()
    out = det(images, targets)
    keys = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert set(out) == keys and all(torch.isfinite(v) for v in out.values())
    history = train_steps(det, lambda: det.losses(images, targets), steps=8, lr=3e-3)
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < 0.8 * history[0], history


def test_det_losses_sum_and_eval_mode() -> None:
    det = tiny_det()
    images, targets = det_batch()
    det.eval()
    out = det.losses(images, targets)  # works in eval mode too (e.g. validation loss)
    assert not det.training and not det.rpn.training and not det.roi_heads.training
    parts = [v for k, v in out.items() if k != "loss"]
    assert len(parts) == 5
    torch.testing.assert_close(out["loss"], torch.stack(parts).sum())


def test_det_eval_output_format() -> None:
    det = tiny_det(box_score_thresh=0.0, box_detections_per_img=7).eval()
    images = [torch.randn(3, 64, 96), torch.randn(3, 64, 64)]
    with torch.no_grad():
        outs = det(images)
    assert isinstance(outs, list) and len(outs) == 2
    for out, img in zip(outs, images):
        assert set(out) == {"boxes", "labels", "scores", "masks"}
        n = out["boxes"].shape[0]
        assert 0 < n <= 7
        assert out["boxes"].shape == (n, 4) and out["scores"].shape == (n,) and out["labels"].shape == (n,)
        assert out["labels"].dtype == torch.int64 and out["labels"].min() >= 1 and out["labels"].max() <= 3
        h, w = img.shape[1:]
        assert out["masks"].shape == (n, 1, h, w)  # pasted in input coordinates
        assert out["masks"].min() >= 0 and out["masks"].max() <= 1
        assert (out["boxes"][:, 2] <= w).all() and (out["boxes"][:, 3] <= h).all() and (out["boxes"] >= 0).all()
    # a (B,3,H,W) tensor is accepted too and gives the same detections as the list form
    with torch.no_grad():
        single = det([images[1]])[0]
        batched = det(torch.stack([images[1], images[1]]))
    torch.testing.assert_close(batched[1]["boxes"], single["boxes"], atol=1e-3, rtol=1e-4)


def test_det_cpu_determinism() -> None:
    images, targets = det_batch()

    def run() -> dict[str, Tensor]:
        torch.manual_seed(3)
        det = tiny_det().train()
        return det.losses(images, targets)

    a, b = run(), run()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_det_bad_targets() -> None:
    det = tiny_det().train()
    images, targets = det_batch()
    with pytest.raises(ValueError, match="targets are required"):
        det(images)
    bad = [dict(targets[0], labels=torch.tensor([0, 1])), targets[1]]
    with pytest.raises(ValueError, match=r"labels must lie in \[1, 3\]"):
        det(images, bad)
    bad = [dict(targets[0], boxes=torch.tensor([[5.0, 5.0, 5.0, 9.0], [1.0, 1.0, 9.0, 9.0]])), targets[1]]
    with pytest.raises(ValueError, match="degenerate"):
        det(images, bad)
    with pytest.raises(ValueError, match="missing"):
        det(images, [{"boxes": torch.zeros(0, 4)}, targets[1]])
    with pytest.raises(ValueError, match="one per image"):
        det(images, targets[:1])
    with pytest.raises(ValueError, match="anchor_sizes"):
        tiny_det(anchor_sizes=(8, 16, 32, 64))
    with pytest.raises(ValueError, match="box_loss must be 'smooth_l1' or 'l1', got 'l2'"):
        tiny_det(box_loss="l2")


def _planted_in_other_libraries() -> list[str]:
    """Attributes of modules outside this repository that hold a function or class defined in ``vit_adapter``
    (test and bench modules of the repository import our names; an installed library never should)."""
    root = Path(__file__).resolve().parents[1]
    found = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if module is None or name.split(".")[0] == "vit_adapter":
            continue
        if file and Path(file).resolve().is_relative_to(root) and "site-packages" not in Path(file).parts:
            continue
        for attr, value in list(vars(module).items()):
            owner = getattr(value, "__module__", None) if callable(value) else None
            if isinstance(owner, str) and owner.split(".")[0] == "vit_adapter":
                found.append(f"{name}.{attr} = {owner}.{getattr(value, '__qualname__', '?')}")
    return found


def test_heads_change_nothing_in_other_libraries() -> None:
    # torchvision's RoI heads call their module-level fastrcnn_loss; the mmdet L1 loss must come from our own
    # RoI heads class, not from replacing that function for every user of torchvision in the process.
    from torchvision.models.detection import roi_heads

    for head in ("upernet", "semfpn"):
        tiny_seg(head).losses(*seg_batch())
    images, targets = det_batch()
    for box_loss, aligned in (("smooth_l1", False), ("l1", True)):
        det = tiny_det(box_loss=box_loss, roi_align_aligned=aligned)
        det(images, targets)
        det.eval()(images)
    assert roi_heads.fastrcnn_loss.__module__ == roi_heads.__name__
    assert _planted_in_other_libraries() == []


# --------------------------------------------------------------------------------------------------
# parameter parity (meta device: no memory, no init cost)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dim", "paper_head"),
    [
        (192, 28.07 - 5.53 - 2.438),  # reference §1.8 [C]: Mask R-CNN total - ViT - adapter (T)
        (384, 47.80 - 27.50),  # S
        (768, 120.19 - 85.81 - 13.681),  # B
    ],
)
def test_mask_rcnn_head_param_parity(dim: int, paper_head: float) -> None:
    with torch.device("meta"):
        det = MaskRCNNDetector(ChannelsOnly(dim), num_classes=80)
    head = count_params(det) - count_params(det.backbone_module)
    assert abs(head / 1e6 - paper_head) < 0.05, head


# [P] Table 3 totals (UperNet incl. aux, Sem. FPN) minus backbone: [C] (reference §1.8) and [P] Table 10 totals.
@pytest.mark.parametrize(
    ("dim", "upernet", "semfpn", "backbone_c", "backbone_t10"),
    [
        (192, 36.1, 12.2, 5.53 + 2.438, 8.0),
        (384, 57.6, 31.9, 27.50, 27.5),
        (768, 133.9, 104.6, 85.81 + 13.681, 99.8),
    ],
)
def test_seg_head_param_parity(dim: int, upernet: float, semfpn: float, backbone_c: float, backbone_t10: float) -> None:
    with torch.device("meta"):
        up = build_head_model("seg", "upernet", ChannelsOnly(dim), num_classes=150)
        fpn = build_head_model("seg", "semfpn", ChannelsOnly(dim), num_classes=150)
    for model, total in ((up, upernet), (fpn, semfpn)):
        head = count_params(model) / 1e6
        assert abs(head - (total - backbone_c)) < 0.5, (dim, head)
        # paper totals are rounded to 0.1 M and match the Table 10 backbone counts to that rounding
        assert abs(head - (total - backbone_t10)) < 0.06, (dim, head)
