"""The training loop: iteration-based, exactly resumable, single process or DDP (``torchrun``).

Exact resume: the batch of iteration ``it`` is a pure function of (seed, it) (engine/sampling.py) and a checkpoint
holds model, optimizer, scheduler and every RNG state. So a run stopped after any checkpoint and resumed ends with
the same weights and metrics, bit for bit on CPU, as one that never stopped. DataLoader workers
(``data.num_workers > 0``) load exactly those batches, in that order, and leave the global RNG alone.

Paper scale from the same path: ``data.batch_size`` is the global batch (per process = batch / world /
grad_accum), evaluation is sharded over the ranks and gathered (COCO AP computed once on rank 0), and the
process group's timeout is ``train.dist_timeout_s`` (docs/paper_profile.md).

Everything but the optimiser step is a hook (engine/hooks.py): log rows, checkpoints, evaluation, the
divergence guard and the signal stop; setup and the final files are ``_setup`` and ``_finish`` below.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..models.ops import resolve_backend
from ..utils.io import atomic_write_json
from .amp import autocast, make_grad_scaler
from .build import backbone_of, build_datasets, build_model, load_pretrained
from .checkpoint import newest_readable_checkpoint, prune_checkpoints, set_rng_state
from .config import EXECUTION_KEYS, Config, config_hash, save_config
from .costs import FLOPS_NOTE, count_flops, peak_memory_mb
from .distributed import Dist, barrier, init_distributed, per_process_batch, pick_device, use_syncbn
from .hooks import Hook, default_hooks
from .identity import run_identity
from .optim import build_optimizer, build_scheduler
from .progress import TRAIN_LOG, duration, log, run_log, stderr_is_tty
from .rundir import METRICS_FILE, RunDir, open_run_dir, releases_run_locks, run_metadata, set_determinism
from .sampling import Schedule, worker_batches


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


@dataclass
class Loop:
    """The state the loop and its hooks share."""

    cfg: Config
    out: Path
    d: Dist
    device: torch.device
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    run: RunDir | None
    train_set: Any
    val_set: Any
    collate: Callable
    schedule: Schedule
    scaler: torch.amp.GradScaler | None
    progress: bool
    start_it: int
    history: list[dict[str, Any]]
    t_start: float
    done: int = 0  # iterations finished
    epoch: int = -1
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    log_rows: list[dict[str, Any]] = field(default_factory=list)
    train_time: float = 0.0
    train_images: int = 0
    bar: Any = None


@releases_run_locks  # the one-writer lock goes with this call, however it ends
def train(
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = True,
    overwrite: bool = False,
    hooks: Sequence[Hook] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``out``; returns the final metrics dict (also in ``metrics.json``).

    Every ``train.log_interval`` iterations and after each evaluation, one human-readable line (loss, lr, s/it,
    ETA, peak memory; the metrics) goes through ``logging`` to ``<out>/train.log`` and, unless logging is configured
    otherwise, to stderr; ``log.jsonl`` keeps the same numbers for tools. ``progress``: a tqdm bar, shown only when
    stderr is a terminal. ``hooks``: the caller's (``hooks.Callbacks`` or any ``hooks.Hook``)."""
    loop, load_report, ckpt = _setup(cfg, Path(out), resume, overwrite, progress)
    all_hooks = default_hooks(list(hooks))
    with run_log(loop.run.path(TRAIN_LOG) if loop.run is not None else None) if loop.d.main else nullcontext():
        loaded = worker_batches(cfg, loop.train_set, loop.collate, loop.schedule, loop.device)
        if loop.scaler is not None and ckpt is not None and "scaler" in ckpt:
            loop.scaler.load_state_dict(ckpt["scaler"])
        show_bar = progress and loop.d.main and stderr_is_tty()
        loop.bar = tqdm(
            total=cfg.train.max_iters, initial=loop.start_it, disable=not show_bar, desc="train", leave=False
        )
        if loop.d.main:
            where = f"resuming at iteration {loop.start_it}" if loop.start_it else "from scratch"
            log.info(
                "train %s: %d iterations (%s), %s, %d thread(s), world %d, global batch %d",
                out,
                cfg.train.max_iters,
                where,
                loop.device,
                torch.get_num_threads(),
                loop.d.world,
                cfg.data.batch_size,
            )
        started: list[Hook] = []  # after_train undoes what a before_train did: only for hooks that started
        try:
            for h in all_hooks:
                h.before_train(loop)
                started.append(h)
            for it, epoch, indices in loop.schedule.batches():
                t0 = time.perf_counter()
                if epoch != loop.epoch:
                    loop.train_set.set_epoch(epoch)
                    loop.epoch = epoch
                _step(loop, indices, loaded, all_hooks)
                loop.train_time += time.perf_counter() - t0
                loop.train_images += len(indices) * loop.d.world
                loop.done = it + 1
                loop.bar.update(1)
                for h in all_hooks:
                    h.after_step(loop)
        finally:
            loop.bar.close()
            for h in started:
                h.after_train(loop)
            # Stop the loader's workers now: a traceback that holds this frame (StopTraining) would keep them alive.
            shutdown = getattr(loaded, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        final = _finish(loop)
    if loop.run is not None:  # the log file is closed: the work dir moves into place
        prune_checkpoints(loop.run, keep=1)
        loop.run.finalize()
    barrier(loop.d)
    return final


def _step(loop: Loop, indices: list[int], loaded: Iterator[Any] | None, hooks: list[Hook]) -> None:
    """One optimiser step over this rank's batch, in ``train.grad_accum`` micro-batches (gradients synchronised
    on the last). fp16: the scaler skips a step whose gradients are not finite (mmcv's Fp16OptimizerHook)."""
    cfg, net, optimizer, scaler, accum = loop.cfg, loop.net, loop.optimizer, loop.scaler, loop.cfg.train.grad_accum
    optimizer.zero_grad(set_to_none=True)
    for k, part in enumerate(loop.schedule.split(indices)):
        sync = k == accum - 1 or loop.d.world == 1
        # num_workers 0: load here, in order; else the DataLoader's next batch (the same indices).
        data = loop.collate([loop.train_set[i] for i in part]) if loaded is None else next(loaded)
        with nullcontext() if sync else net.no_sync(), autocast(cfg, loop.device):
            losses = net(*to_device(data, cfg.model.task, loop.device))
        for h in hooks:
            h.after_loss(loop, losses)
        loop.losses = losses
        loss = losses["loss"]
        if scaler is None:
            (loss / accum).backward()
        else:
            scaler.scale(loss / accum).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients; steps with inf/nan gradients are skipped
    if cfg.optim.clip_grad:
        nn.utils.clip_grad_norm_(loop.model.parameters(), cfg.optim.clip_grad)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    loop.scheduler.step()


def _setup(cfg: Config, out: Path, resume: bool, overwrite: bool, progress: bool) -> tuple[Loop, Any, Any]:
    """Devices, data, model, optimiser, the run directory and the resumed state. Everything that can fail on bad
    input happens before the run directory is created."""
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
    set_determinism(seed, cfg.train.deterministic)
    train_set, val_set, collate = build_datasets(cfg, seed)
    if len(train_set) < cfg.data.batch_size:  # an empty schedule, found before the run directory exists
        raise ValueError(
            f"data.batch_size = {cfg.data.batch_size} (one global batch) but the train split has {len(train_set)} "
            "image(s) (data.n_train): lower data.batch_size or train on more images"
        )
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

    run = open_run_dir(out, identity, resume=resume, overwrite=overwrite) if d.main else None
    barrier(d)
    start_it, history = 0, []
    ckpt = newest_readable_checkpoint(RunDir(out), model) if resume else None
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
    loop = Loop(
        cfg=cfg,
        out=out,
        d=d,
        device=device,
        model=model,
        net=net,
        optimizer=optimizer,
        scheduler=scheduler,
        run=run,
        train_set=train_set,
        val_set=val_set,
        collate=collate,
        schedule=Schedule(cfg, train_set, micro_batch, start_it, d),
        scaler=make_grad_scaler(cfg, device),
        progress=progress,
        start_it=start_it,
        history=history,
        t_start=t_start,
        done=start_it,
    )
    return loop, load_report, ckpt


def _finish(loop: Loop) -> dict[str, Any]:
    """metrics.json and costs.json (rank 0); returns the final metrics."""
    cfg, history, run, model, device = loop.cfg, loop.history, loop.run, loop.model, loop.device
    final = {"final": {k: v for k, v in history[-1].items() if k != "iter"} if history else {}, "history": history}
    if run is None:
        return final
    final["iterations"] = cfg.train.max_iters
    atomic_write_json(run.path(METRICS_FILE), final)
    n_params = backbone_of(model).param_breakdown()
    total = sum(p.numel() for p in model.parameters())
    costs = {
        "params": {**n_params, "head": total - n_params["vit"] - n_params["adapter"], "total": total},
        "flops_backbone_forward": count_flops(model, cfg, device),
        "flops_note": FLOPS_NOTE,
        "train_images_per_s": loop.train_images / loop.train_time if loop.train_time else None,
        "train_s_per_iter": loop.train_time / max(1, cfg.train.max_iters - loop.start_it),
        "peak_memory_mb": peak_memory_mb(device),
        "wall_time_s": time.perf_counter() - loop.t_start,
        "iterations_this_process": cfg.train.max_iters - loop.start_it,
        "world_size": loop.d.world,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    atomic_write_json(run.path("costs.json"), costs)
    log.info("finished %s in %s", run.out, duration(time.perf_counter() - loop.t_start))
    return final
