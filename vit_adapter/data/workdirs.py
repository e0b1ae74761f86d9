"""Work directories beside a target that this tool made, and the only ones its cleanup removes.

A writer builds ``<target>`` in a fresh ``.<target>.tmp-XXXXXXXX`` (tempfile.mkdtemp) beside it and renames it into
place; a replaced ``<target>`` waits in ``.<target>.old-XXXXXXXX``. Each such directory holds a marker file naming
its target. A killed writer leaves them behind, and the next writer of the same target (holding its lock) removes
exactly those: a directory counts as ours only by its exact name (compared as a string, never expanded as a glob,
since a target may be called ``d[1]``) *and* a marker naming this target. A user's ``.mydata.old-2024`` has
neither, so it is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

MARKER = ".vit-adapter-workdir"  # JSON {"target": name, "kind": "tmp"|"old", "pid": writer}
KINDS = ("tmp", "old")
_RANDOM_CHARS = 8  # tempfile.mkdtemp's name suffix
CONTENT = "content"  # the sub-directory of a tmp dir that becomes the target


def make_workdir(target: Path, kind: str) -> Path:
    """A new, marked, empty-but-for-the-marker directory ``.<target>.<kind>-XXXXXXXX`` beside ``target``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{kind}-"))
    marker = {"target": target.name, "kind": kind, "pid": os.getpid()}
    # surrogateescape: a target name need not be UTF-8 (the CLI refuses such names, the library does not).
    (work / MARKER).write_bytes(json.dumps(marker).encode("utf-8", "surrogateescape"))
    return work


def is_our_workdir(path: Path, target: Path) -> bool:
    """Whether ``path`` is a work directory that a writer of ``target`` made (exact name and marker)."""
    name = path.name
    for kind in KINDS:
        prefix = f".{target.name}.{kind}-"
        if name.startswith(prefix) and len(name) == len(prefix) + _RANDOM_CHARS:
            break
    else:
        return False
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        marker = json.loads((path / MARKER).read_bytes().decode("utf-8", "surrogateescape"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("target") == target.name and marker.get("kind") == kind


def remove_stale_workdirs(target: Path) -> list[Path]:
    """Remove the work directories that killed writers of ``target`` left beside it; returns them.

    Call it only while holding ``target``'s lock: then no live writer of ``target`` owns any of them."""
    if not target.parent.is_dir():
        return []
    removed = []
    with os.scandir(target.parent) as entries:
        candidates = [Path(e.path) for e in entries]
    for path in candidates:
        if is_our_workdir(path, target):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def swap_into_place(content: Path, target: Path) -> None:
    """Rename the finished ``content`` directory to ``target``; an old ``target`` is moved into a marked
    ``.old-`` directory first and removed after, so ``target`` is never half-written."""
    old = None
    if os.path.lexists(target):
        old = make_workdir(target, "old")
        os.replace(target, old / "d")
    os.replace(content, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
