"""Mixed precision: CUDA autocast in ``train.amp_dtype`` and, for fp16, the dynamic loss scaler."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from .config import Config


def autocast(cfg: Config, device: torch.device) -> AbstractContextManager:
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
