"""The training/evaluation loop: iteration-based, exactly resumable, single process or DDP (``torchrun``).

Exact resume: the batch of iteration ``it`` is a pure function of (seed, it) — the epoch's sample order comes
from a generator seeded by (seed, epoch), and transforms draw from (seed, epoch, index) — and a checkpoint holds
model, optimizer, scheduler and every RNG state. So a run stopped after any checkpoint and resumed ends with the
same weights and metrics, bit for bit on CPU, as one that never stopped.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..metrics import CocoMetric, SegMetric
from .build import backbone_of, build_datasets, build_model, load_pretrained
from .config import EXECUTION_KEYS, Config, config_hash, save_config
from .optim import build_optimizer, build_scheduler
from .rundir import RunDir, atomic_torch_save, atomic_write_json, open_run_dir, run_metadata, set_determinism

# Tests of the pipeline's crash recovery set this to make a training process SIGKILL itself after iteration N.
_KILL_AFTER = os.environ.get("VIT_ADAPTER_KILL_AFTER_ITER")


class StopTraining(Exception):
    """Raised by a hook (or SIGTERM/SIGINT) to stop after the current iteration's checkpoint logic."""


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


def init_distributed(device: torch.device) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, NCCL on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


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


def iteration_batches(
    n: int, batch: int, seed: int, start_it: int, max_iters: int, d: Dist
) -> Iterator[tuple[int, int, list[int]]]:
    """(iteration, epoch, this rank's indices) from ``start_it``; the global batch is ``batch * world``,
    split rank-wise; incomplete tail batches are dropped (drop_last)."""
    global_batch = batch * d.world
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"dataset of {n} images is smaller than one global batch of {global_batch}")
    for it in range(start_it, max_iters):
        epoch, pos = divmod(it, per_epoch)
        order = epoch_order(n, seed, epoch)
        chunk = order[pos * global_batch : (pos + 1) * global_batch]
        yield it, epoch, chunk[d.rank * batch : (d.rank + 1) * batch]


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def rng_state() -> dict[str, Any]:
    import random

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def architecture_signature(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (another architecture) or cannot be read."""


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    want = architecture_signature(model)
    got = ckpt.get("architecture", {})
    if got != want:
        diff = sorted(set(got) ^ set(want)) or sorted(k for k in want if got.get(k) != want[k])
        raise CheckpointError(f"checkpoint {path} is from another architecture (first differing keys: {diff[:4]})")
    return ckpt


# ---------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, val_set: Any, collate: Callable, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Metrics on the whole validation set (rank 0 only), in original image coordinates."""
    from ..data import detections_to_original, seg_logits_to_original

    was_training = model.training
    model.eval()
    batch = max(1, cfg.data.batch_size)
    if cfg.model.task == "det":
        metric = CocoMetric(val_set.coco, label_to_cat=val_set.label_to_cat)
        for start in range(0, len(val_set), batch):
            items = [val_set[i] for i in range(start, min(start + batch, len(val_set)))]
            images, targets = collate(items)
            with _autocast(cfg, device):
                outs = model([im.to(device) for im in images])
            outs = [
                detections_to_original({k: v.float().cpu() for k, v in o.items()}, t["meta"])
                for o, t in zip(outs, targets)
            ]
            metric.update([int(t["image_id"]) for t in targets], outs)
        result = metric.compute()
    else:
        metric = SegMetric(cfg.head.num_classes, ignore_index=255)
        for start in range(0, len(val_set), batch):
            idx = list(range(start, min(start + batch, len(val_set))))
            items = [val_set[i] for i in idx]
            images, _ = collate([(im, t) for im, t, _ in items])
            with _autocast(cfg, device):
                logits = model(images.to(device)).float().cpu()
            for k, (i, (_, _, meta)) in enumerate(zip(idx, items)):
                pred = seg_logits_to_original(logits[k], meta).argmax(0)
                metric.update(pred[None], val_set.original_target(i)[None])
        result = metric.compute()
        result = {k: v for k, v in result.items() if k in ("mIoU", "mAcc", "aAcc")} | {
            "IoU_per_class": [None if v is None or math.isnan(v) else float(v) for v in result.get("IoU_per_class", [])]
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
    if cfg.train.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------------------------------------------------
# Costs


def count_flops(model: nn.Module, cfg: Config, device: torch.device) -> int | None:
    """Forward FLOPs of one eval-size image (torch.utils.flop_counter: matmuls, convs, SDPA; grid_sample —
    the deformable sampling — and elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    s = cfg.data.image_size
    x = torch.zeros(1, 3, s, s, device=device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            backbone_of(model)(x)  # backbone only: detection heads' proposal counts make head FLOPs data-dependent
        return int(fc.get_total_flops())
    finally:
        model.train(was)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB (process peak RSS)


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


def train(
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = True,
    overwrite: bool = False,
    hooks: Hooks | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``out``; returns the final metrics dict (also in ``metrics.json``)."""
    hooks = hooks or Hooks()
    t_start = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    d = init_distributed(device)
    seed = cfg.train.seed

    # Everything that can fail on bad input happens before the run directory is created.
    set_determinism(seed, cfg.train.deterministic)
    train_set, val_set, collate = build_datasets(cfg, seed)
    model = build_model(cfg)
    load_report = load_pretrained(model, cfg)
    model.to(device)
    if d.world > 1 and cfg.model.norm == "syncbn":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    backbone = backbone_of(model)
    optimizer = build_optimizer(model, cfg.optim, num_layers=backbone.depth)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_iters)
    identity = config_hash(cfg, exclude=EXECUTION_KEYS)  # resumable with other threads/device/paths

    run: RunDir | None = open_run_dir(out, identity, resume=resume, overwrite=overwrite) if d.main else None
    if d.world > 1:
        dist.barrier()
    start_it, history, log_rows = 0, [], []
    ckpt_path = RunDir(Path(out)).latest_checkpoint()
    if resume and ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, model)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_it, history = ckpt["iteration"], ckpt["history"]
        set_rng_state(ckpt["rng"][d.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
    else:
        torch.manual_seed(seed + d.rank)  # dropout / drop-path / RoI sampling streams differ per rank

    if run is not None:
        save_config(cfg, run.path("config.yaml"))
        meta = run_metadata() | {"seed": seed, "config_hash": identity, "world_size": d.world, "device": str(device)}
        if load_report is not None:
            meta["pretrained"] = {"source": cfg.weights.source, "report": load_report.summary()}
        meta["resumed_from_iteration"] = start_it
        atomic_write_json(run.path("run.json"), meta)

    net: nn.Module = LossModule(model)
    if d.world > 1:
        # Some variants hold parameters that a step does not touch (Variant 2 keeps the SPM's stride-4 projection
        # for parameter parity with the paper, but its baseline neck never reads it).
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    net.train()

    stop = {"flag": False}
    old_handlers = _install_signal_handlers(stop)
    log_file = run.path("log.jsonl") if run is not None else None
    if log_file is not None and log_file.exists():  # drop rows logged after the checkpoint we resume from
        rows = [r for r in log_file.read_text(encoding="utf-8").splitlines() if json.loads(r)["iter"] <= start_it]
        log_file.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    train_time, train_images = 0.0, 0
    # data.batch_size is per micro-batch; one optimiser step sees batch_size * grad_accum images per rank.
    batches = iteration_batches(
        len(train_set), cfg.data.batch_size * cfg.train.grad_accum, seed, start_it, cfg.train.max_iters, d
    )
    bar = tqdm(
        total=cfg.train.max_iters, initial=start_it, disable=not (progress and d.main), desc="train", leave=False
    )
    try:
        current_epoch = -1
        for it, epoch, indices in batches:
            t0 = time.perf_counter()
            if epoch != current_epoch:
                train_set.set_epoch(epoch)
                current_epoch = epoch
            optimizer.zero_grad(set_to_none=True)
            accum = cfg.train.grad_accum
            micro = [indices[k::accum] for k in range(accum)]  # this rank's batch in `accum` micro-batches
            for k, part in enumerate(micro):
                sync = k == accum - 1 or d.world == 1
                with nullcontext() if sync else net.no_sync(), _autocast(cfg, device):
                    losses = net(*to_device(collate([train_set[i] for i in part]), cfg.model.task, device))
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at iteration {it + 1}")
                (loss / accum).backward()
            if cfg.optim.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            optimizer.step()
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
            if done % cfg.train.eval_interval == 0 or done == cfg.train.max_iters:
                if d.main:
                    history.append({"iter": done, **evaluate(model, val_set, collate, cfg, device)})
                    if hooks.after_eval is not None:
                        hooks.after_eval(done, history[-1])
                if d.world > 1:
                    dist.barrier()
            if done % cfg.train.checkpoint_interval == 0 or done == cfg.train.max_iters:
                _save_checkpoint(run, model, optimizer, scheduler, done, history, d)
            if hooks.after_iteration is not None:
                hooks.after_iteration(done)
            if _KILL_AFTER and done == int(_KILL_AFTER):  # test hook: die like `kill -9` at a known point
                os.kill(os.getpid(), signal.SIGKILL)
            if stop["flag"]:
                raise StopTraining(f"stopped by signal after iteration {done}")
    finally:
        bar.close()
        _restore_signal_handlers(old_handlers)

    final = {"final": {k: v for k, v in history[-1].items() if k != "iter"} if history else {}, "history": history}
    if run is not None:
        final["iterations"] = cfg.train.max_iters
        atomic_write_json(run.path("metrics.json"), final)
        n_params = backbone.param_breakdown()
        total = sum(p.numel() for p in model.parameters())
        costs = {
            "params": {**n_params, "head": total - n_params["vit"] - n_params["adapter"], "total": total},
            "flops_backbone_forward": count_flops(model, cfg, device),
            "flops_note": "torch.utils.flop_counter at data.image_size, batch 1, backbone forward; grid_sample "
            "(deformable sampling), softmax and elementwise ops are not counted",
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
        run.prune_checkpoints(keep=1)
        run.finalize()
    if d.world > 1:
        dist.barrier()
    return final


def _save_checkpoint(run: RunDir | None, model, optimizer, scheduler, it: int, history: list, d: Dist) -> None:
    states = [None] * d.world
    if d.world > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if run is None:
        return
    ckpt = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "iteration": it,
        "history": history,
        "rng": states,
        "architecture": architecture_signature(model),
    }
    atomic_torch_save(ckpt, run.checkpoint_path(it))
    run.prune_checkpoints(keep=2)


def _install_signal_handlers(stop: dict[str, bool]) -> dict[int, Any]:
    """SIGTERM/SIGINT finish the current iteration, then stop (the last checkpoint stays for resume)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {}

    def handler(signum, frame):  # noqa: ARG001
        stop["flag"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, handler)
    return old


def _restore_signal_handlers(old: dict[int, Any]) -> None:
    for sig, h in old.items():
        signal.signal(sig, h)


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path) -> dict[str, Any]:
    """`vit-adapter eval`: metrics of a saved checkpoint on the validation set."""
    device = pick_device(cfg.train.device, 0)
    _, val_set, collate = build_datasets(cfg, cfg.train.seed)
    model = build_model(cfg)
    ckpt = load_checkpoint(Path(checkpoint), model)
    model.load_state_dict(ckpt["model"])
    return evaluate(model.to(device), val_set, collate, cfg, device)
