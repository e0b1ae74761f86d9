"""Atomic file writes and sha256 digests: the one implementation every stage uses.

An atomic write goes to a temp file in the target's directory (same filesystem), is fsync'ed, then moved over
the target with ``os.replace``: a reader sees the old file or the new one, never half of one, and a killed
writer leaves at most a temp file named ``.<name>.<random>.tmp`` (``TEMP_NAME_RE``) beside the target.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMP_NAME_RE = re.compile(r"^\..+\.tmp$")  # the temp files below: `.<name>.<random>.tmp`
_CHUNK = 1 << 20


def _umask() -> int:
    """The process umask: from /proc on Linux (a read, safe beside other threads); elsewhere by setting it and
    straight back, the only portable way to read it."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp file's path beside `path` for a writer that needs a file name (e.g. safetensors).

    On clean exit the file is fsync'ed and replaces `path`; on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp creates 0600; a result file should get what open() would give it (0666 minus the umask,
        # 0644 by default), so that other users and a web server can read the runs.
        os.chmod(tmp, 0o666 & ~_umask())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside `path` ('wb', or 'w' as UTF-8); on clean exit it replaces `path`."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports modes 'wb' and 'w', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
        yield fh


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """JSON with sorted keys and a trailing newline; NaN/inf are refused (not valid JSON)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, allow_nan=False) + "\n")


def replace_dir(path: str | Path, files: Mapping[str, str]) -> Path:
    """Write `files` (name -> UTF-8 text) into a new directory that then replaces `path` whole: a reader sees
    the old set of files or the new one, and a file the old set had and the new one lacks is gone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        if path.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def plain_data(value: Any) -> Any:
    """`value` with tuples turned into lists, recursively: what a YAML/JSON round trip gives back, so a config
    saved and one built in memory compare (and hash) equal."""
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_data(v) for v in value]
    return value


def json_bytes(obj: Any) -> bytes:
    """Compact deterministic JSON (sorted keys, no spaces, trailing newline): identical inputs, identical bytes."""
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------------------------
# Digests
# ---------------------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = _CHUNK) -> str:
    """Hex sha256 of a file's bytes, read in `chunk`-sized blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
