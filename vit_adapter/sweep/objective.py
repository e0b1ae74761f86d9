"""What a trial computes: runs trained or loaded (trials and the reference points) and the trial objective (its
parameters fixed by sweep/batches.py, its pruning decided there too)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna

from ..engine.config import Config
from ..engine.rundir import METRICS_FILE, RunDir, identity_marker, recorded_identity, reuse_or_reset
from .batches import SLOT_ATTR, SlotPruner, suggest
from .locks import FileLock, WorkerLocks, _trial_lock_path
from .plan import Plan
from .settings import FAILURE_ATTR, GAMMA, KILL_ENV, RATIO, REFERENCE_POINTS, TrialFailed
from .storage import root_number

log = logging.getLogger(__package__)  # "vit_adapter.sweep", as before the split


def _finished(run: Path) -> bool:
    return RunDir(run).status() == "finished"


def _discard_partial(run: Path) -> None:
    RunDir(run).discard(finished=False)


def train_or_load(
    cfg: Config,
    run: Path,
    *,
    identity: str | None = None,
    after_eval: Callable[[int, dict[str, Any]], None] | None = None,
    after_iteration: Callable[[int], None] | None = None,
    keep_checkpoints: bool = False,
) -> dict[str, Any]:
    """metrics.json of a finished run (cached), else train: resuming `<run>.partial` when it exists. With
    `identity` (Plan.run_identity), a run trained for another identity is discarded first, never reused."""
    from ..engine.hooks import Callbacks
    from ..engine.trainer import train

    if identity is not None:  # a run trained for another identity is discarded, never reused
        reuse_or_reset(run, identity, record=True)
    if _finished(run):
        result = json.loads((run / METRICS_FILE).read_text(encoding="utf-8"))
        if after_eval is not None:  # replay the evaluations, so a retried trial reports the same steps
            for row in result.get("history", []):
                after_eval(row["iter"], row)
        return result
    # The trainer resumes `<run>.partial` only when its config matches (execution keys such as threads aside).
    result = train(cfg, run, resume=True, hooks=[Callbacks(after_iteration, after_eval)], progress=False)
    if not keep_checkpoints:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return result


def _metric_of(result: Mapping[str, Any], metric: str, where: str) -> float:
    value = result.get("final", {}).get(metric)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise TrialFailed(f"{where}: metric {metric!r} is {value!r} (final keys: {sorted(result.get('final', {}))})")
    return float(value)


def _kill_trigger() -> tuple[int, int] | None:
    raw = os.environ.get(KILL_ENV)
    if not raw:
        return None
    trial, it = raw.split(":")
    return int(trial), int(it)


def run_reference(plan: Plan, name: str, seed: int, *, blocking: bool) -> dict[str, Any] | None:
    """Train (or load) one reference point for one seed. With blocking=False, skip it when another worker
    holds it. Returns its metrics, or None when skipped."""
    run = plan.reference_dir(name) / f"seed_{seed}"
    cfg = plan.config(seed, REFERENCE_POINTS[name])
    identity = plan.run_identity(cfg)
    if _finished_as(run, identity):
        return json.loads((run / METRICS_FILE).read_text(encoding="utf-8"))
    lock = FileLock(plan.study_dir / "locks" / f"reference_{name}_seed{seed}.lock")
    if not lock.acquire(blocking=blocking):
        return None
    try:
        log.info("reference %s, seed %d", name, seed)
        return train_or_load(cfg, run, identity=identity, keep_checkpoints=plan.settings.keep_checkpoints)
    finally:
        lock.release()


def _finished_as(run: Path, identity: str) -> bool:
    """A finished run trained for `identity` (a stale one does not count; only the sweep's marker is trusted,
    since the trainer's own identity lacks the study inputs)."""
    return _finished(run) and identity_marker(run).is_file() and recorded_identity(run, finished=True) == identity


def collect_references(plan: Plan, *, run_missing: bool) -> dict[str, Any]:
    """reference_points.json's content; `run_missing` trains what no worker has finished."""
    out: dict[str, Any] = {}
    for name, point in REFERENCE_POINTS.items():
        per_seed: dict[str, float | None] = {}
        finals: dict[str, Any] = {}
        for seed in plan.settings.seeds:
            result = run_reference(plan, name, seed, blocking=True) if run_missing else None
            run = plan.reference_dir(name) / f"seed_{seed}"
            if result is None and _finished_as(run, plan.run_identity(plan.config(seed, point))):
                result = json.loads((run / METRICS_FILE).read_text(encoding="utf-8"))
            if result is None:
                per_seed[str(seed)] = None
                continue
            per_seed[str(seed)] = _metric_of(result, plan.metric, f"reference {name} seed {seed}")
            finals[str(seed)] = {k: v for k, v in result["final"].items() if not isinstance(v, list)}
        values = [v for v in per_seed.values() if v is not None]
        out[name] = {
            "params": dict(point),
            "per_seed": per_seed,
            "mean": sum(values) / len(values) if len(values) == len(per_seed) else None,
            "final_per_seed": finals,
            "run_dir": str(plan.reference_dir(name)),
        }
    return out


def _references_doc(plan: Plan, *, run_missing: bool) -> dict[str, Any]:
    return {
        "metric": plan.metric,
        "seeds": list(plan.settings.seeds),
        "points": collect_references(plan, run_missing=run_missing),
    }


def _objective(plan: Plan, locks: WorkerLocks) -> Callable[[optuna.Trial], float]:
    s = plan.settings
    kill = _kill_trigger()

    def objective(trial: optuna.Trial) -> float:
        locks.trial = FileLock(_trial_lock_path(plan, trial.number))
        locks.trial.acquire()  # released by the callback after `tell` (or when the worker exits)
        locks.turnstile.release()  # the trial exists and is locked: others may start theirs
        return _run_trial(trial)

    def _run_trial(trial: optuna.Trial) -> float:
        gamma, ratio = suggest(trial)  # the slot's enqueued values: the sampler of this study never draws
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        root = root_number(frozen)
        reported = set(frozen.intermediate_values)  # a retry inherits its original's reports
        pruner = SlotPruner(plan, trial.study, frozen, int(frozen.user_attrs[SLOT_ATTR]))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("run_dir", str(plan.trial_dir(root)))
        per_seed: list[float] = []
        for i, seed in enumerate(s.seeds):
            run = plan.trial_dir(root) / f"seed_{seed}"
            cfg = plan.config(seed, {GAMMA: gamma, RATIO: ratio, "with_cffn": True})

            def after_eval(it: int, metrics: dict[str, Any], i: int = i, seed: int = seed) -> None:
                value = metrics.get(plan.metric)
                step = i * plan.max_iters + it
                if not isinstance(value, int | float):
                    return
                if step not in reported:
                    trial.report(float(value), step)
                    reported.add(step)
                # Decided on the reported values of earlier batches only (never on who finished first); a
                # finished trial is never pruned.
                if step < len(s.seeds) * plan.max_iters and pruner.should_prune(step, float(value)):
                    raise optuna.TrialPruned(f"{plan.metric} = {value} at seed {seed}, iteration {it}")

            def after_iteration(it: int, i: int = i) -> None:
                if kill is not None and i == 0 and (trial.number, it) == kill:
                    os.kill(os.getpid(), signal.SIGKILL)  # test-only: die like an OOM-killed worker

            try:
                result = train_or_load(
                    cfg,
                    run,
                    identity=plan.run_identity(cfg),
                    after_eval=after_eval,
                    after_iteration=after_iteration,
                    keep_checkpoints=s.keep_checkpoints,
                )
                value = _metric_of(result, plan.metric, f"trial {trial.number} seed {seed}")
            except optuna.TrialPruned:
                _discard_partial(run)  # a pruned run is never resumed
                raise
            except (FloatingPointError, TrialFailed) as err:  # diverged: a retry would do the same
                _discard_partial(run)
                # The trainer's advice names `train --no-resume`; the sweep's own advice comes with its error.
                what = str(err).split("; lower optim.lr", 1)[0]
                trial.set_user_attr(FAILURE_ATTR, f"seed {seed}: {what}")
                raise TrialFailed(f"seed {seed}: {what}") from None
            per_seed.append(value)
            trial.set_user_attr(f"{plan.metric}_seed{seed}", value)
            finals = {k: v for k, v in result["final"].items() if not isinstance(v, list)}
            trial.set_user_attr(f"final_seed{seed}", finals)
        return sum(per_seed) / len(per_seed)

    return objective
