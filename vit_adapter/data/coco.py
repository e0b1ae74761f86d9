"""COCO 2017 instance segmentation in the official layout (``annotations/instances_{split}2017.json`` and
``{split}2017/`` images), giving torchvision Mask R-CNN targets. Parsing follows mmdet 2.x ``CocoDataset``:
category ids map to contiguous labels 1..K in sorted id order, crowd boxes are left out of the targets (they
remain in the ground truth used for evaluation), degenerate boxes are skipped and, for training, images
without objects or smaller than 32 px are dropped."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ._io import DataError, check_image, load_json, read_image, require_dir, require_file
from .base import EpochDataset, EpochOptions
from .transforms import Compose, Sample, new_meta

_REQUIRED = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def load_coco(ann_file: Path) -> COCO:
    """Parse and check a COCO annotation file (keys, ids, mask sizes) ; index it quietly with pycocotools."""
    data = load_json(ann_file)
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: expected a JSON object at the top level")
    for key, fields in _REQUIRED.items():
        entries = data.get(key)
        if not isinstance(entries, list):
            raise DataError(f"{ann_file}: missing or non-list key {key!r}")
        for k, entry in enumerate(entries):
            missing = [f for f in fields if f not in entry]
            if missing:
                raise DataError(f"{ann_file}: {key}[{k}] lacks key(s) {missing}")
    images = {img["id"]: img for img in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    if len(cat_ids) != len(data["categories"]):
        raise DataError(f"{ann_file}: duplicate category ids")
    for ann in data["annotations"]:
        img = images.get(ann["image_id"])
        if img is None:
            raise DataError(f"{ann_file}: annotation {ann['id']} refers to unknown image_id {ann['image_id']}")
        if ann["category_id"] not in cat_ids:
            raise DataError(f"{ann_file}: annotation {ann['id']} has unknown category_id {ann['category_id']}")
        seg = ann.get("segmentation")
        if isinstance(seg, dict) and list(seg.get("size", [])) != [img["height"], img["width"]]:
            raise DataError(
                f"{ann_file}: annotation {ann['id']} has a mask of size {seg.get('size')} but image "
                f"{img['file_name']} is {img['height']}x{img['width']}"
            )
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress messages
        coco.createIndex()
    return coco


def ann_to_mask(ann: dict[str, Any], h: int, w: int) -> np.ndarray:
    """Decode polygons, uncompressed RLE or compressed RLE to an (h, w) uint8 mask."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if seg else None
        if rle is None:
            return np.zeros((h, w), dtype=np.uint8)
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


class CocoDetection(EpochDataset):
    """(image, target) with image float32 (3, H, W) and target = {boxes (N, 4) float32 xyxy, labels (N,) int64
    in 1..K, masks (N, H, W) uint8, image_id int, meta dict}. ``meta`` (orig_size, img_shape, scale_factor,
    flip, pad_shape) lets ``transforms.detections_to_original`` put predictions back in image coordinates."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transforms: Compose | None = None,
        *,
        filter_empty: bool | None = None,
        min_size: int = 32,
        **options: Unpack[EpochOptions],
    ) -> None:
        super().__init__(transforms, **options)
        if split not in ("train", "val"):
            raise DataError(f"unknown split {split!r}; expected 'train' or 'val'")
        self.root = require_dir(Path(root), "COCO root")
        self.ann_file = require_file(self.root / "annotations" / f"instances_{split}2017.json", "COCO annotation")
        self.img_dir = require_dir(self.root / f"{split}2017", "COCO image")
        self.split = split
        self.coco = load_coco(self.ann_file)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.classes = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.num_classes = len(self.cat_ids)  # excluding torchvision's background class 0
        ids = sorted(self.coco.imgs)
        if filter_empty if filter_empty is not None else split == "train":
            ids = [i for i in ids if self._usable(i, min_size)]
        self.ids = self.first_images(ids)  # of the usable ones
        for image_id in self.ids:  # fail now, naming the file, rather than mid-epoch
            path = self.img_dir / self.coco.imgs[image_id]["file_name"]
            if not path.is_file():
                raise DataError(f"{self.ann_file} refers to missing image {path}")
        if self.scan_on_init:
            self.scan()

    def scan(self) -> None:
        """Check every image header (and a PNG's CRC read-through) against its annotated size before training
        starts; masks, labels and ids were checked by load_coco. ~0.03 ms per 128-px PNG (docs/faults.md)."""
        for image_id in self.ids:
            info = self.coco.imgs[image_id]
            path = self.img_dir / info["file_name"]
            h, w = check_image(path)
            if (h, w) != (int(info["height"]), int(info["width"])):
                raise DataError(f"image {path} is {h}x{w} but {self.ann_file} says {info['height']}x{info['width']}")

    def _usable(self, image_id: int, min_size: int) -> bool:
        img = self.coco.imgs[image_id]
        if min(img["width"], img["height"]) < min_size:
            return False
        return any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(image_id, []))

    def __len__(self) -> int:
        return len(self.ids)

    def load_raw(self, index: int) -> Sample:
        """Decoded image and targets before any transform (numpy; masks at full resolution)."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        path = self.img_dir / info["file_name"]
        image = read_image(path)
        if image.shape[:2] != (h, w):
            raise DataError(f"image {path} is {image.shape[0]}x{image.shape[1]} but {self.ann_file} says {h}x{w}")
        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("ignore", False) or ann.get("iscrowd", 0):
                continue
            x, y, bw, bh = ann["bbox"]
            inter_w = max(0.0, min(x + bw, w) - max(x, 0.0))
            inter_h = max(0.0, min(y + bh, h) - max(y, 0.0))
            if inter_w * inter_h == 0 or ann.get("area", 1) <= 0 or bw < 1 or bh < 1:
                continue
            boxes.append([x, y, x + bw, y + bh])
            labels.append(self.cat_to_label[ann["category_id"]])
            masks.append(ann_to_mask(ann, h, w) if "segmentation" in ann else _box_mask(x, y, bw, bh, h, w))
        return {
            "image": image,
            "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, dtype=np.int64),
            "masks": np.stack(masks) if masks else np.zeros((0, h, w), dtype=np.uint8),
            "meta": new_meta(h, w),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        sample = self.transformed(index)
        target = {
            # torch.tensor copies: cached arrays are read-only and must not be shared with the training loop.
            "boxes": torch.tensor(sample["boxes"], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(sample["labels"], dtype=torch.int64),
            "masks": torch.tensor(sample["masks"], dtype=torch.uint8),
            "image_id": int(self.ids[index]),
            "meta": sample["meta"],
        }
        return sample["image"], target


def _box_mask(x: float, y: float, bw: float, bh: float, h: int, w: int) -> np.ndarray:
    """A box-shaped mask for annotations without a segmentation (never produced by our generator)."""
    m = np.zeros((h, w), dtype=np.uint8)
    m[int(max(y, 0)) : int(min(y + bh, h)), int(max(x, 0)) : int(min(x + bw, w))] = 1
    return m
