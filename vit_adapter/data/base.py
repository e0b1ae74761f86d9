"""What the detection and segmentation datasets share: exact-resume randomness and the in-memory cache."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .transforms import Sample

_STREAM = 0x7472  # keeps transform randomness apart from the generator's streams


class EpochDataset(Dataset):
    """Transforms draw from ``numpy.random.default_rng([seed, stream, epoch, index])``: the same (seed, epoch,
    index) always gives the same sample, whatever the worker, order or resume point. Call ``set_epoch`` at the
    start of every epoch (as with DistributedSampler)."""

    def __init__(self, seed: int, cache: bool) -> None:
        self.seed = int(seed)
        self.epoch = 0
        self._cache: dict[int, Sample] | None = {} if cache else None

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
