"""Notice a dataset replaced under a running training run, cheaply, before each evaluation.

The run identity digests the data once, at start (``engine.identity``); hashing it again before every evaluation
would cost as much as the start. But ``vit-adapter data --overwrite`` (and any tool that writes a new tree and
renames it into place, as it does) gives the root directory and its top-level files new inodes, so a stat of the
root and of its entries tells whether the tree the run started on is still the one it reads. A run that notices
stops with one line instead of evaluating (and reporting) metrics of other data under the old data digest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class DataChangedError(ValueError):
    """The dataset root was replaced or changed while the run used it."""


def _stamp(root: Path) -> tuple[tuple[str, int, int, int, int], ...]:
    entries = [root, *sorted(root.iterdir())]
    out = []
    for p in entries:
        st = os.stat(p)
        out.append((p.name, st.st_dev, st.st_ino, st.st_size if p.is_file() else 0, st.st_mtime_ns))
    return tuple(out)


@dataclass(frozen=True)
class DataStamp:
    """(name, device, inode, size, mtime) of a dataset root and its top-level entries, taken at run start."""

    root: Path
    entries: tuple[tuple[str, int, int, int, int], ...]

    @classmethod
    def take(cls, root: str | Path) -> DataStamp:
        root = Path(root)
        return cls(root, _stamp(root))

    def check(self) -> None:
        """Raise DataChangedError when the root is no longer the tree the run started on."""
        try:
            now = _stamp(self.root)
        except OSError:
            now = None
        if now != self.entries:
            raise DataChangedError(
                f"dataset {self.root} was replaced or changed while this run used it (e.g. `vit-adapter data "
                "--overwrite`); its metrics would mix two datasets, so the run stopped: rerun it with --no-resume "
                "once the data is final"
            )
