"""Checkpoints: save, load (checking the architecture) and find the newest readable one; RNG states.

A checkpoint ``checkpoints/iter_N.pt`` is written to a temp file and renamed into place; then its sha256 goes
into the sidecar ``iter_N.pt.sha256`` (``sha256sum -c`` reads it) and the pointer ``checkpoints/latest`` (the
newest checkpoint's file name) is updated, each atomically. Loading checks the sidecar first, so a bit flipped
on disk after the save is found and resume falls back to the previous checkpoint instead of training on (or
diverging from) damaged weights. A checkpoint renamed into place whose sidecar was never written (the process
was killed in between) still loads; its weights must then at least be finite, since no non-finite state is
ever saved. A save that fails (a full disk) removes what it wrote and names the checkpoint, never its temp file.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..utils.io import atomic_open, atomic_write_text, sha256_file
from .rundir import RunDir

if TYPE_CHECKING:
    from .distributed import Dist


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


class CorruptCheckpointError(UnreadableCheckpointError):
    """A checkpoint whose bytes differ from its digest sidecar, or that holds non-finite state."""


DIGEST_SUFFIX = ".sha256"
LATEST_FILE = "latest"  # in checkpoints/: the newest complete checkpoint's file name, one line


def digest_path(path: Path) -> Path:
    """The sidecar holding `path`'s sha256, in ``sha256sum`` format."""
    return path.with_name(path.name + DIGEST_SUFFIX)


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint ``folder/latest`` names (when it exists), else the newest ``iter_*.pt``, else None."""
    try:
        named = folder / (folder / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        named = None
    if named is not None and named.parent == folder and named.is_file():
        return named
    found = sorted(folder.glob("iter_*.pt")) if folder.is_dir() else []  # zero-padded: sorted by iteration
    return found[-1] if found else None


def _verify_digest(path: Path) -> None:
    sidecar = digest_path(path)
    try:
        expected = sidecar.read_text(encoding="utf-8").split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return  # no sidecar (written before sidecars existed, or killed before it): the finiteness check stays
    if sha256_file(path) != expected:
        raise CorruptCheckpointError(
            f"cannot read checkpoint {path}: its bytes do not match the sha256 in {sidecar.name} (damaged after "
            "it was saved)"
        )


def _first_non_finite_state(ckpt: dict[str, Any]) -> str | None:
    """The first model or optimizer tensor holding NaN/inf: the trainer never saves such a state."""
    tensors: list[tuple[str, Any]] = list(ckpt.get("model", {}).items())
    for pid, state in ckpt.get("optimizer", {}).get("state", {}).items():
        tensors += [(f"optimizer state {pid}.{k}", v) for k, v in state.items()]
    for name, t in tensors:
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def newest_readable_checkpoint(run: RunDir, model: nn.Module) -> dict[str, Any] | None:
    """The newest checkpoint of `run` that loads, or None. An unreadable one (e.g. truncated by a full disk or
    another tool) or one that fails its digest is skipped with a warning: training re-reaches its iteration
    and overwrites it."""
    for _, path in reversed(run.checkpoints()):
        try:
            return load_checkpoint(path, model)
        except UnreadableCheckpointError as err:
            print(f"warning: {err}; trying the previous checkpoint", file=sys.stderr)
    return None


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    _verify_digest(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        detail = " ".join(str(err).split())[:200]
        raise UnreadableCheckpointError(f"cannot read checkpoint {path}: {detail}") from err
    if isinstance(ckpt, dict) and (bad := _first_non_finite_state(ckpt)) is not None:
        raise CorruptCheckpointError(f"cannot read checkpoint {path}: it holds non-finite values in {bad} (damaged)")
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
    save_checkpoint_file(ckpt, run.checkpoint_path(it))
    prune_checkpoints(run, keep=2)


def save_checkpoint_file(ckpt: dict[str, Any], path: Path) -> Path:
    """Save `ckpt` atomically, then its digest sidecar, then the ``latest`` pointer.

    Any failure (a full disk) removes the new checkpoint and sidecar, so the previous checkpoint stays the
    newest one and ``latest`` still names it; the OSError names `path` (torch reports a failed write as a
    RuntimeError whose context holds the OSError)."""
    sidecar = digest_path(path)
    try:
        with atomic_open(path, "wb") as fh:
            try:
                torch.save(ckpt, fh)
            except RuntimeError as err:
                if (os_err := _os_error_of(err, path)) is None:
                    raise
                raise os_err from err
        try:
            atomic_write_text(sidecar, f"{sha256_file(path)}  {path.name}\n")
            atomic_write_text(path.parent / LATEST_FILE, path.name + "\n")
        except BaseException:
            path.unlink(missing_ok=True)
            sidecar.unlink(missing_ok=True)
            raise
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
    return path


def _os_error_of(err: RuntimeError, path: Path) -> OSError | None:
    """The OSError behind torch's failed write, else ENOSPC when the file system is full, else None."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError):
            return cause
        cause = cause.__cause__ or cause.__context__
    if shutil.disk_usage(path.parent).free == 0:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def prune_checkpoints(run: RunDir, keep: int) -> None:
    """All but the newest `keep` checkpoints deleted, and the sidecars of deleted ones with them."""
    run.prune_checkpoints(keep=keep)
    if run.checkpoint_dir.is_dir():
        for sidecar in run.checkpoint_dir.glob(f"iter_*.pt{DIGEST_SUFFIX}"):
            if not sidecar.with_name(sidecar.name.removesuffix(DIGEST_SUFFIX)).exists():
                sidecar.unlink(missing_ok=True)
