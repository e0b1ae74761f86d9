"""What the detection and segmentation datasets share: exact-resume randomness, the in-memory cache, the options
every dataset takes (``EpochOptions``) and the transformed sample with its image as a normalised tensor."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypedDict, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import Compose, Sample, to_normalized_tensor

T = TypeVar("T")


class EpochOptions(TypedDict, total=False):
    """The options of every dataset, besides its own (defaults of ``EpochDataset.__init__``)."""

    seed: int  # transform randomness (0)
    cache: bool  # keep decoded samples in memory (False)
    max_images: int | None  # only the first N images (None: all)
    scan: bool  # check every file before training starts (True)


_STREAM = 0x7472  # keeps transform randomness apart from the generator's streams


class EpochDataset(Dataset):
    """Transforms draw from ``numpy.random.default_rng([seed, stream, epoch, index])``: the same (seed, epoch,
    index) always gives the same sample, whatever the worker, order or resume point. Call ``set_epoch`` at the
    start of every epoch (as with DistributedSampler)."""

    def __init__(
        self,
        transforms: Compose | None,
        *,
        seed: int = 0,
        cache: bool = False,
        max_images: int | None = None,
        scan: bool = True,
    ) -> None:
        self.transforms = transforms
        self.seed = int(seed)
        self.epoch = 0
        self._cache: dict[int, Sample] | None = {} if cache else None
        if max_images is not None and (isinstance(max_images, bool) or max_images < 1):
            # items[:-1] would silently drop the last image and items[:0] leave nothing to train or evaluate on.
            raise ValueError(f"max_images must be >= 1 or None (all images), got {max_images!r}")
        self._max_images = max_images
        self.scan_on_init = bool(scan)

    def first_images(self, items: list[T]) -> list[T]:
        """`items`, or their first ``max_images``; ``available`` counts them all (the caller checks that it asked
        for no more than there are)."""
        self.available = len(items)
        return items if self._max_images is None else items[: self._max_images]

    def load_raw(self, index: int) -> Sample:
        """Decoded sample before any transform (numpy)."""
        raise NotImplementedError

    def transformed(self, index: int) -> Sample:
        """The sample after the transforms (drawn from ``rng(index)``), its image a normalised float tensor."""
        sample = self.cached_raw(index, self.load_raw)
        if self.transforms is not None:
            sample = self.transforms(sample, self.rng(index))
        if not isinstance(sample["image"], torch.Tensor):
            sample["image"] = to_normalized_tensor(sample["image"])
        return sample

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _STREAM, self.epoch, int(index)])

    def cached_raw(self, index: int, load: Callable[[int], Sample]) -> Sample:
        """Decoded sample, from the cache when enabled (each DataLoader worker keeps its own copy).

        Arrays are made read-only: transforms always build new arrays, so a cached sample is never altered.
        The returned dict and its meta are fresh copies."""
        if self._cache is None:
            return load(index)
        if index not in self._cache:
            raw = load(index)
            for v in raw.values():
                if isinstance(v, np.ndarray):
                    v.setflags(write=False)
            self._cache[index] = raw
        raw = self._cache[index]
        out: dict[str, Any] = dict(raw)
        out["meta"] = copy.deepcopy(raw["meta"])
        return out
