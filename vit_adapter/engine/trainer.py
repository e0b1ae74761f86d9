"""The training/evaluation loop: iteration-based, exactly resumable, single process or DDP (``torchrun``).

Exact resume: the batch of iteration ``it`` is a pure function of (seed, it) — the epoch's sample order comes
from a generator seeded by (seed, epoch), and transforms draw from (seed, epoch, index) — and a checkpoint holds
model, optimizer, scheduler and every RNG state. So a run stopped after any checkpoint and resumed ends with the
same weights and metrics, bit for bit on CPU, as one that never stopped. DataLoader workers
(``data.num_workers > 0``) load exactly those batches, in that order, and leave the global RNG alone.

Paper scale from the same path: ``data.batch_size`` is the global batch (per process = batch / world /
grad_accum), evaluation is sharded over the ranks and gathered (COCO AP computed once on rank 0), and the
process group's timeout is ``train.dist_timeout_s`` (docs/paper_profile.md).
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..metrics import CocoMetric, SegMetric
from ..models.ops import resolve_backend
from ..utils.io import atomic_write_json
from .build import backbone_of, build_datasets, build_model, load_pretrained
from .checkpoint import (
    _save_checkpoint,
    load_checkpoint,
    newest_readable_checkpoint,
    set_rng_state,
)
from .config import EXECUTION_KEYS, Config, config_hash, save_config
from .identity import run_identity
from .optim import build_optimizer, build_scheduler
from .rundir import (
    METRICS_FILE,
    RunDir,
    open_run_dir,
    releases_run_locks,
    run_metadata,
    set_determinism,
)

log = logging.getLogger(__name__)
if log.level == logging.NOTSET:  # the human-readable progress lines are INFO; a caller may still lower or raise it
    log.setLevel(logging.INFO)

# Tests of the pipeline's crash recovery set this to make a training process SIGKILL itself after iteration N.
_KILL_AFTER = os.environ.get("VIT_ADAPTER_KILL_AFTER_ITER")


class StopTraining(Exception):
    """Raised by a hook (or SIGTERM/SIGINT) to stop after the current iteration's checkpoint logic.

    ``signum`` is the signal that asked for the stop (None for a hook); the CLI exits 128 + signum."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum


class DivergedError(FloatingPointError, ValueError):
    """A non-finite loss or weights: one line naming the iteration and the key to change. No checkpoint is
    written from that point on, so the work dir keeps only states from before the divergence."""

    def __init__(self, what: str, iteration: int, cfg: Config) -> None:
        super().__init__(
            f"{what} at iteration {iteration}: training diverged; lower optim.lr (now {cfg.optim.lr:g}) or set "
            f"optim.clip_grad (now {cfg.optim.clip_grad}), then rerun with --no-resume"
        )
        self.iteration = iteration


@dataclass
class Hooks:
    """Deterministic interruption points for tests and the pipeline (no sleeps, no timing)."""

    after_iteration: Callable[[int], None] | None = None  # called with the 1-based iteration just finished
    after_eval: Callable[[int, dict[str, Any]], None] | None = None  # (iteration, metrics) on rank 0; may raise


# ---------------------------------------------------------------------------------------------------------
# Distributed helpers


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, timeout_s: int = 1800) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, NCCL on GPU. ``timeout_s`` bounds every
    collective (train.dist_timeout_s; NCCL's own default is 10 minutes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def per_process_batch(cfg: Config, world: int) -> int:
    """Images per process and micro-batch: ``data.batch_size`` is the global batch of one optimiser step
    (the paper's 16 = 8 GPUs x 2), split over ``world`` processes and ``train.grad_accum`` micro-batches."""
    total, accum = cfg.data.batch_size, cfg.train.grad_accum
    if total % (world * accum):
        raise ValueError(
            f"data.batch_size = {total} (the global batch) does not divide into {world} process(es) x "
            f"train.grad_accum = {accum}; use a multiple of {world * accum}"
        )
    return total // (world * accum)


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# Data order


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def use_syncbn(cfg: Config, world: int, device: torch.device) -> bool:
    """SyncBN by default under DDP on CUDA (model.norm null), as the official configs; gloo on CPU cannot
    synchronise BatchNorm, so CPU DDP keeps per-process BN. An explicit model.norm=bn keeps BN everywhere."""
    if world == 1:
        return False
    return cfg.model.norm == "syncbn" or (cfg.model.norm is None and device.type == "cuda")


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


def iteration_batches(
    n: int,
    batch: int,
    seed: int,
    start_it: int,
    max_iters: int,
    d: Dist,
    order_fn: Callable[[int], list[int]] | None = None,
) -> Iterator[tuple[int, int, list[int]]]:
    """(iteration, epoch, this rank's indices) from ``start_it``; the global batch is ``batch * world``,
    split rank-wise; incomplete tail batches are dropped (drop_last). ``order_fn(epoch)`` replaces the
    epoch's plain permutation (aspect-ratio grouping); its length must not depend on the epoch."""
    global_batch = batch * d.world
    per_epoch = (len(order_fn(0)) if order_fn is not None else n) // global_batch
    if per_epoch == 0:
        raise ValueError(f"dataset of {n} images is smaller than one global batch of {global_batch}")
    for it in range(start_it, max_iters):
        epoch, pos = divmod(it, per_epoch)
        order = order_fn(epoch) if order_fn is not None else epoch_order(n, seed, epoch)
        chunk = order[pos * global_batch : (pos + 1) * global_batch]
        yield it, epoch, chunk[d.rank * batch : (d.rank + 1) * batch]


def aspect_groups(dataset: Any) -> list[int]:
    """0 = landscape (w >= h), 1 = portrait, per index of a COCO-layout dataset, from the annotation file's
    image sizes (no image is read)."""
    imgs = dataset.coco.imgs
    return [int(imgs[i]["width"] < imgs[i]["height"]) for i in dataset.ids]


class _EpochIndexed(torch.utils.data.Dataset):
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


def _worker_batches(
    cfg: Config,
    dataset: Any,
    collate: Callable,
    schedule: Iterator[tuple[int, int, list[int]]],
    split: Callable,
    device: torch.device,
    seed: int,
) -> Iterator[Any] | None:
    """Collated micro-batches from ``data.num_workers`` DataLoader workers, in exactly the order the loop
    consumes them (None for 0 workers: the loop loads in-process). The batches are the same as in-process:
    the order is the schedule's and every sample's augmentation is seeded by (seed, epoch, index)."""
    if cfg.data.num_workers == 0:
        return None
    loader = torch.utils.data.DataLoader(
        _EpochIndexed(dataset),
        batch_sampler=_ScheduleSampler(schedule, split),
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        pin_memory=cfg.data.pin_memory and device.type == "cuda",
        # Its own generator: the loader's base seed must not draw from the global RNG, whose state the
        # checkpoint restores (dropout, drop-path and RoI sampling streams stay the same as in-process).
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)


# ---------------------------------------------------------------------------------------------------------
# Evaluation


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
    show = progress and d.main and _stderr_is_tty()
    starts = tqdm(starts, desc="eval", unit="batch", leave=False, disable=not show)  # iterates the same list
    if cfg.model.task == "det":
        metric = CocoMetric(val_set.coco, label_to_cat=val_set.label_to_cat)
        for start in starts:
            items = [val_set[i] for i in range(start, min(start + batch, len(val_set)))]
            images, targets = collate(items)
            with _autocast(cfg, device):
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
        for start in starts:
            idx = list(range(start, min(start + batch, len(val_set))))
            items = [val_set[i] for i in idx]
            images, _ = collate([(im, t) for im, t, _ in items])
            with _autocast(cfg, device):
                if slide:
                    crop, stride = cfg.data.image_size, int(cfg.data.slide_stride or cfg.data.image_size)
                    logits = slide_logits(model, images.to(device), crop=crop, stride=stride).cpu()
                else:
                    logits = model(images.to(device)).float().cpu()
            for k, (i, (_, _, meta)) in enumerate(zip(idx, items)):
                pred = seg_logits_to_original(logits[k], meta).argmax(0)
                metric.update(pred[None], val_set.original_target(i)[None])
        if d.world > 1:
            dist.all_reduce(metric.confusion, op=dist.ReduceOp.SUM)  # int64 counts: the sum is exact
        result = metric.compute() if d.main else {}
        if d.main:
            result = {k: v for k, v in result.items() if k in ("mIoU", "mAcc", "aAcc")} | {
                "IoU_per_class": [
                    None if v is None or math.isnan(v) else float(v) for v in result.get("IoU_per_class", [])
                ]
            }
    model.train(was_training)
    return {k: _clean(v) for k, v in result.items()}


def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, np.floating | np.integer):
        return _clean(v.item())
    return v


def _autocast(cfg: Config, device: torch.device):
    """CUDA autocast in train.amp_dtype; the detector keeps anchors, proposals and box regression in fp32
    (models/heads.py), so only convs/matmuls run in half precision."""
    if cfg.train.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16 if cfg.train.amp_dtype == "fp16" else torch.bfloat16)
    return nullcontext()


def make_grad_scaler(cfg: Config, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (dynamic, starting at train.loss_scale: the official configs' 512); bf16 and
    fp32 do not (None)."""
    if cfg.train.amp and cfg.train.amp_dtype == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda", init_scale=cfg.train.loss_scale)
    return None


FLOPS_NOTE = (
    "torch.utils.flop_counter at data.image_size x data.image_size, batch 1, backbone forward only (ViT + adapter, "
    "no FPN/task head). Counted: convolutions, linear layers/matmuls, and attention's two matmuls (QK^T and AV, "
    "counted through the math SDPA kernel). Not counted: grid_sample (the deformable sampling), softmax, norms, "
    "activations and other elementwise ops."
)


# ---------------------------------------------------------------------------------------------------------
# Costs


def count_flops(model: nn.Module, cfg: Config, device: torch.device) -> int | None:
    """Forward FLOPs of one eval-size image (see FLOPS_NOTE). The fused CPU/flash SDPA kernels are invisible to
    the flop counter (it counted 0 for attention), so attention runs through the math kernel here, whose QK^T
    and AV matmuls are counted: 2 * 2 * B * heads * N^2 * head_dim."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    s = cfg.data.image_size
    x = torch.zeros(1, 3, s, s, device=device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            backbone_of(model)(x)  # backbone only: detection heads' proposal counts make head FLOPs data-dependent
        return int(fc.get_total_flops())
    finally:
        model.train(was)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB (process peak RSS)


# ---------------------------------------------------------------------------------------------------------
# Human-readable log: `<run_dir>/train.log` and stderr (log.jsonl and metrics.json are the machine-readable record)

LOG_FORMAT = "%(asctime)s %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"
TRAIN_LOG = "train.log"


def _stderr_is_tty() -> bool:
    """Progress bars only on a terminal: the pipeline captures stderr into files, where a bar is noise."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class _ThisThread(logging.Filter):
    """Only records of the thread that attached the handler: a sweep trains several runs in threads at once."""

    def __init__(self) -> None:
        super().__init__()
        self.ident = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.ident


class _TqdmStderr(logging.Handler):
    """The current ``sys.stderr``, through ``tqdm.write`` so that a progress bar on a terminal stays intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


@contextmanager
def run_log(path: Path | None) -> Iterator[None]:
    """Send this module's log lines to ``path`` (appended: a resumed run continues its log) and, when nothing
    else handles them (no logging configured: the CLI, the pipeline), to stderr; detached on exit."""
    handlers: list[logging.Handler] = []
    if not log.hasHandlers():
        handlers.append(_TqdmStderr())
    if path is not None:
        handlers.append(logging.FileHandler(path, encoding="utf-8"))
    fmt, only_here = logging.Formatter(LOG_FORMAT, LOG_DATEFMT), _ThisThread()
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(only_here)
        log.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


def format_iteration(
    done: int, total: int, loss: float, lr: float, s_per_it: float, eta_s: float, mem_mb: float
) -> str:
    """``iter 40/160  loss 0.4213  lr 9.1e-04  2.31 s/it  eta 0:04:37  mem 1.9 GiB`` (mem: peak RSS on CPU,
    peak allocated on CUDA)."""
    return (
        f"iter {done}/{total}  loss {loss:.4f}  lr {lr:.1e}  {s_per_it:.2f} s/it  eta {_duration(eta_s)}  "
        f"mem {mem_mb / 1024:.1f} GiB"
    )


def format_metrics(metrics: dict[str, Any]) -> str:
    """The scalar metrics of an evaluation (per-class lists are left to metrics.json)."""
    parts = []
    for k, v in metrics.items():
        if isinstance(v, bool) or not (v is None or isinstance(v, int | float)):
            continue
        parts.append(f"{k} {'n/a' if v is None else f'{v:.4f}'}")
    return "  ".join(parts) or "(no scalar metrics)"


# ---------------------------------------------------------------------------------------------------------
# The loop


class LossModule(nn.Module):
    """``forward(images, targets) -> losses``, so that DDP sees the whole loss computation as its forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Any, targets: Any) -> dict[str, torch.Tensor]:
        return self.model.losses(images, targets)


def to_device(batch: Any, task: str, device: torch.device) -> tuple[Any, Any]:
    images, targets = batch
    if task == "det":
        imgs = [im.to(device) for im in images]
        return imgs, [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images.to(device), targets.to(device)


@releases_run_locks  # the one-writer lock goes with this call, however it ends
def train(
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = True,
    overwrite: bool = False,
    hooks: Hooks | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``out``; returns the final metrics dict (also in ``metrics.json``).

    Every ``train.log_interval`` iterations and after each evaluation, one human-readable line (loss, lr, s/it,
    ETA, peak memory; the metrics) goes through ``logging`` to ``<out>/train.log`` and, unless logging is configured
    otherwise, to stderr; ``log.jsonl`` keeps the same numbers for tools. ``progress``: a tqdm bar, shown only when
    stderr is a terminal."""
    hooks = hooks or Hooks()
    t_start = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    d = init_distributed(device, cfg.train.dist_timeout_s)
    seed = cfg.train.seed
    micro_batch = per_process_batch(cfg, d.world)  # bad global batch for this world size: fail before any output
    if device.type == "cuda":  # TF32 matmuls/convs, as the paper's torch 1.9 ran by default (train.tf32)
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32

    # Everything that can fail on bad input happens before the run directory is created.
    set_determinism(seed, cfg.train.deterministic)
    train_set, val_set, collate = build_datasets(cfg, seed)
    model = build_model(cfg)
    load_report = load_pretrained(model, cfg)
    # Pick (and, on first use on this machine, compile) the deformable-attention backend now, before any timer
    # runs: a kernel build inside the first step would inflate train_s_per_iter and the compute-matched schedule.
    deform_backend = resolve_backend(device)
    model.to(device)
    if use_syncbn(cfg, d.world, device):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    backbone = backbone_of(model)
    optimizer = build_optimizer(model, cfg.optim, num_layers=backbone.depth)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_iters)
    # Content identity (engine/identity.py): the config without execution-only keys (so a run resumes with other
    # threads/device/paths) plus the digests of the code, data and weights it reads.
    identity, inputs = run_identity(cfg)

    run: RunDir | None = open_run_dir(out, identity, resume=resume, overwrite=overwrite) if d.main else None
    if d.world > 1:
        dist.barrier()
    start_it, history, log_rows = 0, [], []
    ckpt = newest_readable_checkpoint(RunDir(Path(out)), model) if resume else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_it, history = ckpt["iteration"], ckpt["history"]
        set_rng_state(ckpt["rng"][d.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
    else:
        torch.manual_seed(seed + d.rank)  # dropout / drop-path / RoI sampling streams differ per rank

    if run is not None:
        save_config(cfg, run.path("config.yaml"))
        meta = run_metadata() | {
            "seed": seed,
            "config_hash": config_hash(cfg, exclude=EXECUTION_KEYS),
            "identity": identity,
            "inputs": inputs,
            "world_size": d.world,
            "device": str(device),
            "deform_backend": deform_backend,
        }
        if load_report is not None:
            meta["pretrained"] = {"source": cfg.weights.source, "report": load_report.summary()}
        meta["resumed_from_iteration"] = start_it
        atomic_write_json(run.path("run.json"), meta)

    net: nn.Module = LossModule(model)
    if d.world > 1:
        # Only variants with parameters a step does not touch pay for the unused-parameter search (Variant 2 keeps
        # the SPM's stride-4 projection for parameter parity with the paper, but its baseline neck never reads it).
        net = nn.parallel.DistributedDataParallel(
            net,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=backbone.has_unused_parameters,
        )
    net.train()

    # Human-readable progress (rank 0): <run_dir>/train.log and stderr; log.jsonl below stays the machine record.
    with run_log(run.path(TRAIN_LOG) if run is not None else None) if d.main else nullcontext():
        stop: dict[str, Any] = {"flag": False, "signum": None}
        old_handlers = _install_signal_handlers(stop)
        log_file = run.path("log.jsonl") if run is not None else None
        if log_file is not None and log_file.exists():  # drop rows logged after the checkpoint we resume from
            rows = [r for r in log_file.read_text(encoding="utf-8").splitlines() if json.loads(r)["iter"] <= start_it]
            log_file.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        train_time, train_images = 0.0, 0
        # data.batch_size is the global batch: each rank's step holds micro_batch * grad_accum images.
        accum = cfg.train.grad_accum
        order_fn = None
        if cfg.data.group_by_aspect and cfg.model.task == "det":
            groups = aspect_groups(train_set)
            order_fn = functools.partial(grouped_epoch_order, groups, micro_batch, seed)

        def schedule() -> Iterator[tuple[int, int, list[int]]]:  # pure function of (seed, epoch): same on resume
            return iteration_batches(
                len(train_set), micro_batch * accum, seed, start_it, cfg.train.max_iters, d, order_fn=order_fn
            )

        def micro_batches(indices: list[int]) -> list[list[int]]:
            if order_fn is not None:  # grouped: each micro-batch is one same-aspect chunk
                return [indices[k * micro_batch : (k + 1) * micro_batch] for k in range(accum)]
            return [indices[k::accum] for k in range(accum)]

        batches = schedule()
        loaded = _worker_batches(cfg, train_set, collate, schedule(), micro_batches, device, seed)
        scaler = make_grad_scaler(cfg, device)
        if scaler is not None and ckpt is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        show_bar = progress and d.main and _stderr_is_tty()
        bar = tqdm(total=cfg.train.max_iters, initial=start_it, disable=not show_bar, desc="train", leave=False)
        if d.main:
            where = f"resuming at iteration {start_it}" if start_it else "from scratch"
            log.info(
                "train %s: %d iterations (%s), %s, %d thread(s), world %d, global batch %d",
                out,
                cfg.train.max_iters,
                where,
                device,
                torch.get_num_threads(),
                d.world,
                cfg.data.batch_size,
            )
        t_loop = t_window = time.perf_counter()  # wall clock for the log's s/it and ETA (evaluations included)
        it_window = start_it
        try:
            current_epoch = -1
            for it, epoch, indices in batches:
                t0 = time.perf_counter()
                if epoch != current_epoch:
                    train_set.set_epoch(epoch)
                    current_epoch = epoch
                optimizer.zero_grad(set_to_none=True)
                micro = micro_batches(indices)  # this rank's batch in `accum` micro-batches
                for k, part in enumerate(micro):
                    sync = k == accum - 1 or d.world == 1
                    # num_workers 0: load here, in order; else the DataLoader's next batch (the same indices).
                    data = collate([train_set[i] for i in part]) if loaded is None else next(loaded)
                    with nullcontext() if sync else net.no_sync(), _autocast(cfg, device):
                        losses = net(*to_device(data, cfg.model.task, device))
                    loss = losses["loss"]
                    if not torch.isfinite(loss):
                        raise DivergedError(f"loss is {loss.item()}", it + 1, cfg)
                    if scaler is None:
                        (loss / accum).backward()
                    else:
                        scaler.scale(loss / accum).backward()
                if scaler is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients; steps with inf/nan gradients are skipped
                if cfg.optim.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                if scaler is None:
                    optimizer.step()
                else:
                    scaler.step(optimizer)
                    scaler.update()
                scheduler.step()
                train_time += time.perf_counter() - t0
                train_images += len(indices) * d.world
                done = it + 1
                bar.update(1)
                if done % cfg.train.log_interval == 0 or done == cfg.train.max_iters:
                    row = {"iter": done, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
                    row |= {k: round(float(v.detach()), 6) for k, v in losses.items()}
                    log_rows.append(row)
                    if log_file is not None:
                        with open(log_file, "a", encoding="utf-8") as f:
                            f.write(json.dumps(row) + "\n")
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    if d.main:  # numbers already computed above: no extra sync, no RNG draw
                        now = time.perf_counter()
                        s_per_it = (now - t_window) / max(1, done - it_window)
                        eta = (now - t_loop) / max(1, done - start_it) * (cfg.train.max_iters - done)
                        log.info(
                            format_iteration(
                                done, cfg.train.max_iters, row["loss"], row["lr"], s_per_it, eta, peak_memory_mb(device)
                            )
                        )
                        t_window, it_window = now, done
                if done % cfg.train.eval_interval == 0 or done == cfg.train.max_iters:
                    t_eval = time.perf_counter()
                    metrics = evaluate(model, val_set, collate, cfg, device, d, progress=progress)  # every rank
                    if d.main:
                        log.info(
                            "eval iter %d/%d  %s  (%.1f s)",
                            done,
                            cfg.train.max_iters,
                            format_metrics(metrics),
                            time.perf_counter() - t_eval,
                        )
                        history.append({"iter": done, **metrics})
                        if hooks.after_eval is not None:
                            hooks.after_eval(done, history[-1])
                    if d.world > 1:
                        dist.barrier()
                if done % cfg.train.checkpoint_interval == 0 or done == cfg.train.max_iters:
                    if (bad := _first_non_finite(model)) is not None:  # never checkpoint a diverged state
                        raise DivergedError(f"weights {bad} are not finite", done, cfg)
                    _save_checkpoint(run, model, optimizer, scheduler, done, history, d, scaler=scaler)
                if hooks.after_iteration is not None:
                    hooks.after_iteration(done)
                if _KILL_AFTER and done == int(_KILL_AFTER):  # test hook: die like `kill -9` at a known point
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop["flag"]:
                    raise StopTraining(_stop_message(out, done, stop["signum"]), signum=stop["signum"])
        finally:
            bar.close()
            _restore_signal_handlers(old_handlers)
            # Stop the loader's workers now: a traceback that holds this frame (StopTraining) would keep them alive.
            shutdown = getattr(loaded, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

        final = {"final": {k: v for k, v in history[-1].items() if k != "iter"} if history else {}, "history": history}
        if run is not None:
            final["iterations"] = cfg.train.max_iters
            atomic_write_json(run.path(METRICS_FILE), final)
            n_params = backbone.param_breakdown()
            total = sum(p.numel() for p in model.parameters())
            costs = {
                "params": {**n_params, "head": total - n_params["vit"] - n_params["adapter"], "total": total},
                "flops_backbone_forward": count_flops(model, cfg, device),
                "flops_note": FLOPS_NOTE,
                "train_images_per_s": train_images / train_time if train_time else None,
                "train_s_per_iter": train_time / max(1, cfg.train.max_iters - start_it),
                "peak_memory_mb": peak_memory_mb(device),
                "wall_time_s": time.perf_counter() - t_start,
                "iterations_this_process": cfg.train.max_iters - start_it,
                "world_size": d.world,
                "device": str(device),
                "threads": torch.get_num_threads(),
            }
            atomic_write_json(run.path("costs.json"), costs)
            log.info("finished %s in %s", run.out, _duration(time.perf_counter() - t_start))
    if run is not None:  # the log file is closed: the work dir moves into place
        run.prune_checkpoints(keep=1)
        run.finalize()
    if d.world > 1:
        dist.barrier()
    return final


def _stop_message(out: str | Path, done: int, signum: int | None) -> str:
    name = signal.Signals(signum).name if signum else "a hook"
    ckpts = RunDir(Path(out)).checkpoints()
    if not ckpts:
        return f"interrupted by {name} after iteration {done} before the first checkpoint; rerunning starts over"
    return (
        f"interrupted by {name} after iteration {done}; {RunDir(Path(out)).work} keeps the checkpoint of "
        f"iteration {ckpts[-1][0]}: resume with the same command"
    )


def _first_non_finite(model: nn.Module) -> str | None:
    """Name of the first parameter or buffer holding NaN/inf (a finite loss can still leave such weights)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _install_signal_handlers(stop: dict[str, bool]) -> dict[int, Any]:
    """SIGTERM/SIGINT finish the current iteration, then stop (the last checkpoint stays for resume)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {}

    def handler(signum, frame):  # noqa: ARG001
        stop["flag"] = True
        stop["signum"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, handler)
    return old


def _restore_signal_handlers(old: dict[int, Any]) -> None:
    for sig, h in old.items():
        signal.signal(sig, h)


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """`vit-adapter eval`: metrics of a saved checkpoint on the validation set, with ``train.threads`` threads
    (as in training: an unset thread count lets torch oversubscribe the cores, several times slower)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device, 0)
    _, val_set, collate = build_datasets(cfg, cfg.train.seed)
    model = build_model(cfg)
    ckpt = load_checkpoint(Path(checkpoint), model)
    model.load_state_dict(ckpt["model"])
    return evaluate(model.to(device), val_set, collate, cfg, device, progress=progress)
