"""AdamW with the official parameter groups and the warmup + step/poly schedules (reference §2); the ViT
pretraining (engine/pretrain.py) takes its parameter groups and its warmup + cosine schedule from here too."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from .config import OptimConfig

_BLOCK = re.compile(r"(?:^|\.)vit\.blocks\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)vit\.(patch_embed|pos_embed)")


def layer_id(name: str, num_layers: int) -> int:
    """BEiT/mmseg layer-wise decay ids: patch/pos embedding 0, block i → i+1, everything else (adapter,
    heads) num_layers+1 so it trains at the full rate."""
    if _EMBED.search(name):
        return 0
    m = _BLOCK.search(name)
    return int(m.group(1)) + 1 if m else num_layers + 1


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    no_decay: Sequence[str],
    layer_decay: float | None = None,
    num_layers: int = 12,
    no_decay_rule: str = "names",
) -> list[dict]:
    """One group per (decay, layer) pair. No weight decay on names containing any ``no_decay`` substring —
    a substring match, as the official configs, so γ and LayerScale gammas *do* get decay (reference §2)."""
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_decay_rule == "ndim_or_listed":  # timm's rule: 1-D tensors and the exact names listed (no_weight_decay())
            decay = not (p.ndim <= 1 or name in no_decay)
        elif no_decay_rule == "ndim_or_bias":
            # The official layer-decay constructor: 1-D tensors (norms, biases, gamma, level_embed) and ".bias";
            # its extra name check for pos_embed never matches the prefixed names, so pos_embed *is* decayed.
            decay = not (p.ndim == 1 or name.endswith(".bias"))
        else:
            decay = not any(s in name for s in no_decay)
        lid = layer_id(name, num_layers) if layer_decay is not None else 0
        scale = layer_decay ** (num_layers + 1 - lid) if layer_decay is not None else 1.0
        g = groups.setdefault(
            (decay, lid), {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        )
        g["params"].append(p)
        g["names"].append(name)
    out = []
    for g in groups.values():
        g["lr"] = lr * g["lr_scale"]
        out.append(g)
    return out


def listed_param_groups(modules: Sequence[nn.Module], weight_decay: float) -> list[dict]:
    """The pretraining's two groups (decayed first): no weight decay on biases, norms, LayerScale gammas (all 1-D)
    and what each module names in its ``no_weight_decay()`` (timm's convention: the ViT's position embedding)."""
    skip = [f"{i}.{n}" for i, m in enumerate(modules) if hasattr(m, "no_weight_decay") for n in m.no_weight_decay()]
    groups = param_groups(
        nn.ModuleList(modules), lr=0.0, weight_decay=weight_decay, no_decay=skip, no_decay_rule="ndim_or_listed"
    )
    return [
        {"params": g["params"], "weight_decay": g["weight_decay"]}
        for g in sorted(groups, key=lambda g: not g["weight_decay"])
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, num_layers: int) -> torch.optim.AdamW:
    groups = param_groups(
        model,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        no_decay=cfg.no_decay,
        layer_decay=cfg.layer_decay,
        num_layers=num_layers,
        no_decay_rule=cfg.no_decay_rule,
    )
    for g in groups:
        del g["names"]  # names are for inspection only; the optimizer state dict must stay tensor-free
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_factor(it: int, cfg: OptimConfig, max_iters: int) -> float:
    """Multiplier of the base lr at iteration ``it`` (0-based): mmcv-style linear warmup times step/poly."""
    if cfg.schedule == "step":
        regular = cfg.gamma ** sum(it >= m for m in cfg.milestones)
    else:  # poly towards min_lr (mmcv PolyLrUpdaterHook)
        ratio = cfg.min_lr / cfg.lr if cfg.lr else 0.0
        regular = (1 - ratio) * (1 - it / max_iters) ** cfg.power + ratio
    if it < cfg.warmup_iters:
        k = (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
        return regular * (1 - k)
    return regular


def warmup_cosine_lr(progress: float, step: int, *, lr: float, min_lr: float, warmup_steps: int) -> float:
    """The pretraining schedule (an absolute lr, set on every group each step): linear warmup over
    ``warmup_steps`` then cosine from ``lr`` to ``min_lr`` over ``progress`` in [0, 1] (which may follow wall
    time, so it is not a function of the step alone as ``lr_factor`` is)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    cos = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return warm * (min_lr + (lr - min_lr) * cos)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_iters: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg, max_iters))
