"""Sweep settings: the search space's constants, the errors, SweepSettings and how it is read (params.yaml's
`sweep:` section, a mapping), and the storage URL's credential rules (placeholders, redaction)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config.typed import ConfigError, build_dataclass, read_yaml

# Search space: γ init × ConvFFN ratio. γ = 0, the paper's value, cannot be on a log scale: it is a reference point instead.
GAMMA = "gamma_init"
RATIO = "cffn_ratio"
SPACE_VERSION = 2  # bump when the space or the objective's definition changes in code
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
    # Trials drawn together from the same finished history (sweep/batches.py): fixes which trials the study runs,
    # whatever the workers and the load; at most this many workers train at once.
    batch_size: int = 2
    n_startup_trials: int = 4  # TPE's random start; fixed, not from n_trials: it decides the trials
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
        need(self.n_startup_trials >= 0, f"n_startup_trials = {self.n_startup_trials} must be >= 0")
        need(self.batch_size >= 1, f"batch_size = {self.batch_size} must be >= 1")
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
            secrets = [_url_password(self.storage)]
            secrets += [v.strip("'\"") for k, v in _query_secrets(self.storage) if k in _LITERAL_REFUSED]
            # A literal password would end up in params.yaml, shell history and `ps`; the environment holds it.
            need(
                all(not p or _PLACEHOLDER.fullmatch(p) is not None for p in secrets),
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


def _url_password(url: str) -> str | None:
    """The password part of a URL's user info (placeholders not expanded), or None."""
    if "://" not in url:
        return None
    head = re.split(r"[?#]", url.split("://", 1)[1], maxsplit=1)[0]
    if "@" not in head:
        return None
    userinfo = head.rsplit("@", 1)[0]  # the last "@": a raw "@" or "/" in the password does not hide it
    return userinfo.split(":", 1)[1] or None if ":" in userinfo else None


# Query parameters (and libpq `key=value` words in driver messages) whose value is a secret, or names a file
# holding one; generous on purpose: a redacted path costs nothing, a leaked password a rotation.
SECRET_KEYS = (
    "password",
    "passwd",
    "pwd",
    "passfile",
    "sslpassword",
    "sslkey",
    "sslcert",
    "sslrootcert",
    "token",
    "access_token",
    "auth_token",
    "refresh_token",
    "id_token",
    "secret",
    "client_secret",
    "api_key",
    "apikey",
    "private_key",
)
# Keys whose literal value is refused in `storage` (the others are file paths, which may stay literal).
_LITERAL_REFUSED = ("password", "passwd", "pwd", "sslpassword", "token", "access_token", "auth_token", "secret")
_SECRET_PARAM = re.compile(
    r"(?i)(?<![A-Za-z0-9_])(" + "|".join(SECRET_KEYS) + r")(\s*=\s*)('[^']*'|\"[^\"]*\"|[^&;#\s'\"]*)"
)
# `scheme://[user]:password@`: the user may be empty (`postgresql://:pw@host`); greedy up to the last "@" before
# whitespace, as a URL parser reads it.
_USERINFO = re.compile(r"(://[^/:@\s]*):(\S*)@")


def _query_secrets(url: str) -> list[tuple[str, str]]:
    """(key, value) of the secret query parameters of a URL, placeholders not expanded."""
    query = url.split("?", 1)[1].split("#", 1)[0] if "?" in url else ""
    return [(m.group(1).lower(), m.group(3)) for m in _SECRET_PARAM.finditer(query)]


def redact(text: str | None) -> str | None:
    """`text` (a storage URL, or a message quoting one) without secrets, for everything printed or written: the
    userinfo password (with or without a user name) and secret query parameters or libpq `key=value` words become
    ``***``. A ${VAR} placeholder is kept: it names where the secret comes from, and is no secret."""
    if text is None:
        return None

    def hide_userinfo(m: re.Match[str]) -> str:
        return m.group(0) if _PLACEHOLDER.fullmatch(m.group(2)) else f"{m.group(1)}:***@"

    def hide_param(m: re.Match[str]) -> str:
        value = m.group(3).strip("'\"")
        keep = not value or _PLACEHOLDER.fullmatch(value) is not None
        return m.group(0) if keep else f"{m.group(1)}{m.group(2)}***"

    return _SECRET_PARAM.sub(hide_param, _USERINFO.sub(hide_userinfo, text))


def scrub(message: str, url: str, written: str | None) -> str:
    """A driver's message about the connection to `url` (placeholders filled) made safe to print: the filled URL
    shown as `written` (placeholders kept), every secret value it holds replaced, then redact() for the rest."""
    message = message.replace(url, written or "")
    secrets = [_url_password(url), *(v.strip("'\"") for _, v in _query_secrets(url))]
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):  # longest first: no partial leftovers
        message = message.replace(secret, "***")
    return redact(message) or ""
