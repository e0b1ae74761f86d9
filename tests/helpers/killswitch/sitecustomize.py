"""Test-only start-up hook: with this folder first on PYTHONPATH and ``KILL_AFTER_ITER=N`` set, every training in
this process (and in the processes it starts, which inherit both) gets a hook that SIGKILLs the process after
iteration N, like ``kill -9`` at a known point. It changes nothing until ``vit_adapter.engine.trainer`` is
imported, so the processes that never train (dvc itself) stay as they are."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

TARGET = "vit_adapter.engine.trainer"


def _install(module) -> None:
    from vit_adapter.engine.hooks import Hook

    after = int(os.environ["KILL_AFTER_ITER"])

    class KillAfter(Hook):
        def after_step(self, loop) -> None:
            if loop.done == after:
                os.kill(os.getpid(), 9)

    defaults = module.default_hooks
    module.default_hooks = lambda extra: defaults([*extra, KillAfter()])


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module) -> None:
            run(module)
            _install(module)

        loader.exec_module = exec_module
        return spec


if os.environ.get("KILL_AFTER_ITER"):
    sys.meta_path.insert(0, _Finder())
