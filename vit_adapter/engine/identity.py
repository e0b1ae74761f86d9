"""Content identity: what determines a run's numbers, as digests of content rather than of paths.

A run (and a sweep study) is reused only when its *identity* is unchanged. The identity hashes

- the resolved config without the execution-only keys (``EXECUTION_KEYS``: threads, device, paths of inputs),
- the sha256 of the pretrained weights file it loads (``None`` for a random init),
- a digest of the dataset it reads (every byte of a small dataset such as the generated one; for a large one
  the annotation/manifest files' bytes plus every other file's name and size),
- a digest of the package code that computes it (every source file under ``vit_adapter/`` except those that
  only read results, plan or parse command lines: ``analysis/``, the sweep driver, ``cli.py``, ``plan.py``;
  a sweep study adds the sweep driver back, see ``CODE_SCOPES``). Python modules are digested by *meaning*:
  their syntax tree with docstrings removed (comments and formatting are not in the tree), so editing a
  comment, a docstring or the layout keeps every identity, while any change to what executes (a statement, a
  name, a constant, a default, an import) moves it. YAML files are digested as their parsed data; other files
  (C++ kernel sources) by their bytes.

So re-pretraining the weights at the same path, regenerating the data differently, or editing the code makes
every dependent run (and sweep trial) stale, where a path-based config hash would have kept them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

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
    "run": ("analysis", "sweep", "cli.py", "plan.py"),
    "sweep": ("analysis", "cli.py", "plan.py"),
}
# Bump when the recipe below changes: old identities must not match new ones. 2: Python by syntax tree.
IDENTITY_VERSION = 2


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


_DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _without_docstrings(tree: ast.AST) -> ast.AST:
    """`tree` with every module, class and function docstring removed (a body left empty gets ``pass``)."""
    for node in ast.walk(tree):
        if not isinstance(node, _DOCSTRING_OWNERS):
            continue
        first = node.body[0] if node.body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            node.body = node.body[1:] or [ast.Pass()]
    return tree


def meaning_bytes(path: Path) -> bytes:
    """What of a source file can change a computation: a Python module's syntax tree without docstrings (no
    comments, no formatting, no line numbers), a YAML file's parsed data, any other file's bytes. A file that
    does not parse is taken by its bytes (it fails when imported anyway)."""
    raw = path.read_bytes()
    try:
        if path.suffix == ".py":
            tree = _without_docstrings(ast.parse(raw, filename=str(path)))
            return ast.dump(tree, annotate_fields=True, include_attributes=False).encode("utf-8")
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(raw.decode("utf-8"))
            return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    except (SyntaxError, ValueError, UnicodeDecodeError, yaml.YAMLError):
        pass
    return raw


@lru_cache(maxsize=8)
def code_digest(scope: str = "run", root: Path = PACKAGE_ROOT) -> str:
    """sha256 over (relative path, meaning) of the scope's source files (``meaning_bytes``); computed once per
    process."""
    digest = hashlib.sha256()
    for path in code_files(scope, root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(meaning_bytes(path)).digest())
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
