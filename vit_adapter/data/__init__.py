"""Data for the ViT-Adapter reproduction: a deterministic scene generator (COCO + ADE20K layouts), loaders for
those official layouts, paper-style transforms and a classification set for pretraining. See docs/data.md."""

from __future__ import annotations

import os
from typing import Any, Literal

from ._io import DataError
from .ade import ADE20KSegmentation, reduce_zero_label
from .coco import CocoDetection, load_coco
from .pretrain import TexturedFashionMNIST
from .sources import FMNIST_CLASSES, load_silhouettes, load_textures
from .synth import SceneConfig, generate_dataset, render_scene, scene_rng, verify_manifest
from .transforms import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    collate_detection,
    collate_segmentation,
    detection_transforms,
    detections_to_original,
    pad_batch,
    seg_logits_to_original,
    segmentation_transforms,
)


def build_dataset(
    kind: Literal["coco", "ade20k"],
    root: str | os.PathLike[str],
    split: Literal["train", "val"],
    transforms: Compose | None = None,
    **kwargs: Any,
) -> CocoDetection | ADE20KSegmentation:
    """``CocoDetection`` or ``ADE20KSegmentation`` over an official layout (or the generator's output root).

    Extra keyword arguments go to the dataset (seed, cache, max_images,
    reduce_zero_label, filter_empty, ...)."""
    if kind == "coco":
        return CocoDetection(root, split, transforms, **kwargs)
    if kind == "ade20k":
        return ADE20KSegmentation(root, split, transforms, **kwargs)
    raise ValueError(f"unknown dataset kind {kind!r}; expected 'coco' or 'ade20k'")


__all__ = [
    "ADE20KSegmentation",
    "CocoDetection",
    "Compose",
    "DataError",
    "FMNIST_CLASSES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SceneConfig",
    "TexturedFashionMNIST",
    "build_dataset",
    "collate_detection",
    "collate_segmentation",
    "detection_transforms",
    "detections_to_original",
    "generate_dataset",
    "load_coco",
    "load_silhouettes",
    "load_textures",
    "pad_batch",
    "reduce_zero_label",
    "render_scene",
    "scene_rng",
    "seg_logits_to_original",
    "segmentation_transforms",
    "verify_manifest",
]
