"""Offline supervised pretraining of the plain ViT on textured Fashion-MNIST (the ImageNet stand-in, CPU-sized).

The official ViT-Adapter starts from an ImageNet-pretrained ViT (DeiT, AugReg, BEiT). On a 2-core CPU without
network access we replace ImageNet by ``vit_adapter.data.pretrain.TexturedFashionMNIST``: 10-way classification
of one Fashion-MNIST item drawn on real scikit-image textures. The model is the preset's ``PlainViT`` (built at
``pretrain_size = image_size``) plus a classification head: mean-pooled tokens -> LayerNorm -> Linear. Only the
ViT goes into the output ``.safetensors`` (timm/PlainViT key names, loadable with ``load_vit_state_dict``); the
head is written beside it as ``<stem>.head.safetensors`` so the reported top-1 can be re-measured from files.

Recipe (docs/pretraining.md has the tuning runs): 48 px images (3x3 tokens) rendered once into memory (optionally
an npz cache), 2-D sin-cos init of the position embedding, AdamW with linear warmup and cosine decay, label
smoothing, gradient clipping, and no augmentation by default (the model underfits at this budget; batched
random-resized-crop/flip and photometric inversion are options). Top-1 is measured on the 'val' split, whose
items are Fashion-MNIST *test* items, so nothing is shared with training. Runs are deterministic for a given
seed and thread count, unless a ``time_budget_s`` cuts the run short (then the schedule follows wall time; the
sidecar says so).

The two objectives (what is rendered, the loss, the held-out score) live in ``engine/pretrain_objectives.py``;
the training loop here is the same for both.

Heavy imports (torch, timm) happen inside functions so that building the CLI parser stays cheap.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vit_adapter.config.typed import build_dataclass, check_dataclass
from vit_adapter.engine.pretrain_config import (
    AUGMENTS,
    DEFAULT_STEPS,
    HEAD_SUFFIX,
    N_TRAIN_MAX,
    N_VAL_MAX,
    POS_INITS,
    PretrainConfig,
    require,
    type_message,
    vit_kwargs,
)
from vit_adapter.engine.pretrain_objectives import NUM_CLASSES, OBJECTIVE_REGISTRY, normalize

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vit_adapter.models.vit import PlainViT

log = logging.getLogger(__name__)

OBJECTIVES = tuple(OBJECTIVE_REGISTRY)


def validate(cfg: PretrainConfig) -> dict[str, Any]:
    """Check every argument; return the resolved ViT kwargs. Raises one ValueError naming the problem."""
    check_dataclass(cfg, "PretrainConfig", message=type_message)  # the annotations; NaN/inf fail too
    require(cfg.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    vkw = vit_kwargs(cfg.preset, cfg.image_size, cfg.drop_path_rate, cfg.objective)
    patch, size = vkw.get("patch_size", 16), vkw["pretrain_size"]
    require(size >= patch and size % patch == 0, f"image_size must be a positive multiple of {patch}, got {size}")
    require(cfg.steps is None or cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}")
    require(cfg.epochs is None or cfg.epochs > 0, f"epochs must be > 0, got {cfg.epochs}")
    require(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    require(cfg.lr > 0 and math.isfinite(cfg.lr), f"lr must be a positive number, got {cfg.lr}")
    require(0 <= cfg.min_lr <= cfg.lr, f"min_lr must be in [0, lr={cfg.lr}], got {cfg.min_lr}")
    require(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    require(0 < cfg.beta2 < 1, f"beta2 must be in (0, 1), got {cfg.beta2}")
    require(cfg.warmup_steps >= 0, f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    require(0 <= cfg.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    require(cfg.grad_clip is None or cfg.grad_clip > 0, f"grad_clip must be > 0 or None, got {cfg.grad_clip}")
    require(vkw.get("drop_path_rate", 0.0) >= 0, f"drop_path_rate must be >= 0, got {cfg.drop_path_rate}")
    require(1 <= cfg.n_train <= N_TRAIN_MAX, f"n_train must be in 1..{N_TRAIN_MAX}, got {cfg.n_train}")
    require(1 <= cfg.n_val <= N_VAL_MAX, f"n_val must be in 1..{N_VAL_MAX}, got {cfg.n_val}")
    lo, hi = cfg.item_scale
    require(0 < lo <= hi <= 1, f"item_scale must satisfy 0 < lo <= hi <= 1, got {cfg.item_scale}")
    from vit_adapter.data.pretrain import PLACEMENTS

    require(cfg.placement in PLACEMENTS, f"placement must be one of {', '.join(PLACEMENTS)}, got {cfg.placement!r}")
    require(cfg.augment in AUGMENTS, f"augment must be one of {', '.join(AUGMENTS)}, got {cfg.augment!r}")
    require(0 <= cfg.invert_prob <= 1, f"invert_prob must be in [0, 1], got {cfg.invert_prob}")
    require(cfg.pos_init in POS_INITS, f"pos_init must be one of {', '.join(POS_INITS)}, got {cfg.pos_init!r}")
    lo, hi = cfg.crop_scale
    require(0 < lo <= hi <= 1, f"crop_scale must satisfy 0 < lo <= hi <= 1, got {cfg.crop_scale}")
    lo, hi = cfg.crop_ratio
    require(0 < lo <= hi, f"crop_ratio must satisfy 0 < lo <= hi, got {cfg.crop_ratio}")
    require(cfg.threads is None or cfg.threads >= 1, f"threads must be >= 1, got {cfg.threads}")
    require(cfg.time_budget_s is None or cfg.time_budget_s > 0, f"time_budget_s must be > 0, got {cfg.time_budget_s}")
    require(cfg.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {cfg.eval_batch_size}")
    require(cfg.log_every >= 1, f"log_every must be >= 1, got {cfg.log_every}")
    require(0 <= cfg.scene_difficulty <= 1, f"scene_difficulty must be in [0, 1], got {cfg.scene_difficulty}")
    require(cfg.render_workers >= 1, f"render_workers must be >= 1, got {cfg.render_workers}")
    OBJECTIVE_REGISTRY[cfg.objective].check(cfg)
    return vkw


# ---------------------------------------------------------------------------------------------------------
# Data: augment whole batches (each objective renders its images once into uint8 memory).
# ---------------------------------------------------------------------------------------------------------


def head_path(out: str | Path) -> Path:
    """Where the classification head of the weights file ``out`` is stored."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + HEAD_SUFFIX)


def batch_augment(
    x: torch.Tensor,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (0.8, 1.25),
    flip: bool = True,
) -> torch.Tensor:
    """Random resized crop + horizontal flip of a whole float batch in one ``grid_sample`` call.

    Why batched: torchvision's per-image transforms cost ~1 ms an image, a quarter of a 64 px training step.
    Each sample draws an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio`` (as
    torchvision's RandomResizedCrop), the crop is clamped inside the image and resampled bilinearly.
    """
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # crop width / image width
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coords, inside the image
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    sx = w
    if flip:
        sx = torch.where(torch.rand(b, generator=gen) < 0.5, -w, w)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------


def build_head(embed_dim: int, num_classes: int = NUM_CLASSES) -> nn.Module:
    """LayerNorm -> Linear on mean-pooled tokens (keys ``norm.*``, ``fc.*``)."""
    from timm.layers import trunc_normal_
    from torch import nn

    head = nn.Sequential(OrderedDict(norm=nn.LayerNorm(embed_dim, eps=1e-6), fc=nn.Linear(embed_dim, num_classes)))
    trunc_normal_(head.fc.weight, std=0.02)
    nn.init.zeros_(head.fc.bias)
    return head


def init_sincos_pos_embed(vit: PlainViT) -> None:
    """Overwrite the (learned) position embedding with a 2-D sin-cos one (MAE-style init, then trained).

    Why: with std .02 the position signal is tiny next to the patch embeddings, and mean pooling then sees
    little more than the average patch; a unit-scale position code lets the blocks use layout from step one.
    """
    import torch
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    pe = build_sincos2d_pos_embed(list(vit.pretrain_grid), vit.embed_dim)
    with torch.no_grad():
        vit.pos_embed.copy_(pe.reshape(vit.pos_embed.shape))


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Timer:
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def pretrain(
    preset: str = "vit_cpu",
    *,
    out: str | Path,
    image_size: int | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = PretrainConfig.batch_size,
    lr: float = PretrainConfig.lr,
    seed: int = 0,
    threads: int | None = None,
    time_budget_s: float | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Pretrain the preset's ``PlainViT`` as a classifier and write ``out`` (+ head file + ``out.json``).

    ``options`` are the remaining ``PretrainConfig`` fields (``n_train``, ``n_val``, ``warmup_steps``,
    ``weight_decay``, ``min_lr``, ``label_smoothing``, ``augment``, ``crop_scale``, ``drop_path_rate``,
    ``cache_dir``, ...). Returns the sidecar dict: source, preset, image_size, top1, steps, seconds, seed,
    config, output_sha256, head file + sha256, timings and run metadata.
    """
    values = dict(
        preset=preset,
        image_size=image_size,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        threads=threads,
        time_budget_s=time_budget_s,
        **options,
    )
    # Unknown options get a did-you-mean; values are type-checked against the annotations but kept as given
    # (an int lr stays an int in the sidecar).
    cfg = build_dataclass(
        PretrainConfig, values, "pretrain()", what="pretrain option", convert=False, message=type_message
    )
    return run(cfg, out)


def run(cfg: PretrainConfig, out: str | Path) -> dict[str, Any]:
    """``pretrain`` with a ready config (see there)."""
    out = Path(out)
    require(out.suffix == ".safetensors", f"out must be a .safetensors file, got {out}")
    vkw = validate(cfg)
    import torch

    old_threads = torch.get_num_threads()
    try:
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        # While the loss sits on its initial plateau, many gradients and Adam second moments are denormal
        # floats, which x86 CPUs process very slowly; without the flush the first 100 steps took ~2x longer.
        torch.set_flush_denormal(True)
        # fork_rng: the run seeds torch's global RNG (model init, drop-path) without disturbing the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return _run(cfg, vkw, out)
    finally:
        torch.set_num_threads(old_threads)
        torch.set_flush_denormal(False)  # torch's default (there is no getter to restore an earlier state)


def _run(cfg: PretrainConfig, vkw: dict[str, Any], out: Path) -> dict[str, Any]:
    import torch

    from vit_adapter.engine.optim import listed_param_groups, warmup_cosine_lr
    from vit_adapter.engine.progress import log_progress
    from vit_adapter.engine.rundir import run_metadata
    from vit_adapter.engine.weights import _save_safetensors, sha256_file, sidecar_path
    from vit_adapter.models.vit import PlainViT
    from vit_adapter.utils.io import atomic_write_json, plain_data

    timer = _Timer()
    cpu0 = time.process_time()
    size = vkw["pretrain_size"]
    objective = OBJECTIVE_REGISTRY[cfg.objective](cfg, vkw)
    x_train, y_train, source = objective.load("train", cfg.n_train)
    x_val, y_val, _ = objective.load("val", cfg.n_val)
    render_s = timer.elapsed()
    log.info("rendered %d train + %d val images at %d px in %.1f s", cfg.n_train, cfg.n_val, size, render_s)

    vit = PlainViT(**vkw, window_attn=False)
    init_sha256 = None
    if cfg.init_from is not None:
        from vit_adapter.engine.weights import load_weights
        from vit_adapter.models.vit import load_vit_state_dict

        report = load_vit_state_dict(vit, load_weights(cfg.init_from))  # checks the file against its sidecar
        require(not report.missing, f"init_from {cfg.init_from} lacks ViT weights: {', '.join(report.missing)}")
        init_sha256 = sha256_file(cfg.init_from)
    elif cfg.pos_init == "sincos":
        init_sincos_pos_embed(vit)
    head = build_head(vkw["embed_dim"], objective.num_classes)
    vit.train()
    head.train()
    opt = torch.optim.AdamW(listed_param_groups([vit, head], cfg.weight_decay), lr=cfg.lr, betas=(0.9, cfg.beta2))
    params = [p for g in opt.param_groups for p in g["params"]]
    total = cfg.resolved_steps()
    gen = torch.Generator().manual_seed(cfg.seed)  # data order and augmentation
    n = cfg.n_train
    bs = min(cfg.batch_size, n)
    batches_per_epoch = max(1, n // bs)  # drop_last: equal batch sizes keep the step cost uniform

    step, epoch, perm = 0, 0, torch.randperm(n, generator=gen)
    time_limited = False
    history: list[dict[str, float]] = []
    run_loss = run_correct = run_seen = run_counted = 0.0
    t_train = time.perf_counter()
    while step < total:
        if step > 0 and step % batches_per_epoch == 0:
            epoch += 1
            perm = torch.randperm(n, generator=gen)
        progress = step / total
        if cfg.time_budget_s is not None and step > 0:
            # Keep time for the final evaluation (a forward pass costs about a third of a training step); if
            # the run is slower than the step plan, the schedule follows wall time instead (non-deterministic).
            per_img = (time.perf_counter() - t_train) / (step * bs)
            usable = cfg.time_budget_s - render_s - per_img / 3 * cfg.n_val - 2.0
            time_frac = (time.perf_counter() - t_train + per_img * bs) / max(usable, 1e-9)
            if time_frac >= 1.0:
                break
            if time_frac > progress:
                time_limited, progress = True, time_frac
        lr = warmup_cosine_lr(progress, step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = perm[(step % batches_per_epoch) * bs : (step % batches_per_epoch + 1) * bs]
        xb = x_train[idx].float()
        if cfg.augment == "crop_flip":
            xb = batch_augment(xb, gen, cfg.crop_scale, cfg.crop_ratio)
        yb = y_train[idx]
        if cfg.augment == "flip":
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            yb = objective.flip_targets(yb, flip, vit.pretrain_grid)
        if cfg.invert_prob > 0:  # drawn only when used, so runs without it keep their random stream
            inv = torch.rand(len(idx), generator=gen) < cfg.invert_prob
            xb = torch.where(inv[:, None, None, None], 255.0 - xb, xb)
        loss, hits, counted = objective.loss_and_hits(vit, head, normalize(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        run_loss += float(loss.detach()) * len(yb)
        run_correct += hits
        run_seen += len(yb)
        run_counted += counted
        if step % cfg.log_every == 0 or step == total:
            rec = {
                "step": step,
                "epoch": round(step * bs / n, 3),
                "lr": lr,
                "train_loss": round(run_loss / run_seen, 4),
                "train_top1": round(run_correct / max(run_counted, 1), 4),
                "seconds": round(timer.elapsed(), 1),
            }
            history.append(rec)
            now = time.perf_counter() - t_train
            log_progress(step, total, rec["train_loss"], lr, now / step, now / step * (total - step))
            run_loss = run_correct = run_seen = run_counted = 0.0
    train_s = time.perf_counter() - t_train

    t_eval = time.perf_counter()
    top1 = objective.evaluate(vit, head, x_val, y_val, cfg.eval_batch_size)
    eval_s = time.perf_counter() - t_eval

    _save_safetensors(vit.state_dict(), out)
    hpath = head_path(out)
    _save_safetensors(head.state_dict(), hpath)
    seconds = timer.elapsed()
    result: dict[str, Any] = {
        "source": "pretrain",
        "preset": cfg.preset,
        "image_size": size,
        "top1": top1,
        "top1_split": objective.describe_val(),
        "objective": cfg.objective,
        "init_sha256": init_sha256,
        "num_classes": objective.num_classes,
        "steps": step,
        "planned_steps": total,
        "epochs_seen": round(step * bs / n, 3),
        "time_limited": time_limited or step < total,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1),  # this process; wall > cpu when cores are shared
        "timings_s": {"render": round(render_s, 1), "train": round(train_s, 1), "eval": round(eval_s, 1)},
        "seed": cfg.seed,
        "threads": torch.get_num_threads(),
        "config": plain_data(asdict(cfg)),
        "vit_kwargs": vkw,
        "silhouettes": source,
        "render_version": objective.render_version,
        "n_params_vit": int(sum(p.numel() for p in vit.parameters())),
        "output_sha256": sha256_file(out),
        "head_file": hpath.name,
        "head_sha256": sha256_file(hpath),
        "history": history,
        "metadata": run_metadata(),
    }
    atomic_write_json(sidecar_path(out), result)
    log.info("pretrain done: top1 %.4f after %d steps in %.0f s -> %s", top1, step, seconds, out)
    return result


def load_pretrained(out: str | Path) -> tuple[PlainViT, nn.Module, dict[str, Any]]:
    """Rebuild (vit, head, sidecar) from a pretraining output, e.g. to re-measure its top-1."""
    import json

    from safetensors.torch import load_file

    from vit_adapter.engine.weights import load_weights, sidecar_path
    from vit_adapter.models.vit import PlainViT, load_vit_state_dict

    out = Path(out)
    side = sidecar_path(out)
    require(side.is_file(), f"no sidecar {side} next to {out}")
    meta = json.loads(side.read_text(encoding="utf-8"))
    vit = PlainViT(**meta["vit_kwargs"])
    report = load_vit_state_dict(vit, load_weights(out))
    require(not report.missing, f"{out} lacks ViT weights: {', '.join(report.missing)}")
    head = build_head(meta["vit_kwargs"]["embed_dim"], meta.get("num_classes", NUM_CLASSES))
    head.load_state_dict(load_file(str(out.with_name(meta["head_file"]))))
    return vit.eval(), head.eval(), meta


# ---------------------------------------------------------------------------------------------------------
# CLI glue (wired into `vit-adapter pretrain` by vit_adapter/cli.py)
# ---------------------------------------------------------------------------------------------------------


def add_pretrain_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = PretrainConfig()
    parser.add_argument("--preset", default=d.preset, help="ViT preset (vit_cpu, vit_t, ...; vit_adapter_* too)")
    parser.add_argument("--objective", choices=OBJECTIVES, default=d.objective, help="what the ViT learns")
    parser.add_argument("--scene-difficulty", type=float, default=d.scene_difficulty, help="scene_tokens generator")
    parser.add_argument("--render-workers", type=int, default=d.render_workers, help="processes that render images")
    parser.add_argument("--init-from", default=None, help="start from the ViT of an earlier pretraining output")
    parser.add_argument("--data-seed", type=int, default=d.data_seed, help="rendering seed of the images")
    parser.add_argument(
        "--image-size", type=int, default=None, help="pretraining resolution (default: 48 for the CPU preset)"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {DEFAULT_STEPS})")
    group.add_argument("--epochs", type=float, default=None, help="epochs over --n-train (instead of --steps)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--n-train", type=int, default=d.n_train, help=f"training images (<= {N_TRAIN_MAX})")
    parser.add_argument("--n-val", type=int, default=d.n_val, help=f"held-out images for top-1 (<= {N_VAL_MAX})")
    parser.add_argument("--augment", choices=AUGMENTS, default=d.augment)
    parser.add_argument(
        "--item-scale", type=float, nargs=2, default=d.item_scale, metavar=("LO", "HI"), help="item side / image side"
    )
    parser.add_argument("--placement", choices=("centre", "anywhere"), default=d.placement, help="item position")
    parser.add_argument("--invert-prob", type=float, default=d.invert_prob, help="photometric inversion rate")
    parser.add_argument("--pos-init", choices=POS_INITS, default=d.pos_init, help="position-embedding init")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", type=Path, default=Path("weights/vit_cpu_pretrained.safetensors"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; the schedule shrinks to fit")
    parser.add_argument("--cache-dir", default="data/pretrain_cache", help="npz cache of the rendered images")
    parser.add_argument("--no-cache", action="store_true", help="render in memory only")
    return parser


def run_pretrain_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO)
    return pretrain(
        args.preset,
        out=args.out,
        objective=args.objective,
        scene_difficulty=args.scene_difficulty,
        render_workers=args.render_workers,
        init_from=args.init_from,
        data_seed=args.data_seed,
        image_size=args.image_size,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        time_budget_s=args.time_budget,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        n_train=args.n_train,
        n_val=args.n_val,
        augment=args.augment,
        item_scale=tuple(args.item_scale),
        placement=args.placement,
        pos_init=args.pos_init,
        invert_prob=args.invert_prob,
        cache_dir=None if args.no_cache else args.cache_dir,
    )
