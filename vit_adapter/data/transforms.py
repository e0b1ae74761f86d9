"""Paper-style data pipelines with boxes, instance masks and label maps kept consistent.

Detection follows the official Mask R-CNN 1x pipeline (reference §2: resize to (1333, 800) keeping the aspect
ratio, random flip, normalise with ImageNet mean/std, pad to a multiple of 32); segmentation follows the UperNet
ADE20K pipeline (resize (2048, 512) with ratio 0.5-2.0, random crop 512 with cat_max_ratio 0.75, flip, photometric
distortion, normalise, pad). Sizes are parameters so the CPU profile can use 64-128 px images.

A sample is a dict: ``image`` (H, W, 3) uint8 numpy until ``Normalize`` turns it into a float32 (3, H, W)
tensor, ``boxes`` (N, 4) float32 xyxy, ``labels`` (N,) int64, ``masks`` (N, H, W) uint8 (detection) or ``seg`` (H, W)
uint8 (segmentation), and ``meta`` (orig_size, img_shape, pad_shape, scale_factor, flip). Every random choice
comes from the ``numpy.random.Generator`` passed in, which the datasets derive from (seed, epoch, index).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255 (mmdet/mmseg img_norm_cfg)
IMAGENET_STD = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255

Sample = dict[str, Any]


class Transform(Protocol):
    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample: ...


def new_meta(h: int, w: int) -> dict[str, Any]:
    return {
        "orig_size": (h, w),
        "img_shape": (h, w),
        "pad_shape": (h, w),
        "scale_factor": (1.0, 1.0),
        "flip": False,
    }


def _image_hw(image: np.ndarray | torch.Tensor) -> tuple[int, int]:
    return (int(image.shape[-2]), int(image.shape[-1])) if isinstance(image, torch.Tensor) else image.shape[:2]


def nearest_resize(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes (pixel-centre sampling); for masks and label maps."""
    sh, sw = arr.shape[-2:]
    rows = np.minimum(((np.arange(h) + 0.5) * sh / h).astype(np.int64), sh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * sw / w).astype(np.int64), sw - 1)
    return arr[..., rows[:, None], cols[None, :]]


def rescale_size(w: int, h: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv's keep-ratio rule: the largest size with long edge <= max(scale) and short edge <= min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * factor + 0.5), int(h * factor + 0.5)


class Compose:
    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Resize:
    """Resize to ``scale`` = (w, h) (mmcv order). keep_ratio: fit within (max(scale), min(scale)) like mmcv.
    ratio_range: multiply the scale by U(lo, hi) first (mmseg's multi-scale training)."""

    def __init__(
        self,
        scale: tuple[int, int],
        keep_ratio: bool = True,
        ratio_range: tuple[float, float] | None = None,
    ) -> None:
        self.scale, self.keep_ratio, self.ratio_range = tuple(scale), keep_ratio, ratio_range

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        img = sample["image"]
        h, w = img.shape[:2]
        scale = self.scale
        if self.ratio_range is not None:
            r = rng.uniform(*self.ratio_range)
            scale = (scale[0] * r, scale[1] * r)
        nw, nh = rescale_size(w, h, scale) if self.keep_ratio else (int(scale[0]), int(scale[1]))
        nw, nh = max(nw, 1), max(nh, 1)
        if (nh, nw) == (h, w):
            return sample
        sample["image"] = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR))
        sx, sy = nw / w, nh / h
        if "masks" in sample:
            sample["masks"] = nearest_resize(sample["masks"], nh, nw)
        if "seg" in sample:
            sample["seg"] = nearest_resize(sample["seg"], nh, nw)
        if "boxes" in sample:
            boxes = sample["boxes"] * np.array([sx, sy, sx, sy], dtype=np.float32)
            sample["boxes"] = _clip_boxes(boxes, nh, nw)
        meta = sample["meta"]
        meta["img_shape"] = meta["pad_shape"] = (nh, nw)
        fx, fy = meta["scale_factor"]
        meta["scale_factor"] = (fx * sx, fy * sy)
        return sample

    def __repr__(self) -> str:
        return f"Resize(scale={self.scale}, keep_ratio={self.keep_ratio}, ratio_range={self.ratio_range})"


def _clip_boxes(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    boxes = boxes.copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    return boxes.astype(np.float32)


class RandomFlip:
    """Horizontal flip with probability ``prob``; boxes become (W - x2, y1, W - x1, y2)."""

    def __init__(self, prob: float = 0.5) -> None:
        self.prob = prob

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.prob:
            return sample
        img = sample["image"]
        w = img.shape[1]
        sample["image"] = np.ascontiguousarray(img[:, ::-1])
        if "masks" in sample:
            sample["masks"] = np.ascontiguousarray(sample["masks"][..., ::-1])
        if "seg" in sample:
            sample["seg"] = np.ascontiguousarray(sample["seg"][:, ::-1])
        if "boxes" in sample:
            b = sample["boxes"]
            sample["boxes"] = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1).astype(np.float32)
        sample["meta"]["flip"] = not sample["meta"]["flip"]
        return sample

    def __repr__(self) -> str:
        return f"RandomFlip(prob={self.prob})"


class RandomCrop:
    """Random crop of at most ``size`` = (h, w).

    Segmentation (mmseg): up to 10 tries to find a crop where no single class covers more than
    ``cat_max_ratio`` of the non-ignored pixels. Detection (mmdet): boxes are shifted and clipped, boxes and
    masks that leave the crop are dropped; up to 10 tries to keep at least one object, else no crop at all
    (mmdet would draw another image instead, which would break the (seed, epoch, index) determinism).
    """

    def __init__(self, size: tuple[int, int], cat_max_ratio: float = 1.0, ignore_index: int = IGNORE_INDEX) -> None:
        self.size, self.cat_max_ratio, self.ignore_index = tuple(size), cat_max_ratio, ignore_index

    def _offset(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        return y0, x0, ch, cw

    def _seg_ok(self, seg: np.ndarray) -> bool:
        if self.cat_max_ratio >= 1.0:
            return True
        _, cnt = np.unique(seg[seg != self.ignore_index], return_counts=True)
        return len(cnt) > 1 and cnt.max() / cnt.sum() < self.cat_max_ratio

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        h, w = sample["image"].shape[:2]
        if h <= self.size[0] and w <= self.size[1]:
            return sample
        y0, x0, ch, cw = self._offset(h, w, rng)
        if "seg" in sample:
            for _ in range(9):
                if self._seg_ok(sample["seg"][y0 : y0 + ch, x0 : x0 + cw]):
                    break
                y0, x0, ch, cw = self._offset(h, w, rng)
        keep = None
        if "boxes" in sample:
            for attempt in range(10):
                keep = _boxes_in_crop(sample["boxes"], y0, x0, ch, cw)
                if keep.any() or len(keep) == 0:
                    break
                if attempt == 9:
                    return sample
                y0, x0, ch, cw = self._offset(h, w, rng)
        sample["image"] = np.ascontiguousarray(sample["image"][y0 : y0 + ch, x0 : x0 + cw])
        if "seg" in sample:
            sample["seg"] = np.ascontiguousarray(sample["seg"][y0 : y0 + ch, x0 : x0 + cw])
        if keep is not None:
            shift = np.array([x0, y0, x0, y0], dtype=np.float32)
            sample["boxes"] = _clip_boxes(sample["boxes"][keep] - shift, ch, cw)
            sample["labels"] = sample["labels"][keep]
            if "masks" in sample:
                sample["masks"] = np.ascontiguousarray(sample["masks"][keep, y0 : y0 + ch, x0 : x0 + cw])
        sample["meta"]["img_shape"] = sample["meta"]["pad_shape"] = (ch, cw)
        return sample

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, cat_max_ratio={self.cat_max_ratio})"


def _boxes_in_crop(boxes: np.ndarray, y0: int, x0: int, ch: int, cw: int) -> np.ndarray:
    clipped = _clip_boxes(boxes - np.array([x0, y0, x0, y0], dtype=np.float32), ch, cw)
    return (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])


class PhotoMetricDistortion:
    """mmseg's PhotoMetricDistortion: each step applied with probability 1/2 in this order: brightness
    (+U(-32, 32)), contrast (xU(0.5, 1.5)) either here or last, saturation (xU(0.5, 1.5) on S), hue
    (+randint(-18, 18) on OpenCV's 0..180 hue scale, i.e. ±36 degrees). HSV via scikit-image."""

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range, self.hue_delta = (
            contrast_range,
            saturation_range,
            hue_delta,
        )

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        from skimage import color

        img = sample["image"].astype(np.float32)
        if rng.integers(2):
            img = np.clip(img + rng.uniform(-self.brightness_delta, self.brightness_delta), 0, 255)
        contrast_first = bool(rng.integers(2))
        if contrast_first and rng.integers(2):
            img = np.clip(img * rng.uniform(*self.contrast_range), 0, 255)
        do_sat, do_hue = bool(rng.integers(2)), bool(rng.integers(2))
        sat = rng.uniform(*self.saturation_range) if do_sat else 1.0
        hue = int(rng.integers(-self.hue_delta, self.hue_delta + 1)) if do_hue else 0
        if do_sat or do_hue:
            hsv = color.rgb2hsv(img / 255.0)
            hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 1)
            hsv[..., 0] = (hsv[..., 0] + hue / 180.0) % 1.0
            img = color.hsv2rgb(hsv).astype(np.float32) * 255.0
        if not contrast_first and rng.integers(2):
            img = np.clip(img * rng.uniform(*self.contrast_range), 0, 255)
        sample["image"] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        return sample

    def __repr__(self) -> str:
        return "PhotoMetricDistortion()"


class Normalize:
    """uint8 (H, W, 3) -> float32 (3, H, W) tensor, (x - mean) / std with ImageNet RGB statistics."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        sample["image"] = to_normalized_tensor(sample["image"], self.mean, self.std)
        return sample

    def __repr__(self) -> str:
        if self.mean.flatten().tolist() == list(IMAGENET_MEAN) and self.std.flatten().tolist() == list(IMAGENET_STD):
            return "Normalize(imagenet)"
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def to_normalized_tensor(image: np.ndarray, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) if mean is None else mean
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) if std is None else std
    t = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)  # copies: the input may be a read-only cache
    return (t - mean) / std


class Pad:
    """Pad bottom/right to ``size`` = (h, w) and/or to a multiple of ``size_divisor`` (reference §5: the adapter
    needs h, w divisible by 32). Image pad 0 (after Normalize, like mmdet/mmseg), masks 0, label map
    ``seg_pad_val``."""

    def __init__(
        self,
        size_divisor: int | None = 32,
        size: tuple[int, int] | None = None,
        seg_pad_val: int = IGNORE_INDEX,
    ) -> None:
        self.size_divisor, self.size, self.seg_pad_val = size_divisor, size, seg_pad_val

    def target_hw(self, h: int, w: int) -> tuple[int, int]:
        if self.size is not None:
            h, w = max(h, self.size[0]), max(w, self.size[1])
        if self.size_divisor:
            d = self.size_divisor
            h, w = -(-h // d) * d, -(-w // d) * d
        return h, w

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        img = sample["image"]
        h, w = _image_hw(img)
        th, tw = self.target_hw(h, w)
        if (th, tw) == (h, w):
            return sample
        if isinstance(img, torch.Tensor):
            sample["image"] = F.pad(img, (0, tw - w, 0, th - h), value=0.0)
        else:
            sample["image"] = np.pad(img, ((0, th - h), (0, tw - w), (0, 0)))
        if "masks" in sample:
            sample["masks"] = np.pad(sample["masks"], ((0, 0), (0, th - h), (0, tw - w)))
        if "seg" in sample:
            sample["seg"] = np.pad(sample["seg"], ((0, th - h), (0, tw - w)), constant_values=self.seg_pad_val)
        sample["meta"]["pad_shape"] = (th, tw)
        return sample

    def __repr__(self) -> str:
        return f"Pad(size_divisor={self.size_divisor}, size={self.size})"


def detection_transforms(
    train: bool,
    *,
    scale: tuple[int, int] | None = (1333, 800),
    ratio_range: tuple[float, float] | None = None,
    crop_size: tuple[int, int] | None = None,
    flip_prob: float = 0.5,
    size_divisor: int = 32,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """Mask R-CNN 1x pipeline (reference §2). ``ratio_range``/``crop_size`` add scale jitter and cropping for
    small-data CPU runs (the paper's 3x AutoAugment pipeline is not reproduced). ``scale=None``: no resize."""
    ts: list[Transform] = []
    if scale is not None:
        ts.append(Resize(scale, keep_ratio=True, ratio_range=ratio_range if train else None))
    if train:
        if crop_size is not None:
            ts.append(RandomCrop(crop_size))
        ts.append(RandomFlip(flip_prob))
    ts += [Normalize(mean, std), Pad(size_divisor)]
    return Compose(ts)


def segmentation_transforms(
    train: bool,
    *,
    scale: tuple[int, int] | None = (2048, 512),
    ratio_range: tuple[float, float] | None = (0.5, 2.0),
    crop_size: tuple[int, int] | None = (512, 512),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: bool = True,
    size_divisor: int = 32,
    ignore_index: int = IGNORE_INDEX,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """UperNet ADE20K pipeline (reference §2; mmseg ade20k.py): train = Resize(ratio 0.5-2) -> RandomCrop(512,
    cat_max_ratio 0.75) -> Flip -> PhotoMetricDistortion -> Normalize -> Pad(crop size, label 255);
    test = Resize(keep ratio) -> Normalize -> Pad to a multiple of 32 (label 255, so padding is ignored).
    ``scale=None``: no resize; ``crop_size=None``: no crop."""
    resize: list[Transform] = [] if scale is None else [Resize(scale, keep_ratio=True, ratio_range=ratio_range)]
    if not train:
        resize = [] if scale is None else [Resize(scale, keep_ratio=True)]
        return Compose([*resize, Normalize(mean, std), Pad(size_divisor, seg_pad_val=ignore_index)])
    ts: list[Transform] = list(resize)
    if crop_size is not None:
        ts.append(RandomCrop(crop_size, cat_max_ratio=cat_max_ratio, ignore_index=ignore_index))
    ts.append(RandomFlip(flip_prob))
    if photometric:
        ts.append(PhotoMetricDistortion())
    ts += [Normalize(mean, std), Pad(size_divisor, size=crop_size, seg_pad_val=ignore_index)]
    return Compose(ts)


# ------------------------------------------------------------------------------------------------- collate
def collate_detection(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]):
    """Variable-sized detection batch -> (list of images, list of targets), torchvision's Mask R-CNN input."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def pad_batch(images: Sequence[torch.Tensor], size_divisor: int = 32, value: float = 0.0) -> torch.Tensor:
    """Stack (3, H_i, W_i) images into (B, 3, H, W), padded bottom/right to a multiple of ``size_divisor``."""
    h = max(int(i.shape[-2]) for i in images)
    w = max(int(i.shape[-1]) for i in images)
    h, w = -(-h // size_divisor) * size_divisor, -(-w // size_divisor) * size_divisor
    out = images[0].new_full((len(images), images[0].shape[0], h, w), value)
    for k, im in enumerate(images):
        out[k, :, : im.shape[-2], : im.shape[-1]] = im
    return out


def collate_segmentation(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
    size_divisor: int = 32,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) images padded with 0 and (B, H, W) targets padded with ``ignore_index``."""
    images, targets = zip(*batch)
    x = pad_batch(images, size_divisor, 0.0)
    y = torch.full((len(targets), x.shape[-2], x.shape[-1]), ignore_index, dtype=torch.long)
    for k, t in enumerate(targets):
        y[k, : t.shape[-2], : t.shape[-1]] = t
    return x, y


# ---------------------------------------------------------------------------------------- back to originals
def detections_to_original(output: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Map one image's predictions (torchvision format, in padded network-input coordinates) back to the
    original image: undo the flip, crop the padding, divide boxes by the scale factor and resize masks."""
    out = dict(output)
    ih, iw = meta["img_shape"]
    oh, ow = meta["orig_size"]
    sx, sy = meta["scale_factor"]
    boxes = output["boxes"].clone()
    if meta.get("flip"):
        boxes = torch.stack([iw - boxes[:, 2], boxes[:, 1], iw - boxes[:, 0], boxes[:, 3]], dim=1)
    boxes = boxes / boxes.new_tensor([sx, sy, sx, sy])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, ow)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, oh)
    out["boxes"] = boxes
    if "masks" in output:
        m = output["masks"]
        squeeze = m.dim() == 3
        m = (m[:, None] if squeeze else m)[..., :ih, :iw].to(torch.float32)
        if meta.get("flip"):
            m = m.flip(-1)
        if m.shape[0] and (ih, iw) != (oh, ow):
            m = F.interpolate(m, size=(oh, ow), mode="bilinear", align_corners=False)
        out["masks"] = m[:, 0] if squeeze else m
    return out


def seg_logits_to_original(logits: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """(C, H_pad, W_pad) logits -> (C, H_orig, W_orig): crop the padding, undo the flip, bilinear resize."""
    ih, iw = meta["img_shape"]
    x = logits[..., :ih, :iw]
    if meta.get("flip"):
        x = x.flip(-1)
    if (ih, iw) != tuple(meta["orig_size"]):
        x = F.interpolate(x[None], size=tuple(meta["orig_size"]), mode="bilinear", align_corners=False)[0]
    return x


def paste_masks_at_original(
    masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], threshold: float | None = 0.5
) -> torch.Tensor:
    """mmdet's way of pasting RoI masks: each (M, M) mask probability map is sampled bilinearly (grid_sample) at
    the pixel centres of its box, given in *original-image* float coordinates, over an image of ``size`` = (h, w);
    outside the box the mask is 0. (N, M, M) + (N, 4) -> (N, h, w), thresholded when ``threshold`` is set.

    The evaluation path pastes at network scale with integer-rounded boxes (torchvision) and resizes the pasted
    map to the original size; bench/data_path.py measures the difference and the host cost of both."""
    h, w = size
    n = masks.shape[0]
    if n == 0:
        return masks.new_zeros((0, h, w), dtype=torch.bool if threshold is not None else masks.dtype)
    x0, y0, x1, y1 = (boxes[:, k, None].to(torch.float32) for k in range(4))
    xs = torch.arange(w, dtype=torch.float32, device=masks.device)[None] + 0.5
    ys = torch.arange(h, dtype=torch.float32, device=masks.device)[None] + 0.5
    gx = (xs - x0) / (x1 - x0).clamp_min(1e-6) * 2 - 1  # (N, w) in grid_sample's [-1, 1] over the box
    gy = (ys - y0) / (y1 - y0).clamp_min(1e-6) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)], dim=-1)
    out = F.grid_sample(masks[:, None].to(torch.float32), grid, mode="bilinear", align_corners=False)[:, 0]
    return out >= threshold if threshold is not None else out
