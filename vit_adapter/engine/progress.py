"""Human-readable progress of training and pretraining: ``<run_dir>/train.log`` and stderr (log.jsonl, metrics.json
and the pretraining sidecar are the machine-readable record), plus the tqdm bar's terminal check."""

from __future__ import annotations

import datetime
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)
if log.level == logging.NOTSET:  # the human-readable progress lines are INFO; a caller may still lower or raise it
    log.setLevel(logging.INFO)

LOG_FORMAT = "%(asctime)s %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"
TRAIN_LOG = "train.log"


def stderr_is_tty() -> bool:
    """Progress bars only on a terminal: the pipeline captures stderr into files, where a bar is noise."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class _ThisThread(logging.Filter):
    """Only records of the thread that attached the handler: a sweep trains several runs in threads at once."""

    def __init__(self) -> None:
        super().__init__()
        self.ident = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.ident


class _TqdmStderr(logging.Handler):
    """The current ``sys.stderr``, through ``tqdm.write`` so that a progress bar on a terminal stays intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


@contextmanager
def run_log(path: Path | None) -> Iterator[None]:
    """Send this module's log lines to ``path`` (appended: a resumed run continues its log) and, when nothing
    else handles them (no logging configured: the CLI, the pipeline), to stderr; detached on exit."""
    handlers: list[logging.Handler] = []
    if not log.hasHandlers():
        handlers.append(_TqdmStderr())
    if path is not None:
        handlers.append(logging.FileHandler(path, encoding="utf-8"))
    fmt, only_here = logging.Formatter(LOG_FORMAT, LOG_DATEFMT), _ThisThread()
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(only_here)
        log.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()


def duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


def format_iteration(
    done: int, total: int, loss: float, lr: float, s_per_it: float, eta_s: float, mem_mb: float
) -> str:
    """``iter 40/160  loss 0.4213  lr 9.1e-04  2.31 s/it  eta 0:04:37  mem 1.9 GiB`` (mem: peak RSS on CPU,
    peak allocated on CUDA)."""
    return (
        f"iter {done}/{total}  loss {loss:.4f}  lr {lr:.1e}  {s_per_it:.2f} s/it  eta {duration(eta_s)}  "
        f"mem {mem_mb / 1024:.1f} GiB"
    )


def format_metrics(metrics: dict[str, Any]) -> str:
    """The scalar metrics of an evaluation (per-class lists are left to metrics.json)."""
    parts = []
    for k, v in metrics.items():
        if isinstance(v, bool) or not (v is None or isinstance(v, int | float)):
            continue
        parts.append(f"{k} {'n/a' if v is None else f'{v:.4f}'}")
    return "  ".join(parts) or "(no scalar metrics)"


def log_progress(done: int, total: int, loss: float, lr: float, s_per_it: float, eta_s: float) -> None:
    """One progress line (``format_iteration``) with this process's peak memory on CPU: the pretraining's."""
    import resource

    log.info(
        format_iteration(
            done, total, loss, lr, s_per_it, eta_s, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
    )
