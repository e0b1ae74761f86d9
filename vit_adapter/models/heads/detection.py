"""Detection / instance segmentation: :class:`MaskRCNNDetector` -- torchvision's Mask R-CNN machinery with a
``FeaturePyramidNetwork`` (+ ``LastLevelMaxPool``, 5 levels) and ``MultiScaleRoIAlign`` over the 4 backbone
levels; no hand-written RPN/RoI sampling or box coding. Sizes/thresholds default to mmdet 2.x
``mask_rcnn_r50_fpn`` (the ViT-Adapter configs). The RPN, RoI heads and RoIAlign are our subclasses
(rcnn_parts.py), passed in explicitly: importing this module changes nothing in torchvision.

Under autocast, anchors, RPN deltas, proposals and RoI scores/deltas stay fp32 (torchvision would decode bf16
boxes: 4-px steps above 512 px); only the convs/matmuls run in half precision. Eval masks are per-pixel
probabilities (N,1,H,W); threshold at 0.5 as mmdet's ``mask_thr_binary``.

Determinism (CPU): torchvision's samplers draw with ``torch.randperm`` from the global RNG, so seed it; the
CPU ``roi_align``/``nms`` kernels are deterministic (``batched_nms`` switches from the offset trick to a
per-class loop above 4000 boxes on CPU, both exact); bit-identical results also need a fixed thread count.
On CUDA ``roi_align``'s backward accumulates with atomics; under ``torch.use_deterministic_algorithms(True)``
torchvision switches to a slower compiled pure-PyTorch ``roi_align`` instead.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .blocks import check_features
from .rcnn_parts import (
    AlignedMultiScaleRoIAlign,
    BoxLoss,
    BoxLossRPN,
    FP32Anchors,
    FP32BoxPredictor,
    FP32RPNHead,
    MaskRoIHeads,
)

__all__ = ["MaskRCNNDetector"]


class _PadOnlyTransform(GeneralizedRCNNTransform):
    """Batches and zero-pads to ``size_divisible`` but neither resizes nor normalises: the data pipeline
    already did both (mmdet order: resize, normalise, pad), so detections stay in input coordinates."""

    def __init__(self, size_divisible: int = 32) -> None:
        super().__init__(
            min_size=1, max_size=1, image_mean=[0.0] * 3, image_std=[1.0] * 3, size_divisible=size_divisible
        )

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError(f"images must be floating point (already normalised), got {image.dtype}")
        return image

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pad to multiple of {self.size_divisible}; no resize, no normalisation)"


class _FPNOverBackbone(nn.Module):
    """Backbone list output -> torchvision FPN dict ('0'..'3' at strides 4..32, 'pool' at 64)."""

    def __init__(self, body: nn.Module, out_channels: int) -> None:
        super().__init__()
        in_channels = getattr(body, "out_channels", None)
        if in_channels is None or len(in_channels) != 4:
            raise ValueError(f"backbone must have out_channels with 4 entries (strides 4/8/16/32), got {in_channels}")
        self.body = body
        self.in_channels = [int(c) for c in in_channels]
        # LastLevelMaxPool = max_pool(k=1, s=2) on P5, as mmdet's FPN(num_outs=5, add_extra_convs=False).
        self.fpn = FeaturePyramidNetwork(self.in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.body(x)
        check_features(feats, self.in_channels, "MaskRCNNDetector backbone output")
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


class MaskRCNNDetector(GeneralizedRCNN):
    """torchvision Mask R-CNN over a 4-level backbone, defaults = mmdet 2.x ``mask_rcnn_r50_fpn`` (reference §2).

    Targets follow torchvision: per image a dict with ``boxes`` (N,4) float xyxy in input pixels,
    ``labels`` (N,) int64 in ``[1, num_classes]`` (0 is background) and ``masks`` (N,H,W) uint8/bool.
    ``num_classes`` excludes the background; torchvision's predictors get ``num_classes + 1``.
    Train mode: ``forward`` returns torchvision's loss dict; eval mode: a list of dicts with ``boxes`` (N,4),
    ``labels`` (N,), ``scores`` (N,), ``masks`` (N,1,H,W) probabilities, in input coordinates.
    The ViT backbone is ``self.backbone.body`` (also ``backbone_module``); the FPN is ``self.backbone.fpn``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 80,
        *,
        fpn_channels: int = 256,
        representation_size: int = 1024,
        mask_channels: int = 256,
        mask_convs: int = 4,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_train: int = 1000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        roi_sampling_ratio: int = 0,
        size_divisible: int = 32,
        mmdet_init: bool = True,
        box_loss: BoxLoss = "smooth_l1",
        roi_align_aligned: bool = False,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (background excluded), got {num_classes}")
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per FPN level (5: strides 4..64), got {list(anchor_sizes)}")
        if mask_convs < 1:
            raise ValueError(f"mask_convs must be >= 1, got {mask_convs}")
        body = _FPNOverBackbone(backbone, fpn_channels)
        # mmdet anchors: scale 8 x strides 4..64 = 32..512, ratios 0.5/1/2 (ratio = h/w in both libraries).
        anchors = FP32Anchors(
            sizes=tuple((int(s),) for s in anchor_sizes),
            aspect_ratios=(tuple(float(r) for r in aspect_ratios),) * 5,
        )
        levels = ["0", "1", "2", "3"]  # RoIs pool from strides 4..32 only, as mmdet's RoI extractor
        pool = AlignedMultiScaleRoIAlign if roi_align_aligned else MultiScaleRoIAlign
        box_pool = pool(levels, output_size=7, sampling_ratio=roi_sampling_ratio)
        mask_pool = pool(levels, output_size=14, sampling_ratio=roi_sampling_ratio)
        box_head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
        box_predictor = FP32BoxPredictor(representation_size, num_classes + 1)
        mask_head = MaskRCNNHeads(fpn_channels, [mask_channels] * mask_convs, dilation=1)
        mask_predictor = MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1)
        # Built after the predictors: the RNG draws of the weight inits stay in torchvision's MaskRCNN order.
        rpn_head = FP32RPNHead(fpn_channels, anchors.num_anchors_per_location()[0])
        # IoU thresholds as mmdet's assigners (and torchvision's defaults): RPN positive >= 0.7, negative < 0.3;
        # RoIs positive >= 0.5, negative < 0.5.
        rpn = BoxLossRPN(
            anchors,
            rpn_head,
            0.7,
            0.3,
            rpn_batch_size_per_image,
            rpn_positive_fraction,
            {"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            {"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            rpn_nms_thresh,
            score_thresh=0.0,
            box_loss=box_loss,
        )
        roi_heads = MaskRoIHeads(
            box_pool,
            box_head,
            box_predictor,
            0.5,
            0.5,
            box_batch_size_per_image,
            box_positive_fraction,
            None,  # box coder weights: torchvision's (10, 10, 5, 5) = mmdet's target stds (0.1, 0.1, 0.2, 0.2)
            box_score_thresh,
            box_nms_thresh,
            box_detections_per_img,
            mask_roi_pool=mask_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
            box_loss=box_loss,
        )
        super().__init__(body, rpn, roi_heads, _PadOnlyTransform(size_divisible))
        self.num_classes = num_classes
        if mmdet_init:
            self._mmdet_init()

    def _mmdet_init(self) -> None:
        # mmdet 2.x inits (torchvision's differ): FPN Xavier-uniform; shared FCs Xavier-uniform;
        # cls N(0,.01); reg N(0,.001); mask deconv/logits kaiming fan_out with zero bias.
        # RPN (N(0,.01)) and the mask convs (kaiming fan_out) already match.
        for m in self.backbone.fpn.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for fc in (self.roi_heads.box_head.fc6, self.roi_heads.box_head.fc7):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        pred = self.roi_heads.box_predictor
        nn.init.normal_(pred.cls_score.weight, std=0.01)
        nn.init.normal_(pred.bbox_pred.weight, std=0.001)
        nn.init.zeros_(pred.cls_score.bias)
        nn.init.zeros_(pred.bbox_pred.bias)
        for m in self.roi_heads.mask_predictor.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.zeros_(m.bias)

    @property
    def backbone_module(self) -> nn.Module:
        return self.backbone.body

    # -- input handling ----------------------------------------------------------------------
    @staticmethod
    def _as_list(images: list[Tensor] | Tensor) -> list[Tensor]:
        if isinstance(images, Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"images tensor must be (B,3,H,W), got {tuple(images.shape)}")
            return list(images.unbind(0))
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a (B,3,H,W) tensor or a non-empty list of (3,H,W) tensors")
        for i, img in enumerate(images):
            if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
                shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise ValueError(f"image {i} must be a (3,H,W) tensor, got {shape}")
        return list(images)

    def _check_targets(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None) -> None:
        if targets is None:
            raise ValueError("targets are required to compute losses (train mode or losses())")
        if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
            n = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
            raise ValueError(f"targets must be a list of {len(images)} dicts (one per image), got {n}")
        for i, (img, t) in enumerate(zip(images, targets)):
            missing = {"boxes", "labels", "masks"} - set(t)
            if missing:
                raise ValueError(f"target {i} is missing {sorted(missing)}")
            boxes, labels, masks = t["boxes"], t["labels"], t["masks"]
            n = boxes.shape[0] if boxes.dim() == 2 else -1
            if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
                raise ValueError(f"target {i}: boxes must be a float (N,4) xyxy tensor, got {tuple(boxes.shape)}")
            if labels.shape != (n,) or labels.dtype != torch.int64:
                raise ValueError(
                    f"target {i}: labels must be int64 of shape ({n},), got {labels.dtype} {tuple(labels.shape)}"
                )
            if masks.shape != (n, *img.shape[1:]):
                raise ValueError(
                    f"target {i}: masks must be ({n},{img.shape[1]},{img.shape[2]}), got {tuple(masks.shape)}"
                )
            if n and (labels.min() < 1 or labels.max() > self.num_classes):
                raise ValueError(f"target {i}: labels must lie in [1, {self.num_classes}] (0 is background)")
            if n and bool((boxes[:, 2:] <= boxes[:, :2]).any()):
                raise ValueError(f"target {i}: boxes need x2 > x1 and y2 > y1 (degenerate box found)")

    def forward(  # type: ignore[override]
        self, images: list[Tensor] | Tensor, targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        imgs = self._as_list(images)
        if self.training:
            self._check_targets(imgs, targets)
        return super().forward(imgs, targets if self.training else None)

    @contextlib.contextmanager
    def _heads_in_train_mode(self) -> Iterator[None]:
        # torchvision computes losses only when rpn/roi_heads are in train mode; they hold no BN/dropout, so
        # switching just them lets losses() run in eval mode without touching the backbone's BN statistics.
        heads = (self.rpn, self.roi_heads)
        modes = [h.training for h in heads]
        for h in heads:
            h.train(True)
        try:
            yield
        finally:
            for h, m in zip(heads, modes):
                h.train(m)

    def losses(self, images: list[Tensor] | Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """torchvision's losses plus ``loss`` = their sum; works in train and eval mode."""
        imgs = self._as_list(images)
        self._check_targets(imgs, targets)
        with self._heads_in_train_mode():
            image_list: ImageList
            image_list, tgts = self.transform(imgs, targets)
            feats = self.backbone(image_list.tensors)
            proposals, rpn_losses = self.rpn(image_list, feats, tgts)
            _, roi_losses = self.roi_heads(feats, proposals, image_list.image_sizes, tgts)
        out = {**roi_losses, **rpn_losses}
        out["loss"] = sum(out.values())  # type: ignore[assignment]
        return out
