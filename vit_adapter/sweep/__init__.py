"""Optuna sweep over the injector's γ initial value and the ConvFFN hidden ratio (see docs/sweeps.md).

One study searches ``model.gamma_init`` (log-uniform) and ``model.cffn_ratio`` (uniform), both present in every
trial, on the embedded default task; the objective is the task's validation metric (maximised, averaged over the
sweep's seeds). The paper's default (γ = 0, ratio 0.25) and "no ConvFFN" are fixed reference points trained over
the same seeds outside the study, so the report can compare the best point with them seed by seed.

Robustness, all on Optuna's own facilities plus two kinds of flock(2) files under the study directory:

- Storage: a journal file (``JournalStorage`` + ``JournalFileBackend``) by default, or an RDB URL with Optuna's
  heartbeat for workers on several machines (credentials only from the environment: ``${VAR}`` placeholders or
  libpq's PGPASSWORD; the URL is redacted wherever it is written). The study name hashes the settings that
  define the objective and the digests of its inputs (code, data, weights; ``engine/identity.py``), so changing
  any of them starts a new study instead of mixing results.
- Each trial trains in ``trials/trial_<n>/seed_<s>`` (a normal run directory: ``.partial`` until it finishes).
  A worker holds ``locks/trial_<n>.lock`` while its trial runs; the kernel drops the lock when the worker dies
  (even by SIGKILL), so a RUNNING trial whose lock is free was interrupted. Such trials become FAIL and are
  retried (``RetryHeartbeatStaleTrialCallback``, same parameters, intermediate values inherited); the retry
  reuses the original trial's run directories, so it resumes from the last checkpoint.
- Exact totals with parallel workers: a new trial starts only while COMPLETE + PRUNED + RUNNING < n_trials, and
  the decision "start one more" plus the ``ask`` that follows happen under one lock (``.turnstile.lock``; on
  PostgreSQL an advisory lock, shared by workers on all machines), so two workers cannot both take the last
  slot. A worker whose remaining slots are all RUNNING elsewhere waits until they finish or go stale (and are
  retried) instead of stopping short.

Layout (one module per job; this package re-exports the names other code and the tests import):
``settings`` (constants, errors, SweepSettings, params.yaml, URL redaction), ``plan`` (plan_sweep), ``locks``
(flock files, the PostgreSQL advisory lock), ``storage`` (journal/RDB, turnstile, sampler, pruner, recovery),
``objective`` (runs, reference points, the trial objective, the exact budget), ``driver`` (workers, run_sweep),
``outputs`` (trials.csv, best_params.json, plots, summary.json, export), ``cli`` (flags, main; ``__main__``).
"""

from __future__ import annotations

from .cli import (
    add_sweep_args,
    main,
    run_sweep_from_args,
    settings_from_args,
)
from .driver import (
    run_sweep,
    run_worker,
)
from .locks import (
    AdvisoryLock,
    FileLock,
    WorkerLocks,
)
from .objective import (
    ExactTrialBudget,
    collect_references,
    run_reference,
    train_or_load,
)
from .outputs import (
    export_study,
    load_existing_study,
    write_outputs,
)
from .plan import (
    Plan,
    plan_sweep,
)
from .settings import (
    FAILURE_ATTR,
    GAMMA,
    KILL_ENV,
    METRIC_FOR_TASK,
    RATIO,
    REFERENCE_POINTS,
    SPACE_VERSION,
    STORAGE_ENV,
    SweepError,
    SweepSettings,
    TrialFailed,
    read_params_file,
    redact,
    settings_from_mapping,
)
from .storage import (
    create_study,
    make_pruner,
    make_sampler,
    open_storage,
    open_turnstile,
    recover,
    root_number,
    storage_url,
)

__all__ = [
    "AdvisoryLock",
    "ExactTrialBudget",
    "FAILURE_ATTR",
    "FileLock",
    "GAMMA",
    "KILL_ENV",
    "METRIC_FOR_TASK",
    "Plan",
    "RATIO",
    "REFERENCE_POINTS",
    "SPACE_VERSION",
    "STORAGE_ENV",
    "SweepError",
    "SweepSettings",
    "TrialFailed",
    "WorkerLocks",
    "add_sweep_args",
    "collect_references",
    "create_study",
    "export_study",
    "load_existing_study",
    "main",
    "make_pruner",
    "make_sampler",
    "open_storage",
    "open_turnstile",
    "plan_sweep",
    "read_params_file",
    "recover",
    "redact",
    "root_number",
    "run_reference",
    "run_sweep",
    "run_sweep_from_args",
    "run_worker",
    "settings_from_args",
    "settings_from_mapping",
    "storage_url",
    "train_or_load",
    "write_outputs",
]
