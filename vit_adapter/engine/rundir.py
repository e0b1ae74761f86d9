"""The run-directory scheme, run metadata and determinism (atomic writes: ``vit_adapter.utils.io``).

Run-directory scheme (docs/config.md): a run works in ``<out>.partial/`` (config, logs, checkpoints) and is
renamed to ``<out>`` only when it finished. So ``<out>`` existing means "complete"; a crash or kill leaves
only ``<out>.partial/``, which the next start resumes from its newest readable checkpoint, provided the run
identity matches. A finished ``<out>`` is never overwritten unless asked, and even then the old one is kept
until the new run has finished. Only directories this tool wrote (they hold ``VIT_ADAPTER_RUN``, or
``RUN_IDENTITY`` for runs from before the marker) are ever replaced or deleted. One process at a time writes a
run: it holds an flock(2) on ``.<out>.lock`` beside it (released by the kernel even on ``kill -9``).
See docs/faults.md.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import wraps
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from vit_adapter.utils.io import TEMP_NAME_RE, atomic_open, atomic_write_text
from vit_adapter.utils.locks import DirectoryInUseError, DirLock
from vit_adapter.utils.paths import project_root

REPO_ROOT = project_root()
PARTIAL_SUFFIX = ".partial"
IDENTITY_FILE = "RUN_IDENTITY"  # holds the config hash inside the work dir
METRICS_FILE = "metrics.json"  # a run's final metrics; in `out` (reached only through finalize): finished
MARKER_FILE = "VIT_ADAPTER_RUN"  # "this directory is a run this tool wrote": the only kind it ever deletes
_CKPT_RE = re.compile(r"^iter_(\d+)\.pt$")


log = logging.getLogger(__name__)
RunStatus = Literal["finished", "partial", "damaged", "absent"]


class RunDirError(RuntimeError):
    """A run directory cannot be used as asked (finished already, other config, ...)."""


# The locks open_run_dir took inside a `releases_run_locks` call (per thread/context: a sweep's threads never
# release each other's).
_ACQUIRED: ContextVar[list[DirLock] | None] = ContextVar("vit_adapter_acquired_locks", default=None)


def releases_run_locks(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: every run lock taken during the call is released when it returns or raises."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _ACQUIRED.set([])
        try:
            return fn(*args, **kwargs)
        finally:
            for lock in _ACQUIRED.get() or []:
                lock.release()
            _ACQUIRED.reset(token)

    return wrapper


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete atomic_open temp files left in `folder` by a killed writer (call only while holding its lock)."""
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and TEMP_NAME_RE.match(p.name):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def is_tool_dir(path: Path) -> bool:
    """True for a directory this tool wrote: it holds the marker (or, from before the marker, RUN_IDENTITY)."""
    return path.is_dir() and ((path / MARKER_FILE).is_file() or (path / IDENTITY_FILE).is_file())


def holds_files(path: Path) -> bool:
    """True for a file, or a directory with any file below it (an empty tree has nothing to lose)."""
    if not path.is_dir() or path.is_symlink():
        return os.path.lexists(path)
    return any(not p.is_dir() or p.is_symlink() for p in path.rglob("*"))


# ---------------------------------------------------------------------------------------------------------
# Atomic writes live in vit_adapter.utils.io (re-exported here: callers import them from this module too).
# ---------------------------------------------------------------------------------------------------------


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save through a temp file, so a killed run never leaves a truncated checkpoint."""
    import torch  # local: keep `import vit_adapter.engine.rundir` cheap

    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# Run directory
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDir:
    """A run's final location `out` and its work dir `<out>.partial` (everything is written there)."""

    out: Path
    resumed: bool = False
    lock: DirLock | None = field(default=None, compare=False, repr=False)

    @property
    def work(self) -> Path:
        return self.out.with_name(self.out.name + PARTIAL_SUFFIX)

    @property
    def checkpoint_dir(self) -> Path:
        return self.work / "checkpoints"

    def path(self, name: str) -> Path:
        """A file inside the work dir (it moves to `out` on finalize)."""
        return self.work / name

    def checkpoint_path(self, iteration: int) -> Path:
        return self.checkpoint_dir / f"iter_{iteration:08d}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(iteration, path) of complete checkpoints, oldest first; temp files are ignored."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoint_dir.iterdir() if (m := _CKPT_RE.match(p.name))]
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1][1] if ckpts else None

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest `keep` checkpoints (keep >= 1, so resume always has one)."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        for _, p in self.checkpoints()[:-keep]:
            p.unlink(missing_ok=True)

    def status(self) -> RunStatus:
        """'finished' when `out` holds metrics.json (files reach `out` only through finalize), else 'partial'
        when the work dir exists (resumable), else 'damaged' when `out` exists without metrics, else 'absent'."""
        if (self.out / METRICS_FILE).is_file():
            return "finished"
        if self.work.exists():
            return "partial"
        return "damaged" if os.path.lexists(self.out) else "absent"

    def work_identity(self) -> str | None:
        """The identity the work dir was opened for (a resume needs the same one); None without a work dir."""
        try:
            return (self.work / IDENTITY_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            return None

    def discard(self, *, finished: bool = True) -> None:
        """Delete the work dir, and with `finished` the finished run too (a stale or pruned run is retrained)."""
        shutil.rmtree(self.work, ignore_errors=True)
        if finished:
            shutil.rmtree(self.out, ignore_errors=True)

    def release(self) -> None:
        """Give up the one-writer lock (idempotent); the trainer calls it however the run ended."""
        if self.lock is not None:
            self.lock.release()

    def finalize(self) -> Path:
        """Move the finished work dir to `out`. A previous `out` (overwrite) is removed only afterwards."""
        if not self.work.is_dir():
            raise RunDirError(f"nothing to finalize: {self.work} does not exist")
        remove_stale_temps(self.work)  # a temp left by a killed earlier attempt must not reach the finished run
        remove_stale_temps(self.checkpoint_dir)
        old = None
        if self.out.exists():
            old = self.out.with_name(f"{self.out.name}.replaced-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.work, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def open_run_dir(out: str | Path, identity: str, *, resume: bool = True, overwrite: bool = False) -> RunDir:
    """Lock, then create or resume `<out>.partial/` for a run whose identity string is `identity`.

    - `<out>` exists: RunDirError unless it is a run this tool wrote and `overwrite` (then the new run replaces it
      on finalize); anything else there is never touched.
    - `<out>.partial` exists: resumed if `resume` and its identity matches, else RunDirError on a mismatch;
      with `resume=False` it is wiped and the run starts fresh. Stale temp files in it are removed.
    - another process writing the same run: RunDirError naming its PID.
    The returned RunDir holds the lock until `release()` (or the process ends).
    """
    run = RunDir(Path(out))
    try:
        lock = DirLock(run.out, f"run directory {run.out}").acquire()
    except DirectoryInUseError as err:
        raise RunDirError(str(err)) from None
    if (acquired := _ACQUIRED.get()) is not None:
        acquired.append(lock)
    try:
        id_file = run.work / IDENTITY_FILE
        for path in (run.out, run.work):
            if holds_files(path) and not is_tool_dir(path):
                kind = "a directory" if path.is_dir() else "a file"
                raise RunDirError(
                    f"{path} is {kind} that vit-adapter did not write (no {MARKER_FILE}); refusing to use or "
                    "replace it: pick another output directory"
                )
        if is_tool_dir(run.out) and not overwrite:
            raise RunDirError(f"{run.out} holds a finished run; pass overwrite=True (--overwrite) to replace it")
        if run.work.exists():
            if not resume or not is_tool_dir(run.work):  # the latter: killed before its marker, no files
                shutil.rmtree(run.work)
            else:
                found = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else None
                if found != identity:
                    raise RunDirError(
                        f"{run.work} belongs to another config (hash {found}, now {identity}); "
                        "start fresh with resume=False (--no-resume) or pick another output directory"
                    )
                remove_stale_temps(run.work)
                remove_stale_temps(run.checkpoint_dir)
                return RunDir(run.out, resumed=True, lock=lock)
        run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.work / MARKER_FILE, "vit-adapter run directory; --overwrite may replace it\n")
        atomic_write_text(id_file, identity + "\n")
    except BaseException:
        lock.release()
        raise
    return RunDir(run.out, lock=lock)


def identity_marker(out: str | Path) -> Path:
    """``<out>.identity``: the identity a caller trains ``out`` for, when it is more than the trainer's own (the
    sweep's includes its study inputs); written before training starts."""
    out = Path(out)
    return out.with_name(out.name + ".identity")


def recorded_identity(out: str | Path, *, finished: bool) -> str | None:
    """The identity ``out`` was trained for: its ``<out>.identity`` marker, else what the trainer recorded (the
    finished run's run.json, or the work dir's RUN_IDENTITY); None when there is none."""
    run, marker = RunDir(Path(out)), identity_marker(out)
    try:
        if marker.is_file():
            return marker.read_text(encoding="utf-8").strip()
        if finished:
            return json.loads((run.out / "run.json").read_text(encoding="utf-8")).get("identity")
    except (OSError, json.JSONDecodeError):
        return None
    return run.work_identity()


def reuse_or_reset(out: str | Path, identity: str, *, record: bool = False) -> RunStatus:
    """Reuse or reset the run directory ``out`` for a run of ``identity``: 'finished' when ``out`` holds a run
    finished for it (keep its results), 'partial' when ``<out>.partial`` was opened for it (resume its
    checkpoint), else 'absent' after deleting whatever another identity left (train from scratch). ``record``:
    write ``identity`` to ``<out>.identity`` first, for callers whose identity is not the trainer's."""
    run = RunDir(Path(out))
    if run.status() == "finished" and recorded_identity(out, finished=True) == identity:
        return "finished"
    resumable = run.work.is_dir() and recorded_identity(out, finished=False) == identity
    if os.path.lexists(run.out) or (run.work.exists() and not resumable):
        log.warning("%s was trained for other inputs; training it again (identity now %s)", run.out, identity)
    if resumable:  # a finished (or damaged) `out` of another identity goes; the work dir resumes
        shutil.rmtree(run.out, ignore_errors=True)
    else:
        run.discard()
    if record:
        atomic_write_text(identity_marker(out), identity + "\n")
    return "partial" if resumable else "absent"


# ---------------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


# What the pipeline itself writes (dvc.yaml outs and dvc.lock): a run in the middle of `dvc repro` always sees
# these changed, so they would mark every regenerated run "dirty" although its code and configs are committed.
PIPELINE_OUTPUTS = ("results", "reports", "weights", "data", "dvc.lock")


def git_state(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """Commit hash (None before the first commit / outside git) and whether tracked or new files other than the
    pipeline's own outputs (``PIPELINE_OUTPUTS``) differ from it: code, configs, params, tests, docs."""
    commit = _git(["rev-parse", "--verify", "-q", "HEAD"], repo)
    status = _git(["status", "--porcelain", "--", ".", *(f":(exclude){p}" for p in PIPELINE_OUTPUTS)], repo)
    return {
        "commit": commit.strip() if commit else None,
        "dirty": None if status is None else bool(status.strip()),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_metadata(git: bool = True) -> dict[str, Any]:
    """Everything needed to trace a number back to code and machine: git, versions, host, CPU/GPU, time."""
    import torch

    meta: dict[str, Any] = {
        "utc_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {name: _version(name) for name in ("torch", "torchvision", "timm", "numpy", "safetensors")},
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    meta["versions"]["vit_adapter"] = _package_version()
    if git:
        meta["git"] = git_state()
    return meta


def _package_version() -> str:
    from vit_adapter import __version__

    return __version__


# ---------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------


def set_determinism(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; with `deterministic`, prefer deterministic kernels (warn, not fail)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS needs this before its first use to be reproducible; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: ops without a deterministic kernel (e.g. grid_sample backward on CUDA) warn, not fail.
    # Set both ways so that an earlier call in the same process does not leak into this run.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False  # detection inputs vary in size; autotuning would rerun often
