"""Dense-prediction heads on top of a 4-level backbone (strides 4/8/16/32, ``D`` channels each).

Segmentation (our own code, mmseg semantics; reference §2 "ADE20K UperNet", reference §6 "Semantic FPN"):

* :class:`UperNetHead` -- PPM on the last level + FPN laterals/fpn convs + fused 3x3 bottleneck, as mmseg's
  ``UPerHead`` (channels 512, pool scales 1/2/3/6, dropout 0.1), logits at stride 4.
* :class:`FCNHead` -- auxiliary head on ``in_index=2`` (channels 256, 1 conv, loss weight 0.4; reference §2).
* :class:`SemanticFPNHead` -- mmseg ``FPN`` neck (256 channels, 4 outputs, plain convs with bias) +
  ``FPNHead`` (per-level 3x3 conv-norm-ReLU stacks upsampling to 1/4, channels 128, summed, dropout 0.1),
  PVT's setup (reference §6).
* :class:`SegmentationModel` -- backbone + decode head (+ aux head); bilinear (align_corners=False)
  upsampling to the input size; cross-entropy with ``ignore_index=255``.

Detection / instance segmentation: :class:`MaskRCNNDetector` -- torchvision's ``MaskRCNN`` with a
``FeaturePyramidNetwork`` (+ ``LastLevelMaxPool``, 5 levels) and ``MultiScaleRoIAlign`` over the 4 backbone
levels; no hand-written RPN/RoI code. Sizes/thresholds default to mmdet 2.x ``mask_rcnn_r50_fpn`` (the
ViT-Adapter configs).

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
§1.8 notes for Table 10's B adapter count. So the head arithmetic agrees with the paper.

mmdet 2.22 vs torchvision, selectable (head.box_loss, head.roi_align_aligned; the COCO paper profiles take mmdet's):
RPN/RoI box losses are L1 in mmdet and smooth-L1 (beta 1/9) in torchvision, with the same normalisation (sampled
anchors / sampled RoIs); mmcv's RoIAlign is ``aligned=True`` (a half-pixel shift), torchvision's
``MultiScaleRoIAlign`` ``aligned=False``. The RoI level mapping (canonical 224 at level 4) is the same as mmdet's
``finest_scale=56``. Under autocast, anchors, RPN deltas, proposals and RoI scores/deltas stay fp32 (torchvision
would decode bf16 boxes: 4-px steps above 512 px); only the convs/matmuls run in half precision. Eval masks are
per-pixel probabilities (N,1,H,W); threshold at 0.5 as mmdet's ``mask_thr_binary``.

Determinism (CPU): torchvision's samplers draw with ``torch.randperm`` from the global RNG, so seed it; the
CPU ``roi_align``/``nms`` kernels are deterministic (``batched_nms`` switches from the offset trick to a
per-class loop above 4000 boxes on CPU, both exact); bit-identical results also need a fixed thread count.
On CUDA ``roi_align``'s backward accumulates with atomics; under ``torch.use_deterministic_algorithms(True)``
torchvision switches to a slower compiled pure-PyTorch ``roi_align`` instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection import roi_heads as _tv_roi_heads
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

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

NormKind = Literal["bn", "syncbn"]


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared tensors counted once; buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------
def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "syncbn":
        # Needs an initialised process group at train time (reference §4.5); use "bn" for single-process runs.
        return nn.SyncBatchNorm(channels)
    raise ValueError(f"norm must be 'bn' or 'syncbn', got {kind!r}")


class ConvNormAct(nn.Sequential):
    """conv (no bias, the norm has one) -> BN/SyncBN -> ReLU; mmcv's ``ConvModule`` with a norm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, norm: NormKind = "bn") -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        # mmcv ConvModule init: kaiming-normal, fan_out, relu.
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, _norm(norm, out_channels), nn.ReLU(inplace=True))


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    # mmseg configs use align_corners=False everywhere (reference §2).
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _check_features(features: Sequence[Tensor], in_channels: Sequence[int], who: str) -> None:
    if not isinstance(features, (list, tuple)) or len(features) != len(in_channels):
        n = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
        raise ValueError(f"{who} expects a list of {len(in_channels)} feature maps, got {n}")
    for i, (f, c) in enumerate(zip(features, in_channels)):
        if not isinstance(f, Tensor) or f.dim() != 4 or f.shape[1] != c:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"{who}: feature {i} must be (B,{c},H,W), got {shape}")


def _check_channels(in_channels: Sequence[int], n: int, who: str) -> list[int]:
    chans = [int(c) for c in in_channels]
    if len(chans) != n or any(c <= 0 for c in chans):
        raise ValueError(f"{who} needs {n} positive in_channels, got {list(in_channels)}")
    return chans


class _Classifier(nn.Module):
    """Dropout2d -> 1x1 conv; mmseg ``BaseDecodeHead.cls_seg`` (conv_seg init normal std 0.01, bias 0)."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(x))


# --------------------------------------------------------------------------------------------------
# segmentation heads
# ----------------------------------------------------------------------------------------------------
class UperNetHead(nn.Module):
    """UperNet decode head (mmseg ``UPerHead`` semantics); logits at the stride of the first level (4)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int = 512,
        *,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm: NormKind = "bn",
    ) -> None:
        super().__init__()
        self.in_channels = _check_channels(in_channels, 4, "UperNetHead")
        self.num_classes = num_classes
        top = self.in_channels[-1]
        # PPM: pool -> 1x1 conv-norm-relu per scale. Pool scale 1 + BN: training needs batch >= 2 (as mmseg).
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(top, channels, 1, norm)) for s in pool_scales
        )
        self.bottleneck = ConvNormAct(top + len(pool_scales) * channels, channels, 3, norm)
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1, norm) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3, norm) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = ConvNormAct(len(self.in_channels) * channels, channels, 3, norm)
        self.classifier = _Classifier(channels, num_classes, dropout)

    def _psp(self, x: Tensor) -> Tensor:
        outs = [x] + [_resize(stage(x), x.shape[2:]) for stage in self.ppm]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        _check_features(features, self.in_channels, "UperNetHead")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self._psp(features[-1]))
        # Top-down path: coarse map upsampled (bilinear) and added to the next finer lateral.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))
        return self.classifier(fused)


class FCNHead(nn.Module):
    """FCN head on one level (mmseg ``FCNHead``); reference §2's auxiliary head (in_index 2, channels 256)."""

    def __init__(
        self,
        in_channels: int,
        channels: int = 256,
        num_convs: int = 1,
        concat_input: bool = False,
        *,
        num_classes: int,
        in_index: int = 2,
        dropout: float = 0.1,
        norm: NormKind = "bn",
    ) -> None:
        super().__init__()
        if num_convs < 0:
            raise ValueError(f"num_convs must be >= 0, got {num_convs}")
        if num_convs == 0 and in_channels != channels:
            raise ValueError(f"FCNHead with num_convs=0 needs in_channels == channels, got {in_channels} != {channels}")
        self.in_channels = in_channels
        self.in_index = in_index
        self.num_classes = num_classes
        layers = [ConvNormAct(in_channels if i == 0 else channels, channels, 3, norm) for i in range(num_convs)]
        self.convs = nn.Sequential(*layers) if layers else nn.Identity()
        self.conv_cat = ConvNormAct(in_channels + channels, channels, 3, norm) if concat_input else None
        self.classifier = _Classifier(channels, num_classes, dropout)

    def forward(self, features: Sequence[Tensor] | Tensor) -> Tensor:
        if isinstance(features, Tensor):
            x = features
        else:
            if not -len(features) <= self.in_index < len(features):
                raise ValueError(f"FCNHead in_index={self.in_index} is out of range for {len(features)} features")
            x = features[self.in_index]
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"FCNHead: input must be (B,{self.in_channels},H,W), got {tuple(x.shape)}")
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.classifier(out)


class SegFPNNeck(nn.Module):
    """mmseg ``FPN`` neck (``fpn_r50.py``): 1x1 laterals + 3x3 outputs, convs with bias, nearest top-down."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.in_channels = _check_channels(in_channels, len(in_channels), "SegFPNNeck")
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in self.in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # mmseg FPN init_cfg: Xavier uniform, bias 0
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        _check_features(features, self.in_channels, "SegFPNNeck")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            up = F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + up
        return [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]


class SemanticFPNHead(nn.Module):
    """Semantic FPN = :class:`SegFPNNeck` + mmseg ``FPNHead`` (reference §6); logits at ``feature_strides[0]``."""

    def __init__(
        self,
        in_channels: Sequence[int],
        fpn_channels: int = 256,
        channels: int = 128,
        *,
        num_classes: int,
        feature_strides: Sequence[int] = (4, 8, 16, 32),
        dropout: float = 0.1,
        norm: NormKind = "bn",
    ) -> None:
        super().__init__()
        chans = _check_channels(in_channels, 4, "SemanticFPNHead")
        if len(feature_strides) != len(chans) or list(feature_strides) != sorted(feature_strides):
            raise ValueError(f"feature_strides must be {len(chans)} increasing strides, got {list(feature_strides)}")
        self.in_channels = chans
        self.num_classes = num_classes
        self.neck = SegFPNNeck(chans, fpn_channels)
        self.scale_heads = nn.ModuleList()
        base = feature_strides[0]
        for stride in feature_strides:
            # One conv at the finest level; each coarser level gets one conv + 2x upsample per octave to 1/4.
            length = max(1, int(math.log2(stride) - math.log2(base)))
            layers: list[nn.Module] = []
            for k in range(length):
                layers.append(ConvNormAct(fpn_channels if k == 0 else channels, channels, 3, norm))
                if stride != base:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.classifier = _Classifier(channels, num_classes, dropout)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        pyramid = self.neck(features)
        out = self.scale_heads[0](pyramid[0])
        for head, p in zip(self.scale_heads[1:], pyramid[1:]):
            # resize guards against odd sizes; for multiples of 32 the 2x upsamples already match.
            out = out + _resize(head(p), out.shape[2:])
        return self.classifier(out)


class SegmentationModel(nn.Module):
    """Backbone + decode head (+ auxiliary head); mmseg ``EncoderDecoder`` training/inference semantics.

    ``avg_non_ignore=False`` reproduces mmseg 0.20.2 (reference §2): the pixel-summed cross-entropy is divided by
    *all* pixels, ignored ones included. ``True`` divides by the non-ignored count (later mmseg's
    ``avg_non_ignore``).
    Either way an all-ignore batch gives a loss of exactly 0.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: nn.Module,
        aux_head: nn.Module | None = None,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        *,
        avg_non_ignore: bool = False,
        size_divisor: int = 32,
        class_weight: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.aux_head = aux_head
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        self.avg_non_ignore = avg_non_ignore
        self.size_divisor = size_divisor
        if not isinstance(getattr(decode_head, "num_classes", None), int):
            raise ValueError("decode_head must expose an int attribute num_classes")
        self.num_classes: int = decode_head.num_classes
        # Per-class loss weights (mmseg CrossEntropyLoss ``class_weight``): a pixel's loss is scaled by its class's
        # weight, the sum still divided by the pixel count. A buffer, so it follows the model to its device.
        if class_weight is not None and len(class_weight) != self.num_classes:
            raise ValueError(f"class_weight has {len(class_weight)} entries for {self.num_classes} classes")
        weight = None if class_weight is None else torch.tensor([float(w) for w in class_weight])
        self.register_buffer("class_weight", weight, persistent=False)

    @property
    def backbone_module(self) -> nn.Module:
        return self.backbone

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B,3,H,W) tensor, got {shape}")
        h, w = images.shape[2:]
        if h % self.size_divisor or w % self.size_divisor:
            raise ValueError(f"image height/width must be multiples of {self.size_divisor}, got {h}x{w}")

    def _heads(self, images: Tensor, with_aux: bool) -> tuple[Tensor, Tensor | None]:
        self._check_images(images)
        feats = self.backbone(images)
        size = images.shape[2:]
        logits = _resize(self.decode_head(feats), size)
        aux = _resize(self.aux_head(feats), size) if with_aux and self.aux_head is not None else None
        return logits, aux

    def forward(self, images: Tensor) -> Tensor:
        """Logits (B,K,H,W) at the input resolution."""
        return self._heads(images, with_aux=False)[0]

    def _ce(self, logits: Tensor, targets: Tensor) -> Tensor:
        weight = None if self.class_weight is None else self.class_weight.to(logits.dtype)
        total = F.cross_entropy(logits, targets, weight, ignore_index=self.ignore_index, reduction="sum")
        if self.avg_non_ignore:
            denom = (targets != self.ignore_index).sum().clamp(min=1)
        else:
            denom = torch.tensor(targets.numel(), device=targets.device)
        return total / denom.to(total.dtype)

    def losses(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """``loss_ce`` (+ ``loss_aux``, already multiplied by ``aux_weight``) and ``loss`` = their sum."""
        self._check_images(images)
        if not isinstance(targets, Tensor) or targets.dtype != torch.long:
            raise ValueError(f"targets must be a LongTensor (B,H,W), got {getattr(targets, 'dtype', type(targets))}")
        if targets.dim() != 3 or targets.shape[0] != images.shape[0] or targets.shape[1:] != images.shape[2:]:
            raise ValueError(
                f"targets must be (B,H,W) matching images {tuple(images.shape)}, got {tuple(targets.shape)}"
            )
        bad = (targets != self.ignore_index) & ((targets < 0) | (targets >= self.num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"targets hold labels outside [0, {self.num_classes}) that are not "
                f"ignore_index={self.ignore_index}: "
                f"{torch.unique(targets[bad])[:8].tolist()}"
            )
        logits, aux = self._heads(images, with_aux=True)
        out = {"loss_ce": self._ce(logits, targets)}
        if aux is not None:
            out["loss_aux"] = self.aux_weight * self._ce(aux, targets)
        out["loss"] = sum(out.values())  # type: ignore[assignment]
        return out


# --------------------------------------------------------------------------------------------------
# Mask R-CNN (torchvision)
# ----------------------------------------------------------------------------------------------------
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
        _check_features(feats, self.in_channels, "MaskRCNNDetector backbone output")
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


# --------------------------------------------------------------------------------------------------
# Mask R-CNN pieces: mmdet-compatible box losses / RoIAlign, and box math kept in fp32 under autocast
# --------------------------------------------------------------------------------------------------
BoxLoss = Literal["smooth_l1", "l1"]


def _box_loss(pred: Tensor, target: Tensor, kind: BoxLoss) -> Tensor:
    """Summed box-regression loss: torchvision's smooth-L1 (beta 1/9) or mmdet 2.22's L1 (loss_weight 1)."""
    pred, target = pred.float(), target.float()
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="sum")
    return F.smooth_l1_loss(pred, target, beta=1 / 9, reduction="sum")


class _FP32RPNHead(RPNHead):
    """RPN head whose outputs are fp32, so proposals are decoded in fp32 under autocast (a bf16 box above 512 px
    is quantised to 4 px and more)."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class _FP32Anchors(AnchorGenerator):
    """Anchors in fp32 whatever the feature dtype (torchvision takes the anchors' dtype from the features)."""

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        # Zero-stride fp32 stand-ins: only shape, dtype and device of the feature maps are read.
        shapes = [torch.empty((), device=f.device).expand(f.shape) for f in feature_maps]
        return super().forward(image_list, shapes)


class _FP32BoxPredictor(FastRCNNPredictor):
    """Class scores and box deltas in fp32 (RoI box decoding, NMS and the box loss then run in fp32)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


class _RPN(RegionProposalNetwork):
    """torchvision's RPN with a selectable box loss (normalised by the sampled anchors, as both libraries)."""

    box_loss: BoxLoss = "smooth_l1"

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
        box = _box_loss(pred_bbox_deltas[pos], targets[pos], self.box_loss) / sampled.numel()
        obj = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels, dim=0)[sampled])
        return obj, box


# torchvision's RoIHeads calls the module-level ``fastrcnn_loss``; it is wrapped once so that a detector with
# box_loss "l1" can select L1 for the duration of its own forward (a context variable: thread- and
# model-local; every other caller keeps torchvision's loss unchanged).
_ROI_BOX_LOSS: contextvars.ContextVar[BoxLoss] = contextvars.ContextVar("roi_box_loss", default="smooth_l1")
_TV_FASTRCNN_LOSS = getattr(_tv_roi_heads.fastrcnn_loss, "__wrapped__", _tv_roi_heads.fastrcnn_loss)


def _fastrcnn_loss(
    class_logits: Tensor, box_regression: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
) -> tuple[Tensor, Tensor]:
    kind = _ROI_BOX_LOSS.get()
    if kind == "smooth_l1":
        return _TV_FASTRCNN_LOSS(class_logits, box_regression, labels, regression_targets)
    labels_all = torch.cat(labels, dim=0)
    targets = torch.cat(regression_targets, dim=0)
    cls = F.cross_entropy(class_logits, labels_all)
    pos = torch.where(labels_all > 0)[0]
    deltas = box_regression.reshape(class_logits.shape[0], box_regression.size(-1) // 4, 4)
    box = _box_loss(deltas[pos, labels_all[pos]], targets[pos], kind) / labels_all.numel()
    return cls, box


_fastrcnn_loss.__wrapped__ = _TV_FASTRCNN_LOSS  # type: ignore[attr-defined]
_tv_roi_heads.fastrcnn_loss = _fastrcnn_loss


class _AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
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


class MaskRCNNDetector(MaskRCNN):
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
        if box_loss not in ("smooth_l1", "l1"):
            raise ValueError(f"box_loss must be 'smooth_l1' or 'l1', got {box_loss!r}")
        anchors = _FP32Anchors(
            sizes=tuple((int(s),) for s in anchor_sizes),
            aspect_ratios=(tuple(float(r) for r in aspect_ratios),) * 5,
        )
        levels = ["0", "1", "2", "3"]  # RoIs pool from strides 4..32 only, as mmdet's RoI extractor
        pool = _AlignedMultiScaleRoIAlign if roi_align_aligned else MultiScaleRoIAlign
        box_pool = pool(levels, output_size=7, sampling_ratio=roi_sampling_ratio)
        mask_pool = pool(levels, output_size=14, sampling_ratio=roi_sampling_ratio)
        box_head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
        box_predictor = _FP32BoxPredictor(representation_size, num_classes + 1)
        mask_head = MaskRCNNHeads(fpn_channels, [mask_channels] * mask_convs, dilation=1)
        mask_predictor = MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1)
        super().__init__(
            body,
            num_classes=None,
            rpn_anchor_generator=anchors,
            rpn_head=_FP32RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            rpn_nms_thresh=rpn_nms_thresh,
            rpn_batch_size_per_image=rpn_batch_size_per_image,
            rpn_positive_fraction=rpn_positive_fraction,
            box_roi_pool=box_pool,
            box_head=box_head,
            box_predictor=box_predictor,
            box_score_thresh=box_score_thresh,
            box_nms_thresh=box_nms_thresh,
            box_detections_per_img=box_detections_per_img,
            box_batch_size_per_image=box_batch_size_per_image,
            box_positive_fraction=box_positive_fraction,
            mask_roi_pool=mask_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
        )
        self.transform = _PadOnlyTransform(size_divisible)
        self.num_classes = num_classes
        self.box_loss: BoxLoss = box_loss
        self.rpn.__class__ = _RPN  # same state and construction; only compute_loss differs
        self.rpn.box_loss = box_loss
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
        token = _ROI_BOX_LOSS.set(self.box_loss)
        try:
            return super().forward(imgs, targets if self.training else None)
        finally:
            _ROI_BOX_LOSS.reset(token)

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
        token = _ROI_BOX_LOSS.set(self.box_loss)
        with self._heads_in_train_mode(), contextlib.ExitStack() as stack:
            stack.callback(_ROI_BOX_LOSS.reset, token)
            image_list: ImageList
            image_list, tgts = self.transform(imgs, targets)
            feats = self.backbone(image_list.tensors)
            proposals, rpn_losses = self.rpn(image_list, feats, tgts)
            _, roi_losses = self.roi_heads(feats, proposals, image_list.image_sizes, tgts)
        out = {**roi_losses, **rpn_losses}
        out["loss"] = sum(out.values())  # type: ignore[assignment]
        return out


# --------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------
_SEG_MODEL_KEYS = ("aux_weight", "ignore_index", "avg_non_ignore", "size_divisor", "class_weight")


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

    in_channels = getattr(backbone, "out_channels", None)
    if in_channels is None or len(in_channels) != 4:
        raise ValueError(f"backbone must have out_channels with 4 entries (strides 4/8/16/32), got {in_channels}")
    kw = dict(head_kwargs)
    if "num_classes" not in kw:
        raise ValueError("segmentation needs num_classes (e.g. 150 for ADE20K)")
    model_kw = {k: kw.pop(k) for k in _SEG_MODEL_KEYS if k in kw}
    use_aux = kw.pop("aux", head == "upernet")
    aux_kw = {
        "channels": kw.pop("aux_channels", 256),
        "num_convs": kw.pop("aux_num_convs", 1),
        "in_index": kw.pop("aux_in_index", 2),
    }
    shared = {k: kw[k] for k in ("num_classes", "dropout", "norm") if k in kw}
    decode: nn.Module = (UperNetHead if head == "upernet" else SemanticFPNHead)(in_channels, **kw)
    aux_head = FCNHead(int(in_channels[aux_kw["in_index"]]), **aux_kw, **shared) if use_aux else None
    return SegmentationModel(backbone, decode, aux_head, **model_kw)
