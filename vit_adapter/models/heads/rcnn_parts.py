"""Mask R-CNN parts of our own, handed to torchvision's detector explicitly (nothing in torchvision is replaced):
mmdet-compatible box losses and RoIAlign, and box math kept in fp32 under autocast.

mmdet 2.22 vs torchvision, selectable (``head.box_loss``, ``head.roi_align_aligned``; the COCO paper profiles take
mmdet's): RPN/RoI box losses are L1 in mmdet and smooth-L1 (beta 1/9) in torchvision, with the same normalisation
(sampled anchors / sampled RoIs); mmcv's RoIAlign is ``aligned=True`` (a half-pixel shift), torchvision's
``MultiScaleRoIAlign`` ``aligned=False``. The RoI level mapping (canonical 224 at level 4) is the same as mmdet's
``finest_scale=56``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

__all__ = [
    "AlignedMultiScaleRoIAlign",
    "BoxLoss",
    "BoxLossRPN",
    "FP32Anchors",
    "FP32BoxPredictor",
    "FP32RPNHead",
    "MaskRoIHeads",
    "box_loss",
    "check_box_loss",
    "rcnn_box_losses",
]

BoxLoss = Literal["smooth_l1", "l1"]


def check_box_loss(kind: str) -> None:
    if kind not in ("smooth_l1", "l1"):
        raise ValueError(f"box_loss must be 'smooth_l1' or 'l1', got {kind!r}")


def box_loss(pred: Tensor, target: Tensor, kind: BoxLoss) -> Tensor:
    """Summed box-regression loss: torchvision's smooth-L1 (beta 1/9) or mmdet 2.22's L1 (loss_weight 1)."""
    pred, target = pred.float(), target.float()
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="sum")
    return F.smooth_l1_loss(pred, target, beta=1 / 9, reduction="sum")


def rcnn_box_losses(
    class_logits: Tensor, box_regression: Tensor, labels: list[Tensor], regression_targets: list[Tensor], kind: BoxLoss
) -> tuple[Tensor, Tensor]:
    """RoI classification (cross-entropy over the sampled RoIs) and box loss of the true class's deltas over the
    positive RoIs, divided by all sampled RoIs, as both libraries normalise it (torchvision's ``fastrcnn_loss``
    with ``kind="smooth_l1"``)."""
    labels_all = torch.cat(labels, dim=0)
    targets = torch.cat(regression_targets, dim=0)
    cls = F.cross_entropy(class_logits, labels_all)
    pos = torch.where(labels_all > 0)[0]
    deltas = box_regression.reshape(class_logits.shape[0], box_regression.size(-1) // 4, 4)
    box = box_loss(deltas[pos, labels_all[pos]], targets[pos], kind) / labels_all.numel()
    return cls, box


class FP32RPNHead(RPNHead):
    """RPN head whose outputs are fp32, so proposals are decoded in fp32 under autocast (a bf16 box above 512 px
    is quantised to 4 px and more)."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class FP32Anchors(AnchorGenerator):
    """Anchors in fp32 whatever the feature dtype (torchvision takes the anchors' dtype from the features)."""

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        # Zero-stride fp32 stand-ins: only shape, dtype and device of the feature maps are read.
        shapes = [torch.empty((), device=f.device).expand(f.shape) for f in feature_maps]
        return super().forward(image_list, shapes)


class FP32BoxPredictor(FastRCNNPredictor):
    """Class scores and box deltas in fp32 (RoI box decoding, NMS and the box loss then run in fp32)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


class BoxLossRPN(RegionProposalNetwork):
    """torchvision's RPN with a selectable box loss (normalised by the sampled anchors, as both libraries)."""

    def __init__(self, *args: object, box_loss: BoxLoss, **kwargs: object) -> None:
        check_box_loss(box_loss)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.box_loss: BoxLoss = box_loss

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        if self.box_loss == "smooth_l1":
            return super().compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        neg = torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        targets = torch.cat(regression_targets, dim=0)
        box = box_loss(pred_bbox_deltas[pos], targets[pos], self.box_loss) / sampled.numel()
        obj = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels, dim=0)[sampled])
        return obj, box


class MaskRoIHeads(RoIHeads):
    """torchvision's box + mask RoI heads (no keypoints) whose box loss is :func:`rcnn_box_losses` of our
    ``box_loss`` kind. torchvision's ``RoIHeads.forward`` calls its module-level ``fastrcnn_loss`` and has no
    hook for another loss, so ``forward`` is ours; sampling, box decoding, the mask loss and mask inference
    are torchvision's methods and functions, called in the same order."""

    def __init__(self, *args: object, box_loss: BoxLoss, **kwargs: object) -> None:
        check_box_loss(box_loss)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if not self.has_mask() or self.has_keypoint():
            raise ValueError("MaskRoIHeads needs the mask RoI pool, head and predictor, and no keypoint branch")
        self.box_loss: BoxLoss = box_loss

    def _mask_logits(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]):
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))

    def forward(  # type: ignore[override]
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("targets are required in train mode")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self.box_predictor(
            self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        )
        if not self.training:
            boxes, scores, classes = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
            result = [{"boxes": b, "labels": c, "scores": s} for b, s, c in zip(boxes, scores, classes)]
            masks = maskrcnn_inference(self._mask_logits(features, boxes, image_shapes), classes)
            for r, m in zip(result, masks):
                r["masks"] = m  # per-pixel probabilities (N,1,H,W)
            return result, {}
        cls_loss, reg_loss = rcnn_box_losses(class_logits, box_regression, labels, regression_targets, self.box_loss)
        # The mask branch trains on the positive RoIs only.
        pos = [torch.where(lab > 0)[0] for lab in labels]
        mask_boxes = [p[i] for p, i in zip(proposals, pos)]
        mask_logits = self._mask_logits(features, mask_boxes, image_shapes)
        gt_masks = [t["masks"] for t in targets]
        gt_labels = [t["labels"] for t in targets]
        loss_mask = maskrcnn_loss(
            mask_logits, mask_boxes, gt_masks, gt_labels, [m[i] for m, i in zip(matched_idxs, pos)]
        )
        return [], {"loss_classifier": cls_loss, "loss_box_reg": reg_loss, "loss_mask": loss_mask}


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` with mmcv's ``RoIAlign(aligned=True)``: sampling points shifted by half a pixel
    so that a box's corners fall on pixel corners. Same level mapping as torchvision (= mmdet finest_scale 56)."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                feats, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio, aligned=True)
            out[idx] = pooled.to(out.dtype)
        return out
