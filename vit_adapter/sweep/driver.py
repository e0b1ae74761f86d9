"""Running the sweep: one worker (its share of the reference points, then trials), worker processes, and
``run_sweep``, which runs or resumes the study and writes its outputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from ..utils.io import atomic_write_json
from .batches import run_trials
from .locks import WorkerLocks
from .objective import _objective, _references_doc, run_reference
from .outputs import write_outputs
from .plan import Plan, _plan_info, plan_sweep
from .settings import REFERENCE_POINTS, SweepError, SweepSettings, TrialFailed, redact
from .storage import create_study, open_storage, open_turnstile

log = logging.getLogger(__package__)  # "vit_adapter.sweep", as before the split


def run_worker(settings: SweepSettings, worker: int = 0, deadline: float | None = None, barrier: Any = None) -> None:
    """One worker: its share of the reference points, then trials until the study holds n_trials."""
    plan = plan_sweep(settings)
    threads_before = _set_threads(settings.threads)
    try:
        if barrier is not None:  # all workers up before the first `ask`, so the work is spread from the start
            try:
                barrier.wait(timeout=300)
            except Exception:  # noqa: BLE001 - a broken barrier (a sibling died) only costs the spreading
                log.warning("worker %d: start barrier broken; continuing", worker)
        if settings.references:
            for name in REFERENCE_POINTS:
                for seed in settings.seeds:
                    run_reference(plan, name, seed, blocking=False)
        storage = open_storage(plan)
        locks = WorkerLocks(open_turnstile(plan))
        # The study's own sampler never draws (every trial is enqueued with its slot's parameters) and its
        # pruner never decides: both happen in sweep/batches.py, against the same history on every run.
        study = optuna.load_study(
            study_name=plan.study_name,
            storage=storage,
            sampler=optuna.samplers.RandomSampler(seed=0),
            pruner=optuna.pruners.NopPruner(),
        )
        try:
            run_trials(plan, study, locks, _objective(plan, locks), (TrialFailed,), worker, deadline)
        finally:
            locks.release_all()
            locks.turnstile.close()
    finally:
        _set_threads(threads_before)


def _set_threads(n: int) -> int:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def _worker_process(settings_dict: dict[str, Any], worker: int, deadline: float | None, barrier: Any) -> None:
    """Entry point of a spawned worker process."""
    os.environ["OMP_NUM_THREADS"] = str(settings_dict.get("threads", 1))  # before torch is imported here
    logging.basicConfig(level=logging.INFO, format=f"[worker {worker}] %(message)s")
    from ..engine.hooks import StopTraining

    try:
        run_worker(SweepSettings(**settings_dict), worker, deadline, barrier)
    except StopTraining:
        sys.exit(130)  # interrupted; the trial is retried on the next run


def run_sweep(settings: SweepSettings) -> dict[str, Any]:
    """Run (or resume) the sweep and write its outputs; returns summary.json's content."""
    t0 = time.time()
    plan = plan_sweep(settings)
    from ..engine.build import data_root

    data_root(plan.config(settings.seeds[0], {}))  # fail fast (no study, no workers) without a dataset
    storage = open_storage(plan)
    study = create_study(plan, storage)
    finished_before = _finished_trials(study)
    recorded = dataclasses.asdict(settings) | {"storage": redact(settings.storage)}
    atomic_write_json(plan.study_dir / "settings.json", {"settings": recorded, **_plan_info(plan)})
    deadline = None if settings.timeout_s is None else t0 + settings.timeout_s
    if settings.n_workers == 1:
        run_worker(settings, 0, deadline)
    else:
        _run_parallel(plan, deadline)
    if settings.references:
        atomic_write_json(plan.study_dir / "reference_points.json", _references_doc(plan, run_missing=True))
    # The study's wall time over the invocations that ran its trials: a rerun that only reloads a finished study
    # (DVC reruns the stage after an edit that changes nothing it computes) keeps the recorded time.
    ran = _finished_trials(study) != finished_before
    wall_s = _recorded_wall_s(plan) + (time.time() - t0 if ran or not finished_before else 0.0)
    return write_outputs(settings, wall_s=wall_s)


def _finished_trials(study: optuna.Study) -> int:
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def _recorded_wall_s(plan: Plan) -> float:
    """The wall time this study's summary.json recorded (0 without one)."""
    try:
        previous = json.loads((plan.study_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0.0
    wall = previous.get("wall_s") if isinstance(previous, dict) else None
    return float(wall) if isinstance(wall, int | float) else 0.0


def _run_parallel(plan: Plan, deadline: float | None) -> None:
    import multiprocessing as mp

    settings = plan.settings
    ctx = mp.get_context("spawn")  # a clean interpreter per worker: no forked torch/OpenMP state
    barrier = ctx.Barrier(settings.n_workers)
    procs = [
        ctx.Process(target=_worker_process, args=(dataclasses.asdict(settings), i, deadline, barrier), name=f"w{i}")
        for i in range(settings.n_workers)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:  # Ctrl-C reaches the workers too; they stop after their current iteration
        for p in procs:
            p.join()
        raise
    bad = [(p.name, p.exitcode) for p in procs if p.exitcode != 0]
    if not bad:
        return
    # A worker killed by a signal (OOM killer, kill -9) whose trial the others retried to the full budget cost
    # nothing but time; a worker that raised (a bug, a broken storage) is an error even then.
    killed = all(code is not None and code < 0 for _, code in bad)
    study = optuna.load_study(study_name=plan.study_name, storage=open_storage(plan, create=False))
    finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    if killed and finished >= settings.n_trials:
        log.warning("worker(s) killed: %s; the others finished the study (their trials were retried)", bad)
        return
    raise SweepError(f"worker(s) failed: {bad}; completed trials are kept, rerun to resume")
