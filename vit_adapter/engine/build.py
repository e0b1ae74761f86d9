"""From a resolved ``Config`` to a model (backbone + head, pretrained ViT loaded) and datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..data import (
    DataError,
    build_dataset,
    collate_detection,
    collate_segmentation,
    detection_transforms,
    segmentation_transforms,
)
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..models.adapter import ViTAdapter
from ..models.factory import create_model
from ..models.heads import build_head_model
from ..models.vit import LoadReport, load_vit_state_dict
from .config import Config, model_overrides
from .weights import fetch_weights, load_weights, verify_file_sha256, weights_path_for

DEFAULT_ROOTS = {"generated": "data/generated", "coco": "data/coco", "ade20k": "data/ade20k"}


def build_backbone(cfg: Config) -> ViTAdapter:
    return create_model(cfg.model.preset, task=cfg.model.task, **model_overrides(cfg))


def head_kwargs(cfg: Config) -> dict[str, Any]:
    h = cfg.head
    if cfg.model.task == "det":
        kw: dict[str, Any] = dict(
            num_classes=h.num_classes,
            fpn_channels=h.fpn_channels,
            representation_size=h.representation_size,
            mask_channels=h.mask_channels,
            mask_convs=h.mask_convs,
            rpn_batch_size_per_image=h.rpn_batch_size_per_image,
            rpn_positive_fraction=h.rpn_positive_fraction,
            rpn_pre_nms_top_n_train=h.rpn_pre_nms_top_n_train,
            rpn_post_nms_top_n_train=h.rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=h.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=h.rpn_post_nms_top_n_test,
            box_batch_size_per_image=h.box_batch_size_per_image,
            box_positive_fraction=h.box_positive_fraction,
            box_score_thresh=h.box_score_thresh,
            box_nms_thresh=h.box_nms_thresh,
            box_detections_per_img=h.detections_per_img,
            box_loss=h.box_loss,
            roi_align_aligned=h.roi_align_aligned,
        )
        if h.anchor_sizes is not None:
            kw["anchor_sizes"] = tuple(h.anchor_sizes)
        return kw
    kw = dict(num_classes=h.num_classes, channels=h.channels, aux=h.aux_weight > 0, aux_in_index=h.aux_in_index)
    if h.aux_weight > 0:
        kw["aux_weight"] = h.aux_weight
    if h.class_weight is not None:
        kw["class_weight"] = list(h.class_weight)
    if h.type == "semfpn":
        kw["fpn_channels"] = h.fpn_channels
    return kw


def build_model(cfg: Config) -> nn.Module:
    """Backbone + task head, randomly initialised (call ``load_pretrained`` for the ViT weights)."""
    return build_head_model(cfg.model.task, cfg.head.type, build_backbone(cfg), **head_kwargs(cfg))


def backbone_of(model: nn.Module) -> ViTAdapter:
    return model.backbone_module


def resolve_weights(cfg: Config) -> Path | None:
    """The local .safetensors of ``cfg.weights.source`` (fetched/verified into the cache when needed)."""
    if cfg.weights.init != "pretrained":
        return None
    if not cfg.weights.source:
        raise ValueError("weights.init is 'pretrained' but weights.source is not set")
    src = cfg.weights.source
    local = _abs(src)
    if local.suffix == ".safetensors" and local.is_file() and Path(str(local) + ".json").is_file():
        # Already in our format (e.g. written by `vit-adapter pretrain`); a configured digest is still checked.
        return verify_file_sha256(local, cfg.weights.sha256, "weights.sha256")
    out = weights_path_for(src, _abs(cfg.weights.cache_dir))
    return fetch_weights(src, out, cfg.weights.sha256)


def load_pretrained(model: nn.Module, cfg: Config) -> LoadReport | None:
    path = resolve_weights(cfg)
    if path is None:
        return None
    return load_vit_state_dict(backbone_of(model).vit, load_weights(path))


def _abs(p: str | Path) -> Path:
    """The one rule for relative paths (data.root, weights.source, weights.cache_dir): against the current
    working directory, as a shell would; the pipeline runs at the repository root (docs/faults.md)."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else Path.cwd() / p


def data_root(cfg: Config) -> Path:
    root = _abs(cfg.data.root or DEFAULT_ROOTS[cfg.data.dataset])
    if not root.is_dir():
        hint = " (run `vit-adapter data` first)" if cfg.data.dataset == "generated" else ""
        raise DataError(f"dataset directory not found: {root}{hint}")
    return root


def build_datasets(cfg: Config, seed: int, *, train_split: bool = True) -> tuple[Any, Any, Any]:
    """(train set, val set, collate function) for the configured task, through the official-layout loaders.
    ``train_split=False`` (evaluation): the train split is not opened or scanned, and None is returned for it."""
    d = cfg.data
    root = data_root(cfg)
    size = (d.image_size, d.image_size)
    norm = {"mean": tuple(d.norm_mean or IMAGENET_MEAN), "std": tuple(d.norm_std or IMAGENET_STD)}
    if cfg.model.task == "det":
        scale = tuple(d.img_scale) if d.img_scale else size[::-1]
        crop = size if d.crop else None
        rr = tuple(d.ratio_range) if d.ratio_range else None
        ttrain = detection_transforms(
            True,
            scale=scale,
            ratio_range=rr,
            crop_size=crop,
            flip_prob=0.5 if d.flip else 0.0,
            size_divisor=d.size_divisor,
            **norm,
        )
        tval = detection_transforms(False, scale=scale, size_divisor=d.size_divisor, **norm)
        kw = dict(seed=seed, cache=d.cache_in_memory)
        train = build_dataset("coco", root, "train", ttrain, max_images=d.n_train, **kw) if train_split else None
        val = build_dataset("coco", root, "val", tval, max_images=d.n_val, filter_empty=False, **kw)
        _check_sizes(cfg, train, val)
        _check_classes(root, (train or val).num_classes, cfg)
        return train, val, collate_detection
    scale = tuple(d.img_scale) if d.img_scale else (d.image_size * 4, d.image_size)
    rr = tuple(d.ratio_range) if d.ratio_range else None
    ttrain = segmentation_transforms(
        True,
        scale=scale,
        ratio_range=rr,
        crop_size=size if d.crop else None,
        cat_max_ratio=d.cat_max_ratio if d.cat_max_ratio is not None else 1.0,
        flip_prob=0.5 if d.flip else 0.0,
        photometric=d.photometric,
        size_divisor=d.size_divisor,
        **norm,
    )
    tval = segmentation_transforms(False, scale=scale, size_divisor=d.size_divisor, **norm)
    kw = dict(
        seed=seed,
        cache=d.cache_in_memory,
        reduce_zero_label=d.reduce_zero_label,
        foreground_only=d.label_mode == "foreground",
    )
    train = build_dataset("ade20k", root, "train", ttrain, max_images=d.n_train, **kw) if train_split else None
    val = build_dataset("ade20k", root, "val", tval, max_images=d.n_val, return_meta=True, **kw)
    _check_sizes(cfg, train, val)
    _check_classes(root, (train or val).num_classes, cfg)
    return train, val, collate_segmentation


def _check_sizes(cfg: Config, train: Any, val: Any) -> None:
    # More images than a split holds used to train on fewer while config.yaml recorded the number asked for.
    for key, ds in (("data.n_train", train), ("data.n_val", val)):
        if ds is None:  # a split that was not opened
            continue
        wanted = getattr(cfg.data, key.split(".")[1])
        if wanted is not None and wanted > ds.available:
            raise DataError(
                f"{key} = {wanted} but the {ds.split} split of {data_root(cfg)} has only {ds.available} usable "
                f"images; lower {key} (null = all) or generate a larger set"
            )


def _check_classes(root: Path, found: int, cfg: Config) -> None:
    # A head sized for another label set trains silently (COCO: 80 categories, ADE20K: 150), so say so up front.
    if found != cfg.head.num_classes:
        raise DataError(f"{root} has {found} classes but head.num_classes is {cfg.head.num_classes}")
