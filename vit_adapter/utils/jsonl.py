"""Append-only JSON-lines logs (``log.jsonl``) that survive a crash or a full disk mid-write.

A row is appended with one ``write(2)`` of the whole line on an ``O_APPEND`` descriptor, then fsync'ed. A write
the kernel cuts short (a full disk) or that fails is undone by truncating the file back to its size before the
row, so the file only ever ends with a complete line, and the error names the file. A crash (power loss, a
``kill -9`` of another tool in the middle of its write) can still leave a torn last line: the readers here drop
it with one warning, since it is the one row whose write never finished; a bad line anywhere else means the file
was edited or damaged, which is an error naming the file and line.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from .io import atomic_write_text


class JsonlError(ValueError):
    """A JSON-lines file with a damaged row that is not its last one."""


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append `row` as one line; on any failure the file is left exactly as it was and the error names it."""
    data = (json.dumps(row) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size  # one writer (the run lock): nobody appends between this and the write
        try:
            written = os.write(fd, data)
            if written != len(data):  # the kernel wrote what fitted; the rest would fail with ENOSPC
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        except OSError as err:
            with suppress(OSError):  # if even this fails, the reader still drops a torn last line
                os.ftruncate(fd, size)  # never leave half a row behind
            raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        os.close(fd)


def _lines(path: Path) -> tuple[list[tuple[str, Any]], str | None]:
    """(raw line, parsed row) of every complete row, and the torn last line (None when there is none)."""
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline, as every complete write leaves it
    rows: list[tuple[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append((line, json.loads(line)))
        except json.JSONDecodeError as err:
            if number == len(lines) and not tail:  # the last line: a write that did not finish
                return rows, line
            raise JsonlError(
                f"{path}: line {number} is not a JSON row ({err.msg}); the file was edited or damaged, "
                "so rows after it cannot be trusted: remove the line or start fresh with --no-resume"
            ) from None
    if tail:  # text after the last newline: its write was cut before the newline
        return rows, tail
    return rows, None


def read_rows(path: str | Path) -> list[Any]:
    """The rows of `path` (a torn last line dropped with one warning on stderr)."""
    rows, torn = _lines(Path(path))
    if torn is not None:
        _warn_torn(Path(path), len(rows) + 1)
    return [row for _, row in rows]


def keep_rows(path: str | Path, keep: Callable[[Any], bool]) -> None:
    """Rewrite `path` atomically with the rows for which `keep` is true, byte for byte as they were written.

    A torn last line is dropped with one warning; the rewrite is atomic, so a crash here loses nothing."""
    path = Path(path)
    rows, torn = _lines(path)
    if torn is not None:
        _warn_torn(path, len(rows) + 1)
    atomic_write_text(path, "".join(line + "\n" for line, row in rows if keep(row)))


def _warn_torn(path: Path, number: int) -> None:
    print(
        f"warning: {path}: dropped its incomplete last line {number} (a write that never finished, e.g. on a "
        "full disk or a crash)",
        file=sys.stderr,
    )
