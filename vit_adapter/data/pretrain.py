"""Classification set for pretraining: one Fashion-MNIST item per image on a real texture (ImageNet stand-in).

Items are large (65-90 % of the side), bright, and sit on a dimmed real texture, so a small ViT learns the 10
classes from scratch on a CPU (docs/data.md gives the measured accuracy). Images are rendered on the fly from
(seed, split, index); the 'train' split uses the 60k Fashion-MNIST training items, 'val' the 10k test items,
so no item is shared between the splits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from . import render
from ._io import DataError, load_npz_cache, save_npz_cache
from .sources import load_silhouettes, load_textures
from .transforms import IMAGENET_MEAN, IMAGENET_STD

_STREAM = 0x7072  # separates these images' random streams from the scene generator's
# Bumped whenever render_item_image changes its pixels: npz caches from another version are refused.
# 2: bright item on a dimmed background; 3: background 15-35 %, upright items, shift ≤ 1/8 of the margin.
RENDER_VERSION = 3
_SPLITS = {"train": 0, "val": 1}
PLACEMENTS = ("centre", "anywhere")

Augment = Callable[[torch.Tensor], torch.Tensor]


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit torch seed derived from (seed, epoch, index) through numpy's SeedSequence (well mixed)."""
    state = np.random.SeedSequence([int(seed), _STREAM, int(epoch), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def render_item_image(
    rng: np.random.Generator,
    sil: np.ndarray,
    size: int,
    textures: tuple[Any, ...],
    item_scale: tuple[float, float] = (0.65, 0.9),
    background_gain: tuple[float, float] = (0.15, 0.35),
    placement: str = "centre",
) -> np.ndarray:
    """One (size, size, 3) uint8 image: a dimmed textured background and one bright item of random hue.

    ``placement="centre"`` puts the item near the centre, as Fashion-MNIST does; ``"anywhere"`` draws its
    position uniformly, so that with small ``item_scale`` the images look like the downstream scenes' objects
    (an item somewhere in a larger field of texture), seen at the downstream resolution.

    The polarity is fixed (item brighter than its surroundings) on purpose: with random polarity and full
    texture contrast, a small CNN stayed at ~25% and a ViT at chance after minutes of CPU training; the
    pretraining set must be learnable within the CPU budget (docs/data.md §4)."""
    canvas = render.background(rng, textures, size, size, second_texture_prob=0.2, clutter=0)
    canvas *= rng.uniform(*background_gain)
    side = rng.uniform(*item_scale) * size
    a = np.sqrt(rng.uniform(0.85, 1.15))
    alpha, shade = render.silhouette_maps(sil, max(2, round(side * a)), max(2, round(side / a)), 0.0)  # upright
    h, w = alpha.shape
    if placement == "anywhere":
        top, left = int(rng.integers(0, max(size - h, 0) + 1)), int(rng.integers(0, max(size - w, 0) + 1))
    else:  # centred (as in Fashion-MNIST), shifted by at most an eighth of the free margin
        top = (size - h) // 2 + int(rng.integers(-(abs(size - h) // 8), abs(size - h) // 8 + 1))
        left = (size - w) // 2 + int(rng.integers(-(abs(size - w) // 8), abs(size - w) // 8 + 1))
    win = render.window((size, size), top, left, h, w)
    if win is None:  # cannot happen for scales <= 1, kept for safety
        return render.finish(canvas, rng, 2.0)
    ys, xs, ly, lx = win
    colour = render.random_colour(rng, sat=(0.0, 0.7), val=(0.8, 1.0))
    fill = colour * (0.55 + 0.45 * shade[ly, lx])[:, :, None]  # the item's own shading keeps its inner detail
    render.composite(canvas, fill, alpha[ly, lx], ys, xs)
    return render.finish(canvas, rng, 2.0)


class TexturedFashionMNIST(Dataset):
    """(image, label) pairs: image float32 (3, S, S) normalised with ImageNet mean/std, label int in 0..9.

    Deterministic: the base image depends on (seed, split, index); the augmentation hook (a callable on the
    float (3, S, S) tensor in [0, 1], e.g. torchvision v2 transforms) runs under a torch RNG seeded from
    (seed, epoch, index), so ``set_epoch`` changes the augmentation and a resumed run sees identical batches.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        image_size: int = 64,
        n: int | None = None,
        seed: int = 0,
        item_scale: tuple[float, float] = (0.65, 0.9),
        placement: str = "centre",
        augment: Augment | None = None,
        normalize: bool = True,
        cache: bool = False,
        fmnist_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if split not in _SPLITS:
            raise DataError(f"unknown split {split!r}; expected 'train' or 'val'")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        self.split, self.image_size, self.seed = split, int(image_size), int(seed)
        self.item_scale = (float(item_scale[0]), float(item_scale[1]))
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        self.placement = placement
        self.augment, self.normalize = augment, normalize
        self._sil = load_silhouettes(split, fmnist_dir)
        total = len(self._sil.labels)
        self.n = total if n is None else int(n)
        if not 0 < self.n <= total:
            raise ValueError(f"n must be in 1..{total} for split {split!r}, got {n}")
        self.classes = self._sil.classes
        self.num_classes = len(self.classes)
        self.labels = np.asarray(self._sil.labels[: self.n])
        self.epoch = 0
        self._images: np.ndarray | None = None  # filled by from_npz or the cache
        self._have: np.ndarray | None = None
        if cache:
            self._images = np.empty((self.n, self.image_size, self.image_size, 3), np.uint8)
            self._have = np.zeros(self.n, dtype=bool)

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def render(self, index: int) -> np.ndarray:
        """The un-augmented uint8 (S, S, 3) image of ``index``."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        if self._images is not None and (self._have is None or self._have[index]):
            return self._images[index]
        rng = np.random.default_rng([self.seed, _STREAM, _SPLITS[self.split], index])
        img = render_item_image(
            rng, self._sil.images[index], self.image_size, load_textures(), self.item_scale, placement=self.placement
        )
        if self._have is not None and self._images is not None:
            self._images[index] = img
            self._have[index] = True
        return img

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.ascontiguousarray(self.render(index))).permute(2, 0, 1).float().div_(255.0)
        if self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(augment_seed(self.seed, self.epoch, index))
                img = self.augment(img)
        if self.normalize:
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / 255.0
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1) / 255.0
            img = (img - mean) / std
        return img, int(self.labels[index])

    @property
    def source(self) -> str:
        """'fashion-mnist' or 'procedural' (the fallback)."""
        return self._sil.source

    def images(self) -> np.ndarray:
        """All un-augmented images as one uint8 (n, S, S, 3) array (rendered now unless loaded or cached)."""
        if self._images is not None and self._have is None:
            return self._images
        return np.stack([self.render(i) for i in range(self.n)])

    def params(self) -> dict[str, Any]:
        return {
            "render_version": RENDER_VERSION,
            "split": self.split,
            "image_size": self.image_size,
            "n": self.n,
            "seed": self.seed,
            "item_scale": list(self.item_scale),
            "placement": self.placement,
            "silhouettes": self._sil.source,
        }

    def save_npz(self, path: str | os.PathLike[str]) -> Path:
        """Render every image once and store them (uint8) with labels and parameters, atomically."""
        return save_npz_cache(path, self.params(), images=self.images(), labels=self.labels)

    @classmethod
    def from_npz(
        cls,
        path: str | os.PathLike[str],
        *,
        augment: Augment | None = None,
        normalize: bool = True,
        fmnist_dir: str | os.PathLike[str] | None = None,
    ) -> TexturedFashionMNIST:
        """Load a set written by ``save_npz`` (no rendering needed)."""
        path = Path(path)
        arrays, params = load_npz_cache(path, ("images", "labels"), "a classification cache written by save_npz")
        images, labels = arrays["images"], arrays["labels"]
        if params.get("render_version") != RENDER_VERSION:
            raise DataError(
                f"{path} was rendered by version {params.get('render_version', 1)} of the pretraining images, "
                f"this code renders version {RENDER_VERSION}; delete the file to re-render it"
            )
        if images.shape != (params["n"], params["image_size"], params["image_size"], 3) or len(labels) != params["n"]:
            raise DataError(f"{path}: images {images.shape} / labels {labels.shape} do not match params {params}")
        ds = cls(
            params["split"],
            image_size=params["image_size"],
            n=params["n"],
            seed=params["seed"],
            item_scale=tuple(params["item_scale"]),
            placement=params.get("placement", "centre"),  # caches written before the option are centred
            augment=augment,
            normalize=normalize,
            fmnist_dir=fmnist_dir,
        )
        if ds._sil.source != params["silhouettes"]:
            raise DataError(f"{path} was made from {params['silhouettes']} items but {ds._sil.source} are loaded")
        ds._images, ds._have, ds.labels = images, None, labels
        return ds
