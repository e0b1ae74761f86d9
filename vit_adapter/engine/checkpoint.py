"""Checkpoints: save (every rank's RNG state gathered), load (checked against the model's architecture), and the
newest readable one of a run directory for resume."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .rundir import RunDir, atomic_torch_save

if TYPE_CHECKING:
    from .trainer import Dist


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


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint file that torch cannot load (truncated, corrupted)."""


def newest_readable_checkpoint(run: RunDir, model: nn.Module) -> dict[str, Any] | None:
    """The newest checkpoint of `run` that loads, or None. An unreadable one (e.g. truncated by a full disk or
    another tool) is skipped with a warning: training re-reaches its iteration and overwrites it."""
    import sys

    for _, path in reversed(run.checkpoints()):
        try:
            return load_checkpoint(path, model)
        except UnreadableCheckpointError as err:
            print(f"warning: {err}; trying the previous checkpoint", file=sys.stderr)
    return None


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        detail = " ".join(str(err).split())[:200]
        raise UnreadableCheckpointError(f"cannot read checkpoint {path}: {detail}") from err
    want = architecture_signature(model)
    got = ckpt.get("architecture", {})
    if got != want:
        diff = sorted(set(got) ^ set(want)) or sorted(k for k in want if got.get(k) != want[k])
        raise CheckpointError(f"checkpoint {path} is from another architecture (first differing keys: {diff[:4]})")
    return ckpt


def _save_checkpoint(
    run: RunDir | None, model, optimizer, scheduler, it: int, history: list, d: Dist, *, scaler=None
) -> None:
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
    if scaler is not None:  # fp16: the dynamic loss scale is training state too (exact resume)
        ckpt["scaler"] = scaler.state_dict()
    atomic_torch_save(ckpt, run.checkpoint_path(it))
    run.prune_checkpoints(keep=2)
