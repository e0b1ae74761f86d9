"""vit_adapter.utils: atomic writes, digests, the project root, and that utils imports no other layer."""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

import pytest

from vit_adapter.utils import io, paths

UTILS = Path(io.__file__).resolve().parent


def test_utils_imports_nothing_else_from_the_package() -> None:
    for path in sorted(UTILS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith("vit_adapter"), (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("vit_adapter") for a in node.names), path.name


def test_atomic_writes_replace_and_leave_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    io.atomic_write_json(target, {"b": 1, "a": [1.5]})
    assert target.read_bytes() == b'{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    assert io.atomic_write_text(tmp_path / "t.txt", "é\n").read_bytes() == "é\n".encode()
    assert io.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    with pytest.raises(RuntimeError), io.atomic_open(target, "w") as fh:
        fh.write("half")
        raise RuntimeError
    with pytest.raises(ValueError):
        io.atomic_write_json(target, {"x": float("nan")})
    with pytest.raises(ValueError, match="modes"), io.atomic_open(target, "a"):
        pass
    assert json.loads(target.read_text()) == {"a": [1.5], "b": 1}
    assert not [p for p in tmp_path.rglob("*") if io.TEMP_NAME_RE.match(p.name)]


def test_atomic_path_fsyncs_then_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    out = tmp_path / "w.bin"
    with io.atomic_path(out) as tmp:
        assert io.TEMP_NAME_RE.match(tmp.name) and tmp.parent == tmp_path
        tmp.write_bytes(b"abc")
        assert not out.exists()
    assert out.read_bytes() == b"abc" and synced and not tmp.exists()


def test_digests_and_json_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * 2**20 + 7)
    (tmp_path / "f").write_bytes(data)
    assert io.sha256_file(tmp_path / "f") == io.sha256_bytes(data) == hashlib.sha256(data).hexdigest()
    assert io.sha256_file(tmp_path / "f", chunk=1000) == io.sha256_bytes(data)
    assert io.json_bytes({"b": [1, 2], "a": "x"}) == b'{"a":"x","b":[1,2]}\n'


def test_project_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Path(__file__).resolve().parents[1]
    assert paths.project_root() == repo
    monkeypatch.chdir(tmp_path)  # the checkout wins over the working directory
    assert paths.project_root() == repo
    with pytest.raises(ValueError, match="not a project root"):
        paths.project_root(tmp_path)
    (tmp_path / "experiments").mkdir()
    assert paths.project_root(tmp_path) == tmp_path.resolve()
    monkeypatch.setattr(paths, "_CHECKOUT", tmp_path / "elsewhere")  # e.g. installed outside a checkout
    assert paths.project_root() == tmp_path.resolve()
