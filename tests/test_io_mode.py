"""Files written through vit_adapter.utils.io get the mode open() would give them (0666 minus the umask), not
mkstemp's 0600: run directories and results are readable by the other users of a shared machine."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from vit_adapter.utils.io import atomic_open, atomic_path, atomic_write_json, atomic_write_text


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path: Path, umask: None, mask: int) -> None:
    os.umask(mask)
    want = 0o666 & ~mask
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "b.json", {"k": 1})
    with atomic_open(tmp_path / "c.bin", "wb") as fh:
        fh.write(b"x")
    with atomic_path(tmp_path / "d.bin") as tmp:
        tmp.write_bytes(b"x")
    for name in ("a.txt", "b.json", "c.bin", "d.bin"):
        assert _mode(tmp_path / name) == want, (name, oct(_mode(tmp_path / name)), oct(want))


def test_default_umask_gives_0644_like_open(tmp_path: Path, umask: None) -> None:
    atomic_write_text(tmp_path / "ours.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    assert _mode(tmp_path / "ours.txt") == _mode(tmp_path / "plain.txt") == 0o644


def test_overwrite_keeps_the_umask_mode_and_leaves_no_temp(tmp_path: Path, umask: None) -> None:
    target = tmp_path / "t.txt"
    target.write_text("old")
    os.chmod(target, 0o600)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and _mode(target) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]
