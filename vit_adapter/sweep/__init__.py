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
- Same trials on every run (``batches``): trials are drawn in batches from a seeded sampler that sees only
  finished earlier batches, and pruned against those only, so load, worker count and completion order change
  no parameter, value or pruning decision. Exact totals: a new trial is created, and asked for, under one lock
  (``.turnstile.lock``; on PostgreSQL an advisory lock, shared by workers on all machines), only while the
  study needs one; a worker whose batch is still running elsewhere waits for it.

Layout (one module per job; this package re-exports only the public API, internals are imported from their
module): ``settings`` (constants, errors, SweepSettings, params.yaml, URL redaction), ``plan`` (plan_sweep),
``locks`` (flock files, the PostgreSQL advisory lock), ``storage`` (journal/RDB, turnstile, pruner, recovery),
``batches`` (which trials run: slots, batches, the seeded sampler and the pruning decision), ``objective``
(runs, reference points, the trial objective), ``driver`` (workers, run_sweep), ``outputs`` (trials.csv,
best_params.json, plots, summary.json, export), ``cli`` (flags, main; ``__main__``).
"""

from __future__ import annotations

from .cli import add_sweep_args, main, run_sweep_from_args, settings_from_args
from .driver import run_sweep
from .outputs import export_study, write_outputs
from .plan import Plan, plan_sweep
from .settings import (
    REFERENCE_POINTS,
    SweepError,
    SweepSettings,
    read_params_file,
    redact,
    settings_from_mapping,
)

__all__ = [
    "REFERENCE_POINTS",
    "Plan",
    "SweepError",
    "SweepSettings",
    "add_sweep_args",
    "export_study",
    "main",
    "plan_sweep",
    "read_params_file",
    "redact",
    "run_sweep",
    "run_sweep_from_args",
    "settings_from_args",
    "settings_from_mapping",
    "write_outputs",
]
