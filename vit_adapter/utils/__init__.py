"""Infrastructure shared by every layer: atomic writes, file digests, directory locks, the project root.

Imports flow one way (utils <- data <- models/engine <- pipeline/analysis): nothing here imports the rest of
``vit_adapter``.
"""

from .io import (
    TEMP_NAME_RE,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    json_bytes,
    plain_data,
    sha256_bytes,
    sha256_file,
)
from .locks import DirectoryInUseError, DirLock, lock_path
from .paths import PROJECT_MARKERS, project_root

__all__ = [
    "DirLock",
    "DirectoryInUseError",
    "PROJECT_MARKERS",
    "TEMP_NAME_RE",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "json_bytes",
    "lock_path",
    "plain_data",
    "project_root",
    "sha256_bytes",
    "sha256_file",
]
