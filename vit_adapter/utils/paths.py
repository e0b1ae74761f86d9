"""The project root: the checkout whose ``dvc.yaml`` / ``experiments/`` the stages read and write."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_MARKERS = ("dvc.yaml", "experiments")  # either one marks a project root
_CHECKOUT = Path(__file__).resolve().parents[2]  # the folder holding vit_adapter/


def _is_root(path: Path) -> bool:
    return any((path / marker).exists() for marker in PROJECT_MARKERS)


def project_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The project root, resolved.

    An explicit `root` must contain ``dvc.yaml`` or ``experiments/`` (ValueError otherwise). Without one it is
    the checkout this package lies in (the folder above ``vit_adapter/``) when that is a project, else the
    working directory when that is one, else the checkout all the same (a package installed outside a
    checkout resolves as it always did)."""
    if root is not None:
        path = Path(root).expanduser().resolve()
        if not _is_root(path):
            raise ValueError(f"not a project root (no {' or '.join(PROJECT_MARKERS)}): {path}")
        return path
    if _is_root(_CHECKOUT):
        return _CHECKOUT
    cwd = Path.cwd().resolve()
    return cwd if _is_root(cwd) else _CHECKOUT
