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
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from .config.typed import ConfigError, build_dataclass, read_yaml
from .engine.config import EXECUTION_KEYS, Config, config_hash, load_config
from .engine.identity import code_digest, identity_of, input_digests, run_identity
from .engine.rundir import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

# Search space (issue 7). γ = 0, the paper's value, cannot be on a log scale: it is a reference point instead.
GAMMA = "gamma_init"
RATIO = "cffn_ratio"
SPACE_VERSION = 1  # bump when the space or the objective's definition changes in code
METRIC_FOR_TASK = {"seg": "mIoU", "det": "bbox_mAP"}
# Fixed points evaluated over the same seeds, outside the study (model-section overrides).
REFERENCE_POINTS: dict[str, dict[str, Any]] = {
    "paper_default": {GAMMA: 0.0, RATIO: 0.25, "with_cffn": True},
    "no_cffn": {GAMMA: 0.0, RATIO: 0.25, "with_cffn": False},
}
# Test-only: "TRIAL:ITERATION" makes the worker SIGKILL itself after that iteration of that trial (first seed).
KILL_ENV = "VIT_ADAPTER_SWEEP_KILL_AT"
FAILURE_ATTR = "failure"  # user attr of a trial that failed for a reason a retry would repeat (divergence)
# Where a shared storage URL (with its password) should come from: `storage: ${VIT_ADAPTER_SWEEP_STORAGE}`.
STORAGE_ENV = "VIT_ADAPTER_SWEEP_STORAGE"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SEARCHED_KEYS = ("model.gamma_init", "model.cffn_ratio", "model.with_cffn", "train.seed")


class SweepError(ValueError):
    """Bad sweep settings or a sweep that cannot proceed; one line, exit code 2 in the CLI."""


class TrialFailed(Exception):
    """A trial that failed for a reason a retry would repeat (e.g. a diverging loss); the study goes on."""


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SweepSettings:
    """Everything a sweep needs; the `sweep:` section of params.yaml uses the same keys."""

    profile: str = "cpu_default"
    overlays: list[str] = field(default_factory=list)
    sets: list[str] = field(default_factory=list)  # applied after the budget below, so they win over it
    metric: str | None = None  # None = the task's metric: mIoU (seg), bbox_mAP (det)
    seeds: list[int] = field(default_factory=lambda: [0])
    # Budget: a shorter schedule for sweep trials (milestones and warmup scaled with it); None = the profile's.
    max_iters: int | None = None
    eval_interval: int | None = None  # None = ceil(max_iters / 4) when max_iters is set (pruning needs several)
    n_trials: int = 12  # COMPLETE + PRUNED trials, exact
    timeout_s: float | None = None  # wall-clock budget of the whole sweep; running trials still finish
    n_workers: int = 1
    threads: int = 1  # torch threads per worker
    storage: str | None = None  # None = journal file <out_dir>/<study>/journal.log; else an RDB URL
    out_dir: str = "results/sweeps"
    study_name: str | None = None  # None = derived from the settings that define the objective
    sampler_seed: int = 0
    n_startup_trials: int | None = None  # TPE random start; None = max(3, n_trials // 3)
    pruner: Literal["median", "hyperband", "threshold", "none"] = "median"
    prune_startup_trials: int = 3  # median: trials that finish before pruning starts
    prune_warmup_evals: int = 1  # evaluations of the first seed that are never pruned
    prune_below: float | None = None  # threshold pruner: prune when the metric is below this
    max_retry: int = 2  # retries of an interrupted trial
    max_failed: int | None = None  # stop after this many diverged trials; None = n_trials
    heartbeat_s: int = 60  # RDB storage only (the journal uses flock liveness instead)
    heartbeat_grace_s: int | None = None  # RDB: a RUNNING trial this long without a heartbeat is stale; None = 4x
    references: bool = True
    keep_checkpoints: bool = False  # finished trial runs need only their metrics
    plots: bool = True  # PNGs of the study (seconds of matplotlib per call)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise SweepError(f"sweep setting {what}")

        need(self.n_trials >= 1, f"n_trials = {self.n_trials} must be >= 1")
        need(self.n_workers >= 1, f"n_workers = {self.n_workers} must be >= 1")
        need(self.threads >= 1, f"threads = {self.threads} must be >= 1")
        need(len(self.seeds) >= 1, "seeds must list at least one seed")
        need(len(set(self.seeds)) == len(self.seeds), f"seeds = {self.seeds} has duplicates")
        need(self.max_iters is None or self.max_iters >= 1, f"max_iters = {self.max_iters} must be >= 1")
        need(self.eval_interval is None or self.eval_interval >= 1, "eval_interval must be >= 1")
        need(self.timeout_s is None or self.timeout_s > 0, f"timeout_s = {self.timeout_s} must be > 0")
        need(self.pruner in ("median", "hyperband", "threshold", "none"), f"pruner = {self.pruner!r} is unknown")
        need(self.pruner != "threshold" or self.prune_below is not None, "pruner 'threshold' needs prune_below")
        need(self.max_retry >= 0 and self.heartbeat_s >= 1, "max_retry must be >= 0 and heartbeat_s >= 1")
        need(
            self.heartbeat_grace_s is None or self.heartbeat_grace_s > self.heartbeat_s,
            f"heartbeat_grace_s = {self.heartbeat_grace_s} must exceed heartbeat_s = {self.heartbeat_s}",
        )
        if self.storage is not None:
            password = _url_password(self.storage)
            # A literal password would end up in params.yaml, shell history and `ps`; the environment holds it.
            need(
                password is None or _PLACEHOLDER.fullmatch(password) is not None,
                f"storage: the URL {redact(self.storage)} holds a literal password; write ${{VAR}} in its place "
                f"(or the whole URL as ${{{STORAGE_ENV}}}, or use PGPASSWORD) and set it in the environment",
            )
        for item in self.sets:
            key = item.split("=", 1)[0].strip()
            need(key not in _SEARCHED_KEYS, f"sets: {key} is set by the sweep itself (searched values, seeds)")


_SETTING_TYPES: dict[str, Any] = {f.name: f.type for f in dataclasses.fields(SweepSettings)}


def settings_from_mapping(data: Mapping[str, Any] | None, source: str = "settings") -> SweepSettings:
    """SweepSettings from a mapping (e.g. params.yaml's `sweep:` section) through the shared config loader:
    unknown keys (with a did-you-mean) and values that do not fit the annotations are errors naming `source`.
    Values are kept as given (an int timeout_s stays an int in settings.json)."""
    data = dict(data or {})
    for key in ("overlays", "sets", "seeds"):
        if key in data and not isinstance(data[key], list | tuple):
            data[key] = [data[key]]  # a single value where a list is expected
    try:
        return build_dataclass(SweepSettings, data, source, what="sweep setting", convert=False)
    except ConfigError as err:
        raise SweepError(str(err)) from err
    except TypeError as err:
        raise SweepError(f"{source}: {err}") from err


def read_params_file(path: str | Path, section: str = "sweep") -> dict[str, Any]:
    """The `sweep:` section of a params.yaml (empty when the file has none), read with the config loader's
    YAML rules (YAML 1.2 floats such as 1e-3, duplicate keys rejected)."""
    try:
        doc = read_yaml(path) or {}
    except ConfigError as err:
        raise SweepError(str(err)) from err
    if not isinstance(doc, Mapping):
        raise SweepError(f"{path}: top level must be a mapping, got {type(doc).__name__}")
    sect = doc.get(section) or {}
    if not isinstance(sect, Mapping):
        raise SweepError(f"{path}: section '{section}' must be a mapping")
    return dict(sect)


# ---------------------------------------------------------------------------------------------------------
# Plan: the resolved sweep (configs, metric, study name and directory)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    settings: SweepSettings
    base_sets: tuple[str, ...]  # budget sets + user sets; the trial's own values are appended last
    task: str
    metric: str
    max_iters: int
    eval_interval: int
    study_name: str
    study_dir: Path
    objective_key: dict[str, Any]  # what the study name hashes, input digests included
    inputs: dict[str, Any]  # input_digests(scope="sweep"): code (sweep driver included), data, weights
    identity: str  # identity_of(objective digest, inputs); the study name carries its first 10 hex digits

    @property
    def journal_path(self) -> Path:
        return self.study_dir / "journal.log"

    @property
    def run_inputs(self) -> dict[str, Any]:
        """The input digests of one training run: the study's data and weights (no trial changes those), the
        code of the run scope (what the DVC train stages hash too)."""
        return {**self.inputs, "code": code_digest("run")}

    def run_identity(self, cfg: Config) -> str:
        return run_identity(cfg, self.run_inputs)[0]

    @property
    def uses_journal(self) -> bool:
        return self.settings.storage is None

    def config(self, seed: int, model: Mapping[str, Any]) -> Config:
        """The resolved config of one run: base + the given model keys + seed + threads."""
        s = self.settings
        tail = [f"model.{k}={_yaml_value(v)}" for k, v in model.items()]
        tail += [f"train.seed={seed}", f"train.threads={s.threads}"]
        cfg = load_config(s.profile, s.overlays, [*self.base_sets, *tail])
        for k, v in model.items():  # the YAML round trip must not change a searched value
            if getattr(cfg.model, k) != v:
                raise SweepError(f"model.{k}: {v!r} became {getattr(cfg.model, k)!r} in the config")
        return cfg

    def trial_dir(self, root_number: int) -> Path:
        return self.study_dir / "trials" / f"trial_{root_number:04d}"

    def reference_dir(self, name: str) -> Path:
        return self.study_dir / "reference" / name


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(float(v)) if isinstance(v, float) else str(v)  # repr: shortest string that round-trips


def _budget_sets(s: SweepSettings) -> list[str]:
    """A shorter schedule of the same shape: milestones and warmup scale with max_iters."""
    if s.max_iters is None:
        return [f"train.eval_interval={s.eval_interval}"] if s.eval_interval else []
    cfg = load_config(s.profile, s.overlays, [])
    scale = s.max_iters / cfg.train.max_iters
    milestones = sorted({round(m * scale) for m in cfg.optim.milestones} - {0})
    milestones = [m for m in milestones if m < s.max_iters]
    ev = s.eval_interval or math.ceil(s.max_iters / 4)  # 4 evaluations, the last one at max_iters
    return [
        f"train.max_iters={s.max_iters}",
        f"train.eval_interval={ev}",
        f"train.checkpoint_interval={ev}",  # a killed trial resumes from its last evaluation
        f"optim.milestones={milestones}",
        f"optim.warmup_iters={round(cfg.optim.warmup_iters * scale)}",
    ]


def plan_sweep(s: SweepSettings) -> Plan:
    """Resolve the settings; raises SweepError/ConfigError for anything wrong before a study is touched."""
    s.validate()
    base = tuple(_budget_sets(s) + list(s.sets))
    probe = load_config(s.profile, s.overlays, [*base, f"train.threads={s.threads}"])
    task = probe.model.task
    metric = s.metric or METRIC_FOR_TASK[task]
    # What defines the objective: the run config minus execution details and the per-trial values.
    exclude = (*EXECUTION_KEYS, "train.seed", "model.gamma_init", "model.cffn_ratio", "model.with_cffn")
    key: dict[str, Any] = {
        "config_hash": config_hash(probe, exclude=exclude),
        "metric": metric,
        "seeds": list(s.seeds),
        "space": {GAMMA: [1e-6, 1.0, "log"], RATIO: [1 / 16, 1.0, "uniform"]},
        "version": SPACE_VERSION,
    }
    # Content, not paths: re-pretrained weights or regenerated data at the same path, or edited code, make every
    # trial stale, in the journal and in a shared database alike. The searched keys change neither input.
    inputs = input_digests(probe, scope="sweep")
    identity = identity_of(hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest(), inputs)
    key["inputs"] = inputs
    name = s.study_name or f"gamma-cffn-{task}-{metric}-{identity[:10]}"
    if not name or "/" in name or name.startswith("."):
        raise SweepError(f"study_name {name!r} must be a plain directory name")
    ev = probe.train.eval_interval or probe.train.max_iters
    return Plan(s, base, task, metric, probe.train.max_iters, ev, name, Path(s.out_dir) / name, key, inputs, identity)


# ---------------------------------------------------------------------------------------------------------
# Locks and storage
# ---------------------------------------------------------------------------------------------------------


class FileLock:
    """flock(2) on a file. The kernel releases it when the holder dies, even by SIGKILL, which makes a free
    lock a liveness probe for the trial it guards. Local file systems only (not NFS)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self.release()


class AdvisoryLock:
    """A PostgreSQL session-level advisory lock: the turnstile of workers on several machines (a flock is
    machine-local). The server drops it when the holder's connection ends, so a worker that dies (even by
    SIGKILL: the kernel closes its socket) cannot leave it held; TCP keepalives cover a machine that vanishes."""

    def __init__(self, url: str, name: str) -> None:
        import sqlalchemy

        self.key = int.from_bytes(hashlib.sha256(f"vit-adapter-sweep:{name}".encode()).digest()[:8], "big", signed=True)
        keepalive = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
        # AUTOCOMMIT: the lock is the session's, so this connection never sits "idle in transaction".
        self._engine = sqlalchemy.create_engine(
            url, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT", connect_args=keepalive
        )
        self._conn: Any = None
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def acquire(self, blocking: bool = True) -> bool:
        from sqlalchemy import text

        if self._held:
            return True
        if self._conn is None:
            self._conn = self._engine.connect()
        if blocking:
            self._conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            self._held = True
        else:
            self._held = bool(self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
        return self._held

    def release(self) -> None:
        from sqlalchemy import text

        if self._held:
            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            self._held = False

    def close(self) -> None:
        self.release()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._engine.dispose()


def _url_password(url: str) -> str | None:
    """The password part of a URL's user info (placeholders not expanded), or None."""
    if "://" not in url:
        return None
    head = re.split(r"[?#]", url.split("://", 1)[1], maxsplit=1)[0]
    if "@" not in head:
        return None
    userinfo = head.rsplit("@", 1)[0]  # the last "@": a raw "@" or "/" in the password does not hide it
    return userinfo.split(":", 1)[1] or None if ":" in userinfo else None


def storage_url(settings: SweepSettings) -> str:
    """The RDB URL to connect to: `storage` with its ${VAR} placeholders filled from the environment. Only
    open_storage and the turnstile see the result; everything recorded or printed keeps the placeholders."""
    if settings.storage is None:
        raise SweepError("storage_url: the sweep uses a journal file, not an RDB")

    def fill(m: re.Match[str]) -> str:
        value = os.environ.get(m.group(1))
        if value is None:
            raise SweepError(f"storage: environment variable {m.group(1)} is not set (used in {settings.storage})")
        return value

    return _PLACEHOLDER.sub(fill, settings.storage)


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
        first = first.replace(url, s.storage or "")
        secret = _url_password(url)
        if secret:
            first = first.replace(secret, "***")
        raise SweepError(f"cannot open storage {redact(s.storage)}: {redact(first)}") from None
    finally:
        if schema_lock is not None:
            schema_lock.close()


def open_turnstile(plan: Plan) -> FileLock | AdvisoryLock:
    """The lock under which a worker decides to start a trial and asks for it (see ExactTrialBudget)."""
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


def make_sampler(plan: Plan, worker: int, n_existing: int) -> optuna.samplers.TPESampler:
    """Seeded TPE. The seed also mixes the worker index (parallel workers must not draw the same startup
    points) and the trials already in the study (a resumed sweep must not redraw the first points)."""
    s = plan.settings
    seed = (s.sampler_seed * 1_000_003 + worker * 10_007 + n_existing) % 2**31
    parallel = s.n_workers > 1 or not plan.uses_journal  # an RDB study may have workers elsewhere
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=s.n_startup_trials if s.n_startup_trials is not None else max(3, s.n_trials // 3),
            multivariate=True,  # γ and the ratio may interact
            constant_liar=parallel,  # running trials count as bad, so parallel workers spread out
        )


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


def _trial_lock_path(plan: Plan, number: int) -> Path:
    return plan.study_dir / "locks" / f"trial_{number:05d}.lock"


# ---------------------------------------------------------------------------------------------------------
# Runs (trials and reference points)
# ---------------------------------------------------------------------------------------------------------


def _finished(run: Path) -> bool:
    return (run / "metrics.json").is_file()


def _discard_partial(run: Path) -> None:
    shutil.rmtree(run.with_name(run.name + ".partial"), ignore_errors=True)


def _identity_marker(run: Path) -> Path:
    return run.with_name(run.name + ".identity")


def _forget_if_stale(run: Path, identity: str) -> None:
    """Discard `run` (finished or partial) unless it was trained for `identity` (config + input digests); then
    record `identity` for it. The marker sits beside the run directory, so it exists before training starts and
    a run whose marker is missing or different is never reused."""
    marker = _identity_marker(run)
    found = marker.read_text(encoding="utf-8").strip() if marker.is_file() else None
    if found == identity:
        return
    if run.exists() or run.with_name(run.name + ".partial").exists():
        log.warning("%s was trained for other inputs (identity %s, now %s); training it again", run, found, identity)
        shutil.rmtree(run, ignore_errors=True)
        _discard_partial(run)
    atomic_write_text(marker, identity + "\n")


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
    from .engine.trainer import Hooks, train

    if identity is not None:
        _forget_if_stale(run, identity)
    if _finished(run):
        result = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        if after_eval is not None:  # replay the evaluations, so a retried trial reports the same steps
            for row in result.get("history", []):
                after_eval(row["iter"], row)
        return result
    # The trainer resumes `<run>.partial` only when its config matches (execution keys such as threads aside).
    result = train(cfg, run, resume=True, hooks=Hooks(after_iteration, after_eval), progress=False)
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
        return json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    lock = FileLock(plan.study_dir / "locks" / f"reference_{name}_seed{seed}.lock")
    if not lock.acquire(blocking=blocking):
        return None
    try:
        log.info("reference %s, seed %d", name, seed)
        return train_or_load(cfg, run, identity=identity, keep_checkpoints=plan.settings.keep_checkpoints)
    finally:
        lock.release()


def _finished_as(run: Path, identity: str) -> bool:
    """A finished run trained for `identity` (a stale one does not count)."""
    marker = _identity_marker(run)
    return _finished(run) and marker.is_file() and marker.read_text(encoding="utf-8").strip() == identity


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
                result = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
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


# ---------------------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------------------


@dataclass
class WorkerLocks:
    """A worker's two locks. The turnstile is held from "may I start a trial?" until that trial exists in the
    storage and holds its trial lock. The trial lock is held from then until Optuna has stored the trial's
    final state (released in the callback, which runs after `tell`), so no one sees it RUNNING and unlocked."""

    turnstile: FileLock | AdvisoryLock
    trial: FileLock | None = None

    def release_all(self) -> None:
        if self.trial is not None:
            self.trial.release()
            self.trial = None
        self.turnstile.release()


class ExactTrialBudget:
    """After each trial, under the turnstile: stop, or let the next `ask` happen (see _may_start_trial), so
    trials running in other workers count and two workers cannot both take the last slot."""

    def __init__(
        self,
        plan: Plan,
        storage: optuna.storages.BaseStorage,
        locks: WorkerLocks,
        worker: int,
        deadline: float | None,
    ) -> None:
        self.plan, self.storage, self.locks, self.worker, self.deadline = plan, storage, locks, worker, deadline

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.locks.trial is not None:  # the finished trial's state is stored now
            self.locks.trial.release()
            self.locks.trial = None
        self.locks.turnstile.acquire()  # held until the next trial is locked, or until the worker stops
        if not _may_start_trial(self.plan, study, self.storage, self.locks, self.worker, self.deadline):
            study.stop()


def _may_start_trial(
    plan: Plan,
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    locks: WorkerLocks,
    worker: int,
    deadline: float | None,
) -> bool:
    """Called with the turnstile held; returns with it held. True: the study has a free slot (COMPLETE + PRUNED +
    RUNNING < n_trials, a queued retry included), ask for it now. False: stop (done, too many diverged trials, or
    the time budget is spent). When every free slot is taken by a trial RUNNING elsewhere, wait: that trial may
    still fail or die (its worker's lock frees, or its heartbeat goes stale, and it is retried), and stopping
    then would leave the study one trial short."""
    s = plan.settings
    poll = min(float(s.heartbeat_s), 2.0 if plan.uses_journal else 10.0)
    waited = False
    while True:
        recover(plan, study, storage)  # a sibling may have died; its trial must not count as running
        if _too_many_failures(plan, study, worker):
            return False
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if finished >= s.n_trials:
            log.info("worker %d: the study holds its %d trials", worker, s.n_trials)
            return False
        if deadline is not None and time.time() >= deadline:
            log.info("worker %d: the sweep's time budget is spent", worker)
            return False
        if finished + running < s.n_trials:
            return True
        if not waited:
            log.info("worker %d: waiting for %d trial(s) running elsewhere", worker, running)
            waited = True
        locks.turnstile.release()  # the others need it to finish (their callbacks) and to recover
        time.sleep(poll)
        locks.turnstile.acquire()


def _too_many_failures(plan: Plan, study: optuna.Study, worker: int) -> bool:
    """Trials that failed deterministically (divergence) do not count towards n_trials; without a cap, a study
    whose every point diverges would never end."""
    cap = plan.settings.max_failed or plan.settings.n_trials
    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if FAILURE_ATTR in t.user_attrs]
    if len(failed) >= cap:
        log.error(
            "worker %d: %d trials failed (e.g. %s); stopping", worker, len(failed), failed[-1].user_attrs[FAILURE_ATTR]
        )
        return True
    return False


def _objective(plan: Plan, locks: WorkerLocks) -> Callable[[optuna.Trial], float]:
    s = plan.settings
    kill = _kill_trigger()

    def objective(trial: optuna.Trial) -> float:
        locks.trial = FileLock(_trial_lock_path(plan, trial.number))
        locks.trial.acquire()  # released by the callback after `tell` (or when the worker exits)
        locks.turnstile.release()  # the trial exists and is locked: others may start theirs
        return _run_trial(trial)

    def _run_trial(trial: optuna.Trial) -> float:
        gamma = trial.suggest_float(GAMMA, 1e-6, 1.0, log=True)
        ratio = trial.suggest_float(RATIO, 1 / 16, 1.0)
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        root = root_number(frozen)
        reported = set(frozen.intermediate_values)  # a retry inherits its original's reports
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("run_dir", str(plan.trial_dir(root)))
        per_seed: list[float] = []
        for i, seed in enumerate(s.seeds):
            run = plan.trial_dir(root) / f"seed_{seed}"
            cfg = plan.config(seed, {GAMMA: gamma, RATIO: ratio, "with_cffn": True})

            def after_eval(it: int, metrics: dict[str, Any], i: int = i, seed: int = seed) -> None:
                value = metrics.get(plan.metric)
                step = i * plan.max_iters + it
                if isinstance(value, int | float) and step not in reported:
                    trial.report(float(value), step)
                    reported.add(step)
                if step < len(s.seeds) * plan.max_iters and trial.should_prune():  # never prune a finished trial
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
                trial.set_user_attr(FAILURE_ATTR, f"{type(err).__name__}: {err}")
                raise TrialFailed(str(err)) from err
            per_seed.append(value)
            trial.set_user_attr(f"{plan.metric}_seed{seed}", value)
            finals = {k: v for k, v in result["final"].items() if not isinstance(v, list)}
            trial.set_user_attr(f"final_seed{seed}", finals)
        return sum(per_seed) / len(per_seed)

    return objective


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
        locks.turnstile.acquire()
        try:
            # Counted under the turnstile: workers started at the same moment (or the same CLI launched twice)
            # see different counts, so their samplers get different seeds.
            study_id = storage.get_study_id_from_name(plan.study_name)
            n_existing = len(storage.get_all_trials(study_id, deepcopy=False))
            study = optuna.load_study(
                study_name=plan.study_name,
                storage=storage,
                sampler=make_sampler(plan, worker, n_existing),
                pruner=make_pruner(plan),
            )
            if not _may_start_trial(plan, study, storage, locks, worker, deadline):
                return
            study.optimize(
                _objective(plan, locks),
                timeout=None if deadline is None else max(0.0, deadline - time.time()),
                catch=(TrialFailed,),
                callbacks=[ExactTrialBudget(plan, storage, locks, worker, deadline)],
                gc_after_trial=True,
            )
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
    from .engine.trainer import StopTraining

    try:
        run_worker(SweepSettings(**settings_dict), worker, deadline, barrier)
    except StopTraining:
        sys.exit(130)  # interrupted; the trial is retried on the next run


# ---------------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------------


def run_sweep(settings: SweepSettings) -> dict[str, Any]:
    """Run (or resume) the sweep and write its outputs; returns summary.json's content."""
    t0 = time.time()
    plan = plan_sweep(settings)
    from .engine.build import data_root

    data_root(plan.config(settings.seeds[0], {}))  # fail fast (no study, no workers) without a dataset
    storage = open_storage(plan)
    create_study(plan, storage)
    recorded = dataclasses.asdict(settings) | {"storage": redact(settings.storage)}
    atomic_write_json(plan.study_dir / "settings.json", {"settings": recorded, **_plan_info(plan)})
    deadline = None if settings.timeout_s is None else t0 + settings.timeout_s
    if settings.n_workers == 1:
        run_worker(settings, 0, deadline)
    else:
        _run_parallel(plan, deadline)
    if settings.references:
        atomic_write_json(plan.study_dir / "reference_points.json", _references_doc(plan, run_missing=True))
    return write_outputs(settings, wall_s=time.time() - t0)


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


def redact(url: str | None) -> str | None:
    """A storage URL (or a message quoting one) without its password, for everything printed or written. A
    ${VAR} placeholder is kept: it names where the password comes from, and is no secret."""
    if url is None:
        return None

    def hide(m: re.Match[str]) -> str:
        return m.group(0) if _PLACEHOLDER.fullmatch(m.group(2)) else f"{m.group(1)}:***@"

    return re.sub(r"(://[^/:@\s]+):(\S*)@", hide, url)  # greedy: up to the last "@", as a URL parser reads it


def _plan_info(plan: Plan) -> dict[str, Any]:
    return {
        "study_name": plan.study_name,
        "study_dir": str(plan.study_dir),
        "storage": redact(plan.settings.storage) if plan.settings.storage else str(plan.journal_path),
        "metric": plan.metric,
        "task": plan.task,
        "max_iters": plan.max_iters,
        "objective": plan.objective_key,
        "inputs": plan.inputs,  # also inside "objective"; here for readers who look for the digests
        "identity": plan.identity,
        "base_sets": list(plan.base_sets),
    }


def _references_doc(plan: Plan, *, run_missing: bool) -> dict[str, Any]:
    return {
        "metric": plan.metric,
        "seeds": list(plan.settings.seeds),
        "points": collect_references(plan, run_missing=run_missing),
    }


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------


def load_existing_study(plan: Plan, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """The plan's study from `storage`; a one-line SweepError (storage URL redacted) when it is not there."""
    try:
        return optuna.load_study(study_name=plan.study_name, storage=storage)
    except KeyError as err:
        where = redact(plan.settings.storage)
        raise SweepError(f"no study {plan.study_name!r} in {where}; run the sweep first") from err


def write_outputs(settings: SweepSettings, wall_s: float | None = None) -> dict[str, Any]:
    """trials.csv, best_params.json, plots/*.png, summary.json from the storage (+ reference_points.json).

    Reads only the storage and the reference runs, so it works on a machine that ran none of the trials."""
    plan = plan_sweep(settings)
    study = load_existing_study(plan, open_storage(plan, create=False))
    d = plan.study_dir
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]

    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    df = df.map(lambda v: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v)  # CSV cells, not reprs
    atomic_write_text(d / "trials.csv", df.to_csv(index=False))

    best: dict[str, Any] | None = None
    if complete:
        b = study.best_trial
        best = {
            "trial": b.number,
            "value": b.value,
            "params": dict(b.params),
            "per_seed": {str(s): b.user_attrs.get(f"{plan.metric}_seed{s}") for s in settings.seeds},
            "final_per_seed": {str(s): b.user_attrs.get(f"final_seed{s}") for s in settings.seeds},
        }
    atomic_write_json(d / "best_params.json", {"study_name": plan.study_name, "metric": plan.metric, "best": best})

    ref_path = d / "reference_points.json"
    refs = json.loads(ref_path.read_text(encoding="utf-8"))["points"] if ref_path.is_file() else {}
    comparison: dict[str, Any] = {}
    for name, ref in refs.items():
        if best is None:
            break
        deltas = {
            s: (best["per_seed"][s] - v) if best["per_seed"].get(s) is not None and v is not None else None
            for s, v in ref["per_seed"].items()
        }
        known = [v for v in deltas.values() if v is not None]
        comparison[name] = {
            "per_seed_delta": deltas,
            "mean_delta": sum(known) / len(known) if known and len(known) == len(deltas) else None,
            "best_wins_on_seeds": sum(v > 0 for v in known),
        }

    plots, skipped = _write_plots(plan, study, len(complete)) if settings.plots else ([], {"all": "plots: false"})
    counts = {st.name.lower(): sum(t.state == st for t in trials) for st in TrialState}
    diverged = sum(t.state == TrialState.FAIL and FAILURE_ATTR in t.user_attrs for t in trials)
    if counts["complete"] + counts["pruned"] >= settings.n_trials:
        status = "done"
    elif diverged >= (settings.max_failed or settings.n_trials):
        status = "too_many_failures"
    else:
        status = "incomplete"  # time budget spent, or workers still running elsewhere
    summary = {
        **_plan_info(plan),
        "seeds": list(settings.seeds),
        "n_trials_target": settings.n_trials,
        "status": status,
        "counts": counts,
        "search_space": {GAMMA: {"low": 1e-6, "high": 1.0, "log": True}, RATIO: {"low": 1 / 16, "high": 1.0}},
        "best": best,
        "references": refs,
        "best_vs_references": comparison,
        "importances": _importances(study) if len(complete) >= 2 else None,
        "plots": plots,
        "plots_skipped": skipped,
        "wall_s": wall_s,
        "note": "the best point is selected on the same validation seeds it is compared on (optimistic); "
        "confirm it on fresh seeds before claiming an improvement over the paper default",
    }
    atomic_write_json(d / "summary.json", summary)
    atomic_write_json(Path(settings.out_dir) / "summary.json", summary)  # the latest sweep, at a fixed path
    return summary


def export_study(settings: SweepSettings) -> dict[str, Any]:
    """Copy a finished study out of its RDB storage into the journal file `<out_dir>/<study>/journal.log`, the
    storage a sweep with `storage: null` (the DVC stage) reads, then write the outputs from that journal; returns
    summary.json's content. The study name is the same on both sides (the storage is not part of it), so a later
    `vit-adapter sweep --params params.yaml` finds the study done and only reports it."""
    from optuna.storages.journal import JournalFileBackend

    if settings.storage is None:
        raise SweepError("export copies a study out of an RDB storage; set --storage (or sweep.storage)")
    plan = plan_sweep(settings)
    source = open_storage(plan, create=False)
    study = load_existing_study(plan, source)
    trials = study.get_trials(deepcopy=False)
    unfinished = [t.number for t in trials if not t.state.is_finished()]
    if unfinished:  # copied as RUNNING, they would look interrupted to the journal's liveness check
        raise SweepError(
            f"study {plan.study_name!r} has unfinished trials {unfinished} (running or queued); "
            "export it when its workers are done"
        )
    local = dataclasses.replace(settings, storage=None)
    target = plan_sweep(local)
    # Written beside the journal, then moved into place: no reader sees half a study, and an earlier export (or
    # a local run) of the same study is replaced, not merged into.
    tmp = target.journal_path.with_name(".journal.log.export")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)
    journal = optuna.storages.JournalStorage(JournalFileBackend(str(tmp)))
    copy = optuna.create_study(storage=journal, study_name=plan.study_name, directions=study.directions)
    source_id, copy_id = source.get_study_id_from_name(plan.study_name), journal.get_study_id_from_name(plan.study_name)
    for key, value in source.get_study_user_attrs(source_id).items():
        copy.set_user_attr(key, value)
    for key, value in source.get_study_system_attrs(source_id).items():  # metric names among them
        journal.set_study_system_attr(copy_id, key, value)
    copy.add_trials(trials)  # in order, so trial numbers (and retries' `failed_trial`) are kept
    del journal, copy
    os.replace(tmp, target.journal_path)
    recorded = dataclasses.asdict(local) | {"exported_from": redact(settings.storage)}
    atomic_write_json(target.study_dir / "settings.json", {"settings": recorded, **_plan_info(target)})
    log.info("exported %d trials of %s to %s", len(trials), plan.study_name, target.journal_path)
    return write_outputs(local)


def _importances(study: optuna.Study) -> dict[str, float] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError) as err:
        log.warning("parameter importances unavailable: %s", err)
        return None


def _write_plots(plan: Plan, study: optuna.Study, n_complete: int) -> tuple[list[str], dict[str, str]]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as vm

    target = {"target_name": plan.metric}
    makers: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: vm.plot_optimization_history(study, **target),
        "contour_gamma_ratio": lambda: vm.plot_contour(study, params=[GAMMA, RATIO], **target),
        "param_importances": lambda: vm.plot_param_importances(study, **target),
        "slice": lambda: vm.plot_slice(study, params=[GAMMA, RATIO], **target),
        "intermediate_values": lambda: vm.plot_intermediate_values(study),
    }
    need = {"contour_gamma_ratio": 2, "param_importances": 2, "intermediate_values": 0}
    written, skipped = [], {}
    for name, make in makers.items():
        if n_complete < need.get(name, 1):
            skipped[name] = f"needs {need.get(name, 1)} complete trials, the study has {n_complete}"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = make()
        except (ValueError, RuntimeError) as err:
            skipped[name] = str(err)
            continue
        fig = np.asarray(ax).flat[0].figure
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        path = plan.study_dir / "plots" / f"{name}.png"
        atomic_write_bytes(path, buf.getvalue())
        written.append(str(path))
    return written, skipped


# ---------------------------------------------------------------------------------------------------------
# Command line (`vit-adapter sweep`, also `python -m vit_adapter.sweep`)
# ---------------------------------------------------------------------------------------------------------


def add_sweep_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags override the `sweep:` section of --params, which overrides the defaults; --set adds to its sets."""
    a = parser.add_argument
    a("--params", type=Path, default=None, help="YAML file with a `sweep:` section (e.g. params.yaml)")
    a("--config", dest="profile", default=None, help="profile (default cpu_default)")
    a("--overlay", "--ablation", dest="overlays", action="append", default=None, help="overlay; repeatable")
    a("--set", dest="sets", action="append", default=None, metavar="SECTION.KEY=VALUE", help="repeatable")
    a("--metric", default=None, help="objective metric (default: mIoU for seg, bbox_mAP for det)")
    a("--seeds", default=None, help="comma-separated training seeds, e.g. 0,1,2")
    a("--max-iters", type=int, default=None, help="train.max_iters of sweep trials (schedule scaled to it)")
    a("--eval-interval", type=int, default=None, help="evaluations (pruning points) every N iterations")
    a("--n-trials", type=int, default=None, help="COMPLETE + PRUNED trials to reach (default 12)")
    a("--timeout-s", "--timeout", dest="timeout_s", type=float, default=None, help="wall-clock budget, seconds")
    a("--n-workers", type=int, default=None, help="worker processes on this machine (1 thread each)")
    a("--threads", type=int, default=None, help="torch threads per worker (default 1)")
    a("--storage", default=None, help="RDB URL (e.g. postgresql://...); default: a journal file in the study dir")
    a("--out-dir", default=None, help="sweeps directory (default results/sweeps)")
    a("--study-name", default=None, help="default: derived from the settings that define the objective")
    a("--sampler-seed", type=int, default=None)
    a("--pruner", choices=["median", "hyperband", "threshold", "none"], default=None)
    a("--prune-below", type=float, default=None, help="threshold pruner's lower bound")
    a("--no-references", dest="references", action="store_false", default=None, help="skip the reference points")
    a("--no-plots", dest="plots", action="store_false", default=None, help="skip the PNG plots")
    a("--heartbeat-s", type=int, default=None, help="RDB heartbeat interval, seconds (default 60)")
    a("--heartbeat-grace-s", type=int, default=None, help="RDB: a trial this long without heartbeat is retried")
    a("--report-only", action="store_true", help="only (re)write the outputs from the storage")
    a(
        "--export",
        action="store_true",
        help="copy the finished study from --storage into <out-dir>/<study>/journal.log and report from it",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> SweepSettings:
    data = read_params_file(args.params) if args.params else {}
    for key in _SETTING_TYPES:
        value = getattr(args, key, None)
        if value is None:
            continue
        if key == "seeds":
            try:
                value = [int(x) for x in str(value).split(",") if x.strip()]
            except ValueError as err:
                raise SweepError(f"--seeds {args.seeds!r}: expected comma-separated integers") from err
        if key == "sets":
            value = [*(data.get("sets") or []), *value]  # --set adds to the params file's sets
        data[key] = value
    return settings_from_mapping(data, str(args.params or "command line"))


def run_sweep_from_args(args: argparse.Namespace) -> int:
    """Exit code: 0 done or time budget spent, 1 too many diverged trials, 130 interrupted (rerun to resume).
    Bad settings raise SweepError/ConfigError (exit 2 in the CLI)."""
    from .engine.trainer import StopTraining

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = settings_from_args(args)
    report_only, export = getattr(args, "report_only", False), getattr(args, "export", False)
    if report_only and export:
        raise SweepError("--report-only and --export exclude each other (--export writes the outputs too)")
    try:
        if export:
            summary = export_study(settings)
        else:
            summary = write_outputs(settings) if report_only else run_sweep(settings)
    except (StopTraining, KeyboardInterrupt):
        print("sweep interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    best = summary["best"]
    print(
        json.dumps(
            {
                "study": summary["study_name"],
                "dir": summary["study_dir"],
                "status": summary["status"],
                "counts": {k: v for k, v in summary["counts"].items() if v},
                "best": None if best is None else {"value": best["value"], "params": best["params"]},
            },
            sort_keys=True,
        )
    )
    return 1 if summary["status"] == "too_many_failures" else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_sweep_args(
        argparse.ArgumentParser(prog="python -m vit_adapter.sweep", description=__doc__.splitlines()[0])
    )
    args = parser.parse_args(argv)
    try:
        return run_sweep_from_args(args)
    except (ValueError, FileNotFoundError, KeyError) as err:  # SweepError, ConfigError, DataError, no such study
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
