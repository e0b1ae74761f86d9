"""Content identity: what determines a run's numbers, as digests of content rather than of paths.

A run (and a sweep study) is reused only when its *identity* is unchanged. The identity hashes

- the resolved config without the execution-only keys (``EXECUTION_KEYS``: threads, device, paths of inputs),
- the sha256 of the pretrained weights file it loads (``None`` for a random init),
- a digest of the dataset it reads (every byte of a small dataset such as the generated one; for a large one
  the annotation/manifest files' bytes plus every other file's name and size),
- a digest of the package code that computes it (every source file under ``vit_adapter/`` except those that
  only read results or parse command lines: ``analysis/``, the sweep driver, ``cli.py``; a sweep study adds the
  sweep driver back, see ``CODE_SCOPES``).

So re-pretraining the weights at the same path, regenerating the data differently, or editing the code makes
every dependent run (and sweep trial) stale, where a path-based config hash would have kept them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..utils.io import sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # vit_adapter/
# Files under the package that can change what a stage computes (C++ sources of compiled kernels included).
CODE_SUFFIXES = (".py", ".cpp", ".cc", ".h", ".hpp", ".cu", ".yaml", ".yml", ".json")
# Datasets up to this size are identified by every byte; larger ones (COCO: ~20 GB) by their annotation and
# manifest files' bytes plus the name and size of every other file (hashing 20 GB per run would cost minutes).
CONTENT_LIMIT_BYTES = 512 * 2**20
_METADATA_SUFFIXES = (".json", ".txt", ".yaml", ".yml", ".csv")
# Package paths (relative to vit_adapter/) left out of each scope's code digest. "run": what trains and
# evaluates one run (the DVC train stages depend on exactly the rest); "sweep": the same plus the sweep driver.
CODE_SCOPES: dict[str, tuple[str, ...]] = {
    "run": ("analysis", "sweep", "sweep.py", "cli.py"),
    "sweep": ("analysis", "cli.py"),
}
IDENTITY_VERSION = 1  # bump when the recipe below changes: old identities must not match new ones


def _files(root: Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden and cache folders are not inputs (temp dirs of an interrupted writer, __pycache__).
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if suffixes is None or name.endswith(suffixes):
                out.append(Path(dirpath) / name)
    return out


def code_files(scope: str = "run", root: Path = PACKAGE_ROOT) -> list[Path]:
    """The package's source files that a `scope` (a key of CODE_SCOPES) computes with."""
    if scope not in CODE_SCOPES:
        raise ValueError(f"unknown code scope {scope!r}; expected one of {sorted(CODE_SCOPES)}")
    skip = CODE_SCOPES[scope]
    return [p for p in _files(root, CODE_SUFFIXES) if p.relative_to(root).parts[0] not in skip]


@lru_cache(maxsize=4)
def code_digest(scope: str = "run", root: Path = PACKAGE_ROOT) -> str:
    """sha256 over (relative path, bytes) of the scope's source files; computed once per process."""
    digest = hashlib.sha256()
    for path in code_files(scope, root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def tree_digest(root: str | os.PathLike[str], content_limit: int = CONTENT_LIMIT_BYTES) -> str:
    """Digest of a dataset folder, prefixed by how it was taken: ``content:`` (every byte) or ``listing:``."""
    root = Path(root)
    files = _files(root)
    total = sum(p.stat().st_size for p in files)
    by_content = total <= content_limit
    digest = hashlib.sha256()
    for path in files:
        rel = path.relative_to(root).as_posix()
        if by_content or path.suffix in _METADATA_SUFFIXES:
            entry = f"{rel}\0{sha256_file(path)}"
        else:
            entry = f"{rel}\0size={path.stat().st_size}"
        digest.update(entry.encode() + b"\n")
    return ("content:" if by_content else "listing:") + digest.hexdigest()


def input_digests(cfg: Config, scope: str = "run") -> dict[str, str | None]:
    """The digests of everything besides the config that a training run of `cfg` reads (code of `scope`)."""
    from .build import data_root, resolve_weights  # local: build imports the models (torch)

    weights = resolve_weights(cfg)
    return {
        "code": code_digest(scope),
        "data": tree_digest(data_root(cfg)),
        "weights": sha256_file(weights) if weights is not None else None,
    }


def identity_of(config_digest: str, inputs: Mapping[str, Any]) -> str:
    """One sha256 over the config digest and the input digests (the run/study identity)."""
    blob = json.dumps(
        {"version": IDENTITY_VERSION, "config": config_digest, "inputs": dict(inputs)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def run_identity(cfg: Config, inputs: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(identity, input digests) of a training run of `cfg`: what ``RUN_IDENTITY`` and ``run.json`` record."""
    from .config import EXECUTION_KEYS, config_hash

    digests = dict(inputs) if inputs is not None else input_digests(cfg)
    return identity_of(config_hash(cfg, exclude=EXECUTION_KEYS), digests), digests
