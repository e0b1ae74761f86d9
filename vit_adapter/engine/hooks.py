"""What the training loop calls at fixed points: checkpointing, evaluation, log rows, signal handling and the
divergence guard, each a ``Hook``; callers add their own (``Callbacks``, or any ``Hook`` subclass).

The loop (``engine/trainer.py``) calls, in list order, ``before_train`` once, ``after_loss`` after each
micro-batch's forward (before its backward), ``after_step`` after each optimiser step and ``after_train`` once
however the loop ends. A hook reads and writes the loop's state (``Loop``).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..utils.jsonl import append_row, keep_rows
from .build import data_root
from .checkpoint import _save_checkpoint
from .config import Config
from .costs import peak_memory_mb
from .datastamp import DataStamp
from .distributed import any_rank, barrier
from .evaluation import evaluate
from .progress import format_iteration, format_metrics, log
from .rundir import RunDir

if TYPE_CHECKING:
    from .trainer import Loop


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


class Hook:
    def before_train(self, loop: Loop) -> None:
        pass

    def after_loss(self, loop: Loop, losses: dict[str, torch.Tensor]) -> None:
        pass

    def after_step(self, loop: Loop) -> None:
        pass

    def after_train(self, loop: Loop) -> None:
        pass


def _at(done: int, interval: int, loop: Loop) -> bool:
    """Whether an every-`interval` job runs after iteration `done`: an interval of 0 is off, and the last
    iteration always logs, evaluates and checkpoints."""
    return (interval > 0 and done % interval == 0) or done == loop.cfg.train.max_iters


@dataclass
class Callbacks(Hook):
    """Plain functions at deterministic points (no sleeps, no timing): the sweep's pruning and progress, tests."""

    after_iteration: Callable[[int], None] | None = None  # called with the 1-based iteration just finished
    after_eval: Callable[[int, dict[str, Any]], None] | None = None  # (iteration, metrics) on rank 0; may raise

    def after_step(self, loop: Loop) -> None:
        if self.after_iteration is not None:
            self.after_iteration(loop.done)


class LogRows(Hook):
    """Every ``train.log_interval`` iterations: one row in ``log.jsonl`` (rank 0) and one human-readable line."""

    def before_train(self, loop: Loop) -> None:
        self.file = loop.run.path("log.jsonl") if loop.run is not None else None
        if self.file is not None and self.file.exists():  # drop rows logged after the checkpoint we resume from
            keep_rows(self.file, lambda row: row["iter"] <= loop.start_it)  # a torn last line: dropped, one warning
        self.t_loop = self.t_window = time.perf_counter()  # wall clock for s/it and ETA (evaluations included)
        self.it_window = loop.start_it

    def after_step(self, loop: Loop) -> None:
        done, total = loop.done, loop.cfg.train.max_iters
        if not _at(done, loop.cfg.train.log_interval, loop):
            return
        row = {"iter": done, "epoch": loop.epoch, "lr": loop.optimizer.param_groups[0]["lr"]}
        row |= {k: round(float(v.detach()), 6) for k, v in loop.losses.items()}
        loop.log_rows.append(row)
        if self.file is not None:
            append_row(self.file, row)  # whole rows only, even on a full disk
        loop.bar.set_postfix(loss=f"{row['loss']:.4f}")
        if loop.d.main:  # numbers already computed above: no extra sync, no RNG draw
            now = time.perf_counter()
            s_per_it = (now - self.t_window) / max(1, done - self.it_window)
            eta = (now - self.t_loop) / max(1, done - loop.start_it) * (total - done)
            mem = peak_memory_mb(loop.device)
            log.info(format_iteration(done, total, row["loss"], row["lr"], s_per_it, eta, mem))
            self.t_window, self.it_window = now, done


def _first_non_finite(model: nn.Module) -> str | None:
    """Name of the first parameter or buffer holding NaN/inf (a finite loss can still leave such weights)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


class Checkpointer(Hook):
    """Every ``train.checkpoint_interval`` iterations a checkpoint, never of non-finite weights. It runs before
    the evaluation of the same iteration, so an evaluation that fails finds the iteration's state on disk."""

    def after_step(self, loop: Loop) -> None:
        if _at(loop.done, loop.cfg.train.checkpoint_interval, loop):
            if (bad := _first_non_finite(loop.model)) is not None:  # never checkpoint a diverged state
                raise DivergedError(f"weights {bad} are not finite", loop.done, loop.cfg)
            self.save(loop)

    @staticmethod
    def save(loop: Loop) -> None:
        _save_checkpoint(
            loop.run, loop.model, loop.optimizer, loop.scheduler, loop.done, loop.history, loop.d, scaler=loop.scaler
        )


class Evaluator(Hook):
    """Every ``train.eval_interval`` iterations the validation metrics (every rank), appended to the history and
    handed to the ``Callbacks.after_eval`` of the loop. A checkpoint of the same iteration was written without
    them: it is written again with them, so the last checkpoint holds what it always held. A run resumed from a
    checkpoint whose evaluation did not finish evaluates first."""

    def __init__(self, callbacks: list[Callbacks]) -> None:
        self.callbacks = callbacks

    def before_train(self, loop: Loop) -> None:
        self.data_stamp = DataStamp.take(data_root(loop.cfg))  # evaluations check that the data is still this tree
        done = loop.done
        if done and _at(done, loop.cfg.train.eval_interval, loop) and not any(h["iter"] == done for h in loop.history):
            self.after_step(loop)

    def after_step(self, loop: Loop) -> None:
        done, cfg = loop.done, loop.cfg
        if not _at(done, cfg.train.eval_interval, loop):
            return
        self.data_stamp.check()  # never evaluate on a dataset replaced mid-run
        t_eval = time.perf_counter()
        metrics = evaluate(loop.model, loop.val_set, loop.collate, cfg, loop.device, loop.d, progress=loop.progress)
        if loop.d.main:
            seconds = time.perf_counter() - t_eval
            log.info("eval iter %d/%d  %s  (%.1f s)", done, cfg.train.max_iters, format_metrics(metrics), seconds)
            loop.history.append({"iter": done, **metrics})
            for c in self.callbacks:
                if c.after_eval is not None:
                    c.after_eval(done, loop.history[-1])
        barrier(loop.d)
        if _at(done, cfg.train.checkpoint_interval, loop):
            Checkpointer.save(loop)


class DivergenceGuard(Hook):
    """A non-finite loss stops the run, decided by all ranks together (one rank's inf must not leave the others
    waiting in the backward's all-reduce). Under fp16 loss scaling it does not: the scaler skips that step and
    lowers the scale, as mmcv's Fp16OptimizerHook (GradScaler) does."""

    def after_loss(self, loop: Loop, losses: dict[str, torch.Tensor]) -> None:
        if loop.scaler is not None:
            return
        loss = losses["loss"]
        bad = not bool(torch.isfinite(loss))
        if any_rank(bad, loop.d):
            value = loss.item() if bad else math.nan
            where = "" if bad else " on another rank"
            raise DivergedError(f"loss is {value}{where}", loop.done + 1, loop.cfg)


class SignalStop(Hook):
    """SIGTERM/SIGINT finish the current iteration, then stop (the last checkpoint stays for resume)."""

    def before_train(self, loop: Loop) -> None:
        self.signum: int | None = None
        self.old: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):  # noqa: ARG001
            self.signum = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            self.old[sig] = signal.signal(sig, handler)

    def after_step(self, loop: Loop) -> None:
        if self.signum is not None:
            raise StopTraining(_stop_message(loop.out, loop.done, self.signum), signum=self.signum)

    def after_train(self, loop: Loop) -> None:
        for sig, h in self.old.items():
            signal.signal(sig, h)


def _stop_message(out: str | Path, done: int, signum: int | None) -> str:
    name = signal.Signals(signum).name if signum else "a hook"
    ckpts = RunDir(Path(out)).checkpoints()
    if not ckpts:
        return f"interrupted by {name} after iteration {done} before the first checkpoint; rerunning starts over"
    return (
        f"interrupted by {name} after iteration {done}; {RunDir(Path(out)).work} keeps the checkpoint of "
        f"iteration {ckpts[-1][0]}: resume with the same command"
    )


def default_hooks(extra: list[Hook]) -> list[Hook]:
    """The loop's hooks in call order: the iteration's log row, its checkpoint, then its evaluation (so the
    state is on disk first); the caller's hooks; the divergence guard (after a caller's loss hook); the signal
    stop last (after every other hook has seen the iteration)."""
    callbacks = [h for h in extra if isinstance(h, Callbacks)]
    return [LogRows(), Checkpointer(), Evaluator(callbacks), *extra, DivergenceGuard(), SignalStop()]
