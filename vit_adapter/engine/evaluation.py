"""Evaluation on the whole validation set, in original image coordinates: mmseg's whole-image and sliding-window
inference, COCO box/mask AP, sharded over the ranks; and `vit-adapter eval` of a saved checkpoint."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..metrics import CocoMetric, SegMetric
from .amp import autocast
from .build import build_datasets, build_model
from .checkpoint import load_checkpoint
from .config import Config
from .distributed import Dist, all_reduce_sum, per_process_batch, pick_device
from .progress import stderr_is_tty


def eval_batch_size(cfg: Config, world: int = 1) -> int:
    """Images per evaluation forward and process: data.eval_batch_size, else the per-process training batch."""
    return cfg.data.eval_batch_size or per_process_batch(cfg, world)


def slide_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *, crop: int, stride: int):
    """mmseg's ``slide_inference``: ``crop`` x ``crop`` windows every ``stride`` pixels (the last window of a row
    or column is shifted back to end at the border; an image side below ``crop`` is one window), each window's
    logits added at its place, then divided by how many windows cover each pixel. Returns fp32 (B, C, H, W)."""
    _, _, h, w = images.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    total: torch.Tensor | None = None
    count = torch.zeros((1, 1, h, w), device=images.device)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out = model(images[:, :, y1:y2, x1:x2]).float()
            if total is None:
                total = images.new_zeros((images.shape[0], out.shape[1], h, w), dtype=torch.float32)
            total[:, :, y1:y2, x1:x2] += out
            count[:, :, y1:y2, x1:x2] += 1
    assert total is not None
    return total / count


@torch.no_grad()
def evaluate(
    model: nn.Module,
    val_set: Any,
    collate: Callable,
    cfg: Config,
    device: torch.device,
    d: Dist | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics on the whole validation set, in original image coordinates. ``progress``: a tqdm bar over the
    batches (rank 0, and only when stderr is a terminal).

    Distributed (``d.world > 1``, every rank calls this): evaluation batch ``b`` runs on rank ``b % world``,
    so every batch holds the same images as in one process; segmentation sums the ranks' confusion matrices
    (integers, exact), detection gathers the per-image predictions on rank 0, which computes COCO AP once.
    Rank 0 returns the metrics, the other ranks ``{}``."""
    from ..data import detections_to_original, seg_logits_to_original

    d = d or Dist()
    was_training = model.training
    model.eval()
    batch = eval_batch_size(cfg, d.world)
    starts = list(range(0, len(val_set), batch))[d.rank :: d.world]
    batches = [list(range(s, min(s + batch, len(val_set)))) for s in starts]
    seg = cfg.model.task != "det"
    show = progress and d.main and stderr_is_tty()
    loaded = tqdm(_eval_items(val_set, batches, seg, cfg.data.num_workers), total=len(batches), desc="eval",
                  unit="batch", leave=False, disable=not show)  # fmt: skip
    if not seg:
        metric = CocoMetric(val_set.coco, label_to_cat=val_set.label_to_cat)
        for items in loaded:
            images, targets = collate(items)
            with autocast(cfg, device):
                outs = model([im.to(device) for im in images])
            outs = [
                detections_to_original({k: v.float().cpu() for k, v in o.items()}, t["meta"])
                for o, t in zip(outs, targets)
            ]
            metric.update([int(t["image_id"]) for t in targets], outs)
        if d.world > 1:
            parts: list[Any] = [None] * d.world if d.main else []
            dist.gather_object(metric.preds, parts if d.main else None, dst=0)
            metric.preds = {k: v for part in parts for k, v in part.items()} if d.main else {}
        result = metric.compute() if d.main else {}
    else:
        metric = SegMetric(cfg.head.num_classes, ignore_index=255)
        slide = cfg.data.test_mode == "slide"
        for pairs in loaded:
            items = [item for item, _ in pairs]
            images, _ = collate([(im, t) for im, t, _ in items])
            with autocast(cfg, device):
                if slide:
                    crop, stride = cfg.data.image_size, int(cfg.data.slide_stride or cfg.data.image_size)
                    logits = slide_logits(model, images.to(device), crop=crop, stride=stride).cpu()
                else:
                    logits = model(images.to(device)).float().cpu()
            for k, ((_, _, meta), target) in enumerate(pairs):
                pred = seg_logits_to_original(logits[k], meta).argmax(0)
                metric.update(pred[None], target[None])
        metric.confusion = all_reduce_sum(metric.confusion, d)  # int64 counts: the sum is exact
        result = metric.compute() if d.main else {}
        if d.main:
            result = {k: v for k, v in result.items() if k in ("mIoU", "mAcc", "aAcc")} | {
                "IoU_per_class": [
                    None if v is None or math.isnan(v) else float(v) for v in result.get("IoU_per_class", [])
                ]
            }
    model.train(was_training)
    return {k: _clean(v) for k, v in result.items()}


class _EvalItems(torch.utils.data.Dataset):
    """Validation item ``i``; for segmentation with its original-size target (what the metric compares to)."""

    def __init__(self, val_set: Any, seg: bool) -> None:
        self.val_set, self.seg = val_set, seg

    def __len__(self) -> int:
        return len(self.val_set)

    def __getitem__(self, i: int) -> Any:
        item = self.val_set[i]
        return (item, self.val_set.original_target(i)) if self.seg else item


def _as_list(items: list[Any]) -> list[Any]:
    return items


def _eval_items(val_set: Any, batches: list[list[int]], seg: bool, workers: int) -> Iterable[list[Any]]:
    """The items of each evaluation batch, in order: read by ``data.num_workers`` DataLoader workers while the
    model runs, or here in-process for 0 workers. The items are the same (validation transforms draw no random
    numbers)."""
    items = _EvalItems(val_set, seg)
    if workers == 0:
        return ([items[i] for i in b] for b in batches)
    # Its own generator: a DataLoader draws its workers' base seed from the global RNG otherwise, and training
    # (drop path) goes on drawing from that RNG after the evaluation, so num_workers would change the run.
    loader_rng = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(
        items, batch_sampler=batches, num_workers=workers, collate_fn=_as_list, generator=loader_rng
    )


def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, np.floating | np.integer):
        return _clean(v.item())
    return v


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """`vit-adapter eval`: metrics of a saved checkpoint on the validation set, with ``train.threads`` threads
    (as in training: an unset thread count lets torch oversubscribe the cores, several times slower)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device, 0)
    _, val_set, collate = build_datasets(cfg, cfg.train.seed, train_split=False)  # only the split it reads
    model = build_model(cfg)
    ckpt = load_checkpoint(Path(checkpoint), model)
    model.load_state_dict(ckpt["model"])
    return evaluate(model.to(device), val_set, collate, cfg, device, progress=progress)
