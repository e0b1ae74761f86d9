"""The training data order: a pure function of (seed, iteration), so a resumed run sees the same batches.

The epoch's sample order comes from a generator seeded by (seed, epoch) (optionally mmdet's aspect-ratio
grouping), each iteration takes the next global batch of it, split rank-wise and into micro-batches; DataLoader
workers (``data.num_workers > 0``) load exactly those micro-batches, in that order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .config import Config
from .distributed import Dist


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def grouped_epoch_order(groups: Sequence[int], chunk: int, seed: int, epoch: int) -> list[int]:
    """mmdet's GroupSampler, as a pure function of (seed, epoch): the epoch's permutation split by group (e.g.
    landscape / portrait), each group cut into chunks of ``chunk`` (one process's micro-batch, tails dropped),
    and the chunks shuffled, so no batch pads a portrait image to a landscape one."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(groups), generator=g).tolist()
    chunks: list[list[int]] = []
    for gid in sorted(set(groups)):
        members = [i for i in order if groups[i] == gid]
        chunks += [members[k : k + chunk] for k in range(0, len(members) - chunk + 1, chunk)]
    return [i for c in torch.randperm(len(chunks), generator=g).tolist() for i in chunks[c]]


def grouped_epoch_length(groups: Sequence[int], chunk: int) -> int:
    """``len(grouped_epoch_order(groups, chunk, ...))`` for every epoch, without computing an order."""
    return sum(groups.count(gid) // chunk * chunk for gid in set(groups))


def iteration_batches(
    n: int,
    batch: int,
    seed: int,
    start_it: int,
    max_iters: int,
    d: Dist,
    order_fn: Callable[[int], list[int]] | None = None,
    epoch_length: int | None = None,
) -> Iterator[tuple[int, int, list[int]]]:
    """(iteration, epoch, this rank's indices) from ``start_it``; the global batch is ``batch * world``,
    split rank-wise; incomplete tail batches are dropped (drop_last). ``order_fn(epoch)`` replaces the
    epoch's plain permutation (aspect-ratio grouping); its length must not depend on the epoch (``epoch_length``
    when known, else measured on epoch 0). Each epoch's order is computed once, when the epoch starts."""
    global_batch = batch * d.world
    if order_fn is None:
        order_fn, epoch_length = functools.partial(epoch_order, n, seed), n
    per_epoch = (epoch_length if epoch_length is not None else len(order_fn(0))) // global_batch
    if per_epoch == 0:
        raise ValueError(f"dataset of {n} images is smaller than one global batch of {global_batch}")
    current, order = -1, []
    for it in range(start_it, max_iters):
        epoch, pos = divmod(it, per_epoch)
        if epoch != current:
            current, order = epoch, order_fn(epoch)
        chunk = order[pos * global_batch : (pos + 1) * global_batch]
        yield it, epoch, chunk[d.rank * batch : (d.rank + 1) * batch]


def aspect_groups(dataset: Any) -> list[int]:
    """0 = landscape (w >= h), 1 = portrait, per index of a COCO-layout dataset, from the annotation file's
    image sizes (no image is read)."""
    imgs = dataset.coco.imgs
    return [int(imgs[i]["width"] < imgs[i]["height"]) for i in dataset.ids]


class Schedule:
    """The run's batches from ``start_it``: ``batches()`` (any number of independent iterators, e.g. the loop's and
    the DataLoader's) and ``split`` of a rank's batch into ``train.grad_accum`` micro-batches. The grouped order
    of an epoch is computed once and shared by the iterators (the loader's may run an epoch ahead)."""

    def __init__(self, cfg: Config, train_set: Any, micro_batch: int, start_it: int, d: Dist) -> None:
        self.cfg, self.n, self.micro, self.start_it, self.d = cfg, len(train_set), micro_batch, start_it, d
        self.accum = cfg.train.grad_accum
        self.order_fn: Callable[[int], list[int]] | None = None
        self.epoch_length: int | None = None
        if cfg.data.group_by_aspect and cfg.model.task == "det":
            groups = aspect_groups(train_set)
            order = functools.partial(grouped_epoch_order, groups, micro_batch, cfg.train.seed)
            self.order_fn = functools.lru_cache(maxsize=2)(order)
            self.epoch_length = grouped_epoch_length(groups, micro_batch)

    def batches(self) -> Iterator[tuple[int, int, list[int]]]:  # pure function of (seed, epoch): same on resume
        return iteration_batches(
            self.n,
            self.micro * self.accum,
            self.cfg.train.seed,
            self.start_it,
            self.cfg.train.max_iters,
            self.d,
            order_fn=self.order_fn,
            epoch_length=self.epoch_length,
        )

    def split(self, indices: list[int]) -> list[list[int]]:
        if self.order_fn is not None:  # grouped: each micro-batch is one same-aspect chunk
            return [indices[k * self.micro : (k + 1) * self.micro] for k in range(self.accum)]
        return [indices[k :: self.accum] for k in range(self.accum)]


class EpochIndexed(torch.utils.data.Dataset):
    """``ds[(epoch, i)]`` = ``ds.set_epoch(epoch); ds[i]``: a worker process holds its own copy of the dataset,
    so the epoch (which seeds the transforms) travels with each index instead of being set once."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


class _ScheduleSampler:
    """Batch sampler over the trainer's own schedule: one list of (epoch, index) per micro-batch, in order."""

    def __init__(self, schedule: Iterator[tuple[int, int, list[int]]], split: Callable) -> None:
        self.schedule, self.split = schedule, split

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for _, epoch, indices in self.schedule:
            for part in self.split(indices):
                yield [(epoch, i) for i in part]


def worker_batches(
    cfg: Config, dataset: Any, collate: Callable, schedule: Schedule, device: torch.device
) -> Iterator[Any] | None:
    """Collated micro-batches from ``data.num_workers`` DataLoader workers, in exactly the order the loop
    consumes them (None for 0 workers: the loop loads in-process). The batches are the same as in-process:
    the order is the schedule's and every sample's augmentation is seeded by (seed, epoch, index)."""
    if cfg.data.num_workers == 0:
        return None
    loader = torch.utils.data.DataLoader(
        EpochIndexed(dataset),
        batch_sampler=_ScheduleSampler(schedule.batches(), schedule.split),
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        pin_memory=cfg.data.pin_memory and device.type == "cuda",
        # Its own generator: the loader's base seed must not draw from the global RNG, whose state the
        # checkpoint restores (dropout, drop-path and RoI sampling streams stay the same as in-process).
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    return iter(loader)
