"""The study's storage: the journal file or an RDB URL (credentials from the environment), the turnstile that
goes with it, the sampler and pruner, study creation, and the recovery of interrupted trials."""

from __future__ import annotations

import logging
import os
import re
import warnings

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from .locks import AdvisoryLock, FileLock, _trial_lock_path
from .plan import Plan
from .settings import _PLACEHOLDER, FAILURE_ATTR, SweepError, SweepSettings, redact, scrub

log = logging.getLogger(__package__)  # "vit_adapter.sweep", as before the split


def storage_url(settings: SweepSettings) -> str:
    """The RDB URL to connect to: `storage` with its ${VAR} placeholders filled from the environment. Only
    open_storage and the turnstile see the result; everything recorded or printed keeps the placeholders."""
    if settings.storage is None:
        raise SweepError("storage_url: the sweep uses a journal file, not an RDB")

    def fill(m: re.Match[str]) -> str:
        value = os.environ.get(m.group(1))
        if value is None:
            raise SweepError(
                f"storage: environment variable {m.group(1)} is not set (used in {redact(settings.storage)})"
            )
        return value

    return _with_shipped_driver(_PLACEHOLDER.sub(fill, settings.storage))


def _with_shipped_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare `postgresql://` as psycopg 3, which requirements.txt does not install (and
    `postgres://` not at all); both mean the psycopg2 driver it does install. An explicit `+driver` is kept."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg2://{rest}"
    return url


def _is_postgres(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def open_storage(plan: Plan, *, create: bool = True) -> optuna.storages.BaseStorage:
    s = plan.settings
    if plan.uses_journal:
        from optuna.storages.journal import JournalFileBackend

        if not create and not plan.journal_path.is_file():
            raise SweepError(f"no sweep at {plan.journal_path}; run it first (same settings)")
        plan.study_dir.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(plan.journal_path)))
    url = storage_url(s)
    # Several machines: liveness by heartbeat (a flock is machine-local); stale trials are retried by Optuna.
    schema_lock: AdvisoryLock | None = None
    try:
        if _is_postgres(url):
            # RDBStorage creates Optuna's tables on first use; workers starting together on a fresh database
            # would race on that DDL (duplicate key in pg_type), so they take turns.
            schema_lock = AdvisoryLock(url, "schema")
            schema_lock.acquire()
        with warnings.catch_warnings():  # the heartbeat and its retry callback are "experimental" since Optuna 2.8
            warnings.simplefilter("ignore", ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(s.max_retry, inherit_intermediate_values=True)
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=s.heartbeat_s,
                grace_period=s.heartbeat_grace_s or 4 * s.heartbeat_s,
                heartbeat_stale_trial_callback=retry,
            )
    except SweepError:
        raise
    except Exception as err:  # noqa: BLE001 - driver errors have many types; one line, never the password
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SweepError(f"cannot open storage {redact(s.storage)}: {scrub(first, url, s.storage)}") from None
    finally:
        if schema_lock is not None:
            schema_lock.close()


def open_turnstile(plan: Plan) -> FileLock | AdvisoryLock:
    """The lock under which a worker decides to start a trial and asks for it (see batches.next_trial)."""
    if not plan.uses_journal and _is_postgres(storage_url(plan.settings)):
        return AdvisoryLock(storage_url(plan.settings), plan.study_name)
    return FileLock(plan.study_dir / ".turnstile.lock")  # journal, or an RDB without advisory locks (sqlite)


def make_pruner(plan: Plan) -> optuna.pruners.BasePruner:
    """Steps are `seed_index * max_iters + iteration`, so every trial reports the same steps."""
    s = plan.settings
    ev = plan.eval_interval
    warmup = s.prune_warmup_evals * ev + 1 if s.prune_warmup_evals else 0  # `step < warmup` is never pruned
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.prune_startup_trials, n_warmup_steps=warmup)
    if s.pruner == "hyperband":
        total = plan.max_iters * len(s.seeds)
        return optuna.pruners.HyperbandPruner(min_resource=min(ev, total), max_resource=total, reduction_factor=3)
    if s.pruner == "threshold":
        return optuna.pruners.ThresholdPruner(lower=s.prune_below, n_warmup_steps=warmup)
    return optuna.pruners.NopPruner()


def create_study(plan: Plan, storage: optuna.storages.BaseStorage) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=plan.study_name, direction="maximize", load_if_exists=True)
    found = study.user_attrs.get("objective")
    if found is not None and found != plan.objective_key:  # only possible with an explicit study_name
        raise SweepError(f"study {plan.study_name!r} was created for another objective ({found}); pick another name")
    if found is None:
        study.set_user_attr("objective", plan.objective_key)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names([plan.metric])
    return study


def _trial_id(study: optuna.Study, storage: optuna.storages.BaseStorage, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def root_number(t: FrozenTrial) -> int:
    """The trial whose run directories a retry reuses: the original of a retry chain."""
    return t.system_attrs.get("failed_trial", t.number)


def recover(plan: Plan, study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Fail trials whose worker died (journal: their flock is free) and queue retries of interrupted trials.
    Call under the turnstile, so that no trial is between `ask` and taking its lock. Returns retried numbers."""
    trials = study.get_trials(deepcopy=False)
    if plan.uses_journal:
        for t in trials:
            if t.state == TrialState.RUNNING:
                probe = FileLock(_trial_lock_path(plan, t.number))
                if probe.acquire(blocking=False):
                    storage.set_trial_state_values(_trial_id(study, storage, t.number), TrialState.FAIL)
                    probe.release()
                    log.warning("trial %d was interrupted (its worker died); marked FAIL", t.number)
        trials = study.get_trials(deepcopy=False)
    else:  # RDB: trials whose heartbeat stopped more than a grace period ago (Optuna queues their retries)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
    already = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(
            plan.settings.max_retry, inherit_intermediate_values=True
        )
    retried = []
    for t in trials:
        # FAIL without a recorded failure reason = interrupted (killed, Ctrl-C): worth retrying.
        if t.state == TrialState.FAIL and FAILURE_ATTR not in t.user_attrs and t.number not in already:
            before = len(study.get_trials(deepcopy=False))
            retry(study, t)
            if len(study.get_trials(deepcopy=False)) > before:
                retried.append(t.number)
                log.warning("trial %d will be retried (resuming from its run directory)", t.number)
    return retried
