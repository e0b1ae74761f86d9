"""Rendering processes that end with their parent.

A forked worker blocks on its task queue; when the parent is killed (``kill -9``, the OOM killer) the queue's
write end stays open in the sibling workers, so they used to wait for minutes holding the parent's memory. Each
worker therefore asks the kernel for SIGKILL when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere
a thread polls the parent's PID). Workers ignore SIGINT (Ctrl-C reaches the whole process group; the parent
handles it and stops the pool) and take the default SIGTERM action (the parent's handler, inherited through
fork, would raise inside a worker).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this process as soon as ``parent`` is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


@contextlib.contextmanager
def render_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """``workers`` forked processes (fork shares the loaded silhouettes and textures), or None for 1 or where
    fork is unavailable. On an exception (a signal, a full disk) the queued work is cancelled."""
    import multiprocessing as mp

    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        yield None
        return
    pool = ProcessPoolExecutor(
        workers, mp_context=mp.get_context("fork"), initializer=_die_with_parent, initargs=(os.getpid(),)
    )
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # waits only for the chunks already started
        raise
    pool.shutdown(wait=True)
