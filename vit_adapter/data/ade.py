"""ADE20K (``ADEChallengeData2016/{images,annotations}/{training,validation}``) semantic segmentation.

Label PNGs hold 0 for "other/unlabelled" and 1..150 for the classes. ``reduce_zero_label=True`` (the official
ADE20K setting, mmseg) maps 0 -> 255 (ignored) and v -> v - 1. The generated data use 0 for background and we
keep it as a real class (``reduce_zero_label=False``, 11 classes): see docs/data.md for why.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import torch

from ._io import DataError, check_image, load_json, read_image, require_dir
from .base import EpochDataset, EpochOptions
from .synth import ADE_DIRS, ADE_ROOT, GENERATOR
from .transforms import IGNORE_INDEX, Compose, Sample, new_meta

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def reduce_zero_label(seg: np.ndarray) -> np.ndarray:
    """mmseg's rule: 0 -> 255 (ignore), v -> v - 1, and 255 stays 255."""
    out = seg.astype(np.int64) - 1
    out[seg == 0] = IGNORE_INDEX
    out[seg == IGNORE_INDEX] = IGNORE_INDEX
    return out.astype(np.uint8)


def _find_base(root: Path) -> Path:
    require_dir(root, "ADE20K root")
    if (root / ADE_ROOT).is_dir():
        return root / ADE_ROOT
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        return root
    raise DataError(f"ADE20K layout not found under {root}: expected {ADE_ROOT}/images and {ADE_ROOT}/annotations")


def _generator_manifest(base: Path) -> dict[str, Any] | None:
    for cand in (base.parent / "manifest.json", base / "manifest.json"):
        if cand.is_file():
            man = load_json(cand)
            if isinstance(man, dict) and man.get("generator") == GENERATOR:
                return man
    return None


def _official_classes(base: Path) -> list[str] | None:
    """Class names from the release's objectInfo150.txt (Idx, Ratio, Train, Val, Name columns), if present."""
    info = base / "objectInfo150.txt"
    if not info.is_file():
        return None
    lines = info.read_text(encoding="utf-8").splitlines()[1:]
    names = [ln.split("\t")[-1].split(";")[0].strip() for ln in lines if ln.strip()]
    return names or None


class ADE20KSegmentation(EpochDataset):
    """(image, target): image float32 (3, H, W) normalised, target int64 (H, W) with 255 = ignore.

    ``reduce_zero_label=None`` picks the right convention: False for data written by our generator (background
    is class 0), True otherwise (official ADE20K, 150 classes). ``return_meta`` adds the transform meta as a
    third element (for ``transforms.seg_logits_to_original``); ``original_target(i)`` gives the label map
    at the original resolution for evaluation there. ``foreground_only`` merges every object class into class 1
    (background 0 stays): object-vs-background segmentation.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transforms: Compose | None = None,
        *,
        reduce_zero_label: bool | None = None,
        num_classes: int | None = None,
        return_meta: bool = False,
        foreground_only: bool = False,
        **options: Unpack[EpochOptions],
    ) -> None:
        super().__init__(transforms, **options)
        if split not in ADE_DIRS:
            raise DataError(f"unknown split {split!r}; expected 'train' or 'val'")
        self.base = _find_base(Path(root))
        self.img_dir = require_dir(self.base / "images" / ADE_DIRS[split], "ADE20K image")
        self.ann_dir = require_dir(self.base / "annotations" / ADE_DIRS[split], "ADE20K annotation")
        self.split, self.return_meta = split, return_meta
        manifest = _generator_manifest(self.base)
        self.generated = manifest is not None
        self.reduce_zero_label = (not self.generated) if reduce_zero_label is None else bool(reduce_zero_label)
        if manifest is not None:
            names = list(manifest["semantic"]["classes"])  # pixel value v -> names[v]
        else:
            names = _official_classes(self.base) or [f"class_{i}" for i in range(150)]
            names = ["other", *names]
        self.classes = names[1:] if self.reduce_zero_label else names
        self.stored_classes = len(self.classes)  # valid label values before any foreground merge
        self.foreground_only = bool(foreground_only)
        if self.foreground_only:
            if self.reduce_zero_label:  # label 0 is "ignore" there, so no background class would remain
                raise DataError(f"{self.base}: foreground_only needs a background class 0 (reduce_zero_label=False)")
            self.classes = [self.classes[0], "foreground"]
        if num_classes is not None:
            self.classes = self.classes[:num_classes] + [f"class_{i}" for i in range(len(self.classes), num_classes)]
        self.num_classes = len(self.classes)
        self.ignore_index = IGNORE_INDEX
        images = sorted(p for p in self.img_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"no images (*.jpg, *.png) in {self.img_dir}")
        pairs = []
        for img in images:
            ann = self.ann_dir / f"{img.stem}.png"
            if not ann.is_file():
                raise DataError(f"image {img} has no annotation {ann}")
            pairs.append((img, ann))
        self.pairs = self.first_images(pairs)
        if self.scan_on_init:
            self.scan()

    def scan(self) -> None:
        """Check every pair before any training starts, naming the first bad file: the image header parses (a
        PNG also passes its CRC read-through, so a truncated one is caught), the annotation decodes, is
        single-channel, has the image's size and holds only valid label values (in both label modes).
        Cost: one mask decode plus a header/CRC read per image, ~0.4 ms per 128-px pair and ~3 ms per 512-px
        PNG pair on one core (docs/faults.md)."""
        for index, (img_path, ann_path) in enumerate(self.pairs):
            h, w = check_image(img_path)
            seg = self.load_label(index)
            if seg.shape != (h, w):
                raise DataError(
                    f"annotation {ann_path} is {seg.shape[0]}x{seg.shape[1]} but image {img_path} is {h}x{w}"
                )

    def __len__(self) -> int:
        return len(self.pairs)

    def load_label(self, index: int) -> np.ndarray:
        """The label map of ``index`` (uint8, original size, zero label reduced if configured), checked."""
        img_path, ann_path = self.pairs[index]
        seg = read_image(ann_path, mode="L")
        if seg.ndim != 2:
            raise DataError(f"annotation {ann_path} must be a single-channel PNG, got shape {seg.shape}")
        if self.reduce_zero_label:
            seg = reduce_zero_label(seg)
        if self.foreground_only:  # every object class -> 1; background 0 and ignore 255 stay
            # A value outside the stored classes is a broken file, not an object: check before merging.
            bad = (seg >= self.stored_classes) & (seg != IGNORE_INDEX)
            if bad.any():
                raise DataError(
                    f"annotation {ann_path} holds label {int(seg[bad].max())}, not one of the "
                    f"{self.stored_classes} stored classes (label_mode foreground)"
                )
            seg = np.where((seg != 0) & (seg != IGNORE_INDEX), 1, seg).astype(np.uint8)
        bad = (seg >= self.num_classes) & (seg != IGNORE_INDEX)
        if bad.any():
            raise DataError(
                f"annotation {ann_path} holds label {int(seg[bad].max())} >= num_classes={self.num_classes} "
                f"(reduce_zero_label={self.reduce_zero_label})"
            )
        return seg

    def load_raw(self, index: int) -> Sample:
        img_path, ann_path = self.pairs[index]
        image = read_image(img_path)
        seg = self.load_label(index)
        if seg.shape != image.shape[:2]:
            raise DataError(
                f"annotation {ann_path} is {seg.shape[0]}x{seg.shape[1]} but image {img_path} is "
                f"{image.shape[0]}x{image.shape[1]}"
            )
        return {"image": image, "seg": seg, "meta": new_meta(*image.shape[:2])}

    def original_target(self, index: int) -> torch.Tensor:
        return torch.tensor(self.load_label(index), dtype=torch.long)

    def __getitem__(self, index: int):
        sample = self.transformed(index)
        target = torch.tensor(sample["seg"], dtype=torch.long)
        if self.return_meta:
            return sample["image"], target, sample["meta"]
        return sample["image"], target
