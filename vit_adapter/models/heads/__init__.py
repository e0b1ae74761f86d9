"""Dense-prediction heads on top of a 4-level backbone (strides 4/8/16/32, ``D`` channels each).

* segmentation.py -- UperNet (+ FCN auxiliary head) and Semantic FPN, mmseg semantics, our own code.
* detection.py -- Mask R-CNN from torchvision's parts; rcnn_parts.py -- the parts of our own it is given
  (mmdet's L1 box losses and aligned RoIAlign, fp32 box math). Nothing here changes another library.
* blocks.py -- conv-norm-ReLU, resizing, input checks and the parameter count shared by both.

Parameter parity (``sum(p.numel())``, head = everything except the backbone; in_channels = [D]*4)
--------------------------------------------------------------------------------------------------
Mask R-CNN, 80 classes (reference §1.8: Mask R-CNN total [C] minus ViT [C] minus adapter [C]):

=====  ===================================  ========
D      paper-implied head (M)               ours (M)
=====  ===================================  ========
192    28.07 - 5.53 - 2.438 = 20.10         20.106
384    47.80 - 27.50 = 20.30                20.303
768    120.19 - 85.81 - 13.681 = 20.70      20.696
=====  ===================================  ========

Ours is mmdet's head + 4,357 params: torchvision's box regressor also predicts (unused) deltas for the
background class (1024*4+4) and its mask predictor has a background logit channel (256+1). Breakdown for
D=384 (mmdet): FPN 2.755 M (laterals 4x(D*256+256), 3x3 fpn convs 4x590,080), RPN 0.594 M, box head 14.307 M
(fc 12544->1024, 1024->1024, cls 81, reg 320), mask head 2.643 M (4 convs, deconv, 80 logits).

ADE20K, 150 classes, [P] Table 3 totals minus the backbone ([P] Table 10 totals T 8.0 / S 27.5 / B 99.8 M;
[C] backbones T 7.968 / S 27.50 / B 99.49 M):

=====  ================  ====================  ========  ================  ====================  ========
D      UperNet+aux [P]   implied (T10 / [C])   ours      Sem. FPN [P]      implied (T10 / [C])   ours
=====  ================  ====================  ========  ================  ====================  ========
192    36.1              28.1 / 28.13          28.096    12.2              4.2 / 4.23            4.201
384    57.6              30.1 / 30.10          30.111    31.9              4.4 / 4.40            4.398
768    133.9             34.1 / 34.41          34.141    104.6             4.8 / 5.11            4.791
=====  ================  ====================  ========  ================  ====================  ========

UperNet+aux = UPerHead (PPM 4x(D*512+1024), bottleneck (D+2048)*512*9, 3 laterals, 3 fpn convs, fused
2048->512 3x3, classifier) + FCNHead (D->256 3x3 + BN, classifier). The paper's segmentation totals match
ours within the rounding (0.05 M) when the backbone is taken from [P] Table 10, which is where they were
evidently computed; against the [C] backbone the B rows are 0.27/0.32 M off, the same +0.32 M that reference
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from .blocks import count_params
from .detection import MaskRCNNDetector
from .segmentation import (
    FCNHead,
    SegFPNNeck,
    SegmentationModel,
    SemanticFPNHead,
    UperNetHead,
    build_segmentation,
)

__all__ = [
    "FCNHead",
    "MaskRCNNDetector",
    "SegFPNNeck",
    "SegmentationModel",
    "SemanticFPNHead",
    "UperNetHead",
    "build_head_model",
    "count_params",
]


def build_head_model(
    task: Literal["seg", "det"],
    head: Literal["upernet", "semfpn", "mask_rcnn"],
    backbone: nn.Module,
    **head_kwargs: Any,
) -> SegmentationModel | MaskRCNNDetector:
    """Wrap ``backbone`` (4 levels, ``out_channels`` = [D]*4) with a task head; the engine's entry point.

    seg: ``num_classes`` (required), head options (``channels``, ``pool_scales``, ``fpn_channels``,
    ``dropout``, ``norm``, ...), ``aux`` (default True for upernet as in the Swin/ViT-Adapter configs, False
    for semfpn as in PVT's), ``aux_channels`` (256), ``aux_num_convs`` (1), ``aux_in_index`` (2),
    ``aux_weight`` (0.4), ``ignore_index`` (255), ``avg_non_ignore`` (False), ``size_divisor`` (32).
    det: keyword arguments of :class:`MaskRCNNDetector`.
    """
    valid = {"seg": ("upernet", "semfpn"), "det": ("mask_rcnn",)}
    if task not in valid:
        raise ValueError(f"task must be 'seg' or 'det', got {task!r}")
    if head not in valid[task]:
        raise ValueError(f"head {head!r} is not available for task {task!r}; choose from {valid[task]}")
    if task == "det":
        return MaskRCNNDetector(backbone, **head_kwargs)
    return build_segmentation(head, backbone, **head_kwargs)
