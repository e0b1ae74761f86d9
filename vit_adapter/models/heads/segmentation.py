"""Segmentation heads (our own code, mmseg semantics; reference §2 "ADE20K UperNet", reference §6 "Semantic FPN").

* :class:`UperNetHead` -- PPM on the last level + FPN laterals/fpn convs + fused 3x3 bottleneck, as mmseg's
  ``UPerHead`` (channels 512, pool scales 1/2/3/6, dropout 0.1), logits at stride 4.
* :class:`FCNHead` -- auxiliary head on ``in_index=2`` (channels 256, 1 conv, loss weight 0.4; reference §2).
* :class:`SemanticFPNHead` -- mmseg ``FPN`` neck (256 channels, 4 outputs, plain convs with bias) +
  ``FPNHead`` (per-level 3x3 conv-norm-ReLU stacks upsampling to 1/4, channels 128, summed, dropout 0.1),
  PVT's setup (reference §6).
* :class:`SegmentationModel` -- backbone + decode head (+ aux head); bilinear (align_corners=False)
  upsampling to the input size; cross-entropy with ``ignore_index=255``.
* :func:`build_segmentation` -- the seg half of ``build_head_model``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ConvNormAct, NormKind, check_channels, check_features, resize

__all__ = ["FCNHead", "SegFPNNeck", "SegmentationModel", "SemanticFPNHead", "UperNetHead", "build_segmentation"]


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
        self.in_channels = check_channels(in_channels, 4, "UperNetHead")
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
        outs = [x] + [resize(stage(x), x.shape[2:]) for stage in self.ppm]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        check_features(features, self.in_channels, "UperNetHead")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self._psp(features[-1]))
        # Top-down path: coarse map upsampled (bilinear) and added to the next finer lateral.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [resize(o, size) for o in outs[1:]], dim=1))
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
        self.in_channels = check_channels(in_channels, len(in_channels), "SegFPNNeck")
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in self.in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # mmseg FPN init_cfg: Xavier uniform, bias 0
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        check_features(features, self.in_channels, "SegFPNNeck")
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
        chans = check_channels(in_channels, 4, "SemanticFPNHead")
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
            out = out + resize(head(p), out.shape[2:])
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
        logits = resize(self.decode_head(feats), size)
        aux = resize(self.aux_head(feats), size) if with_aux and self.aux_head is not None else None
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


_SEG_MODEL_KEYS = ("aux_weight", "ignore_index", "avg_non_ignore", "size_divisor", "class_weight")


def build_segmentation(
    head: Literal["upernet", "semfpn"], backbone: nn.Module, **head_kwargs: Any
) -> SegmentationModel:
    """``backbone`` (4 levels, ``out_channels`` = [D]*4) + a decode head (+ the FCN auxiliary head); see
    ``build_head_model`` for the keyword arguments."""
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
