"""Run identity = content (issue: results integrity): digests of code, data and weights, the aggregation's refusal to
mix runs with different inputs, the report's digest check, and DVC deps that cover every imported module."""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_analysis import make_run
from vit_adapter.analysis import aggregate, report
from vit_adapter.engine import identity
from vit_adapter.engine.config import load_config

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "vit_adapter"


# ---------------------------------------------------------------------------------------------------------
# digests


def _fresh_digest(scope: str, root: Path) -> str:
    identity.code_digest.cache_clear()  # cached per process (the code of a running process does not change)
    return identity.code_digest(scope, root)


def test_code_digest_follows_the_code_meaning_not_its_bytes(tmp_path: Path) -> None:
    pkg = tmp_path / "vit_adapter"
    shutil.copytree(PKG, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = {s: _fresh_digest(s, pkg) for s in identity.CODE_SCOPES}
    trainer = pkg / "engine" / "identity.py"
    source = trainer.read_text()
    # comments, docstrings and layout are not what a run computes: no identity moves
    edited = source.replace('"""Content identity:', '"""Edited docstring. Content identity:', 1)
    edited = edited.replace("\nimport ast\n", "\n# a comment\nimport ast  # another\n\n\n", 1)
    edited = edited.replace("def _files(root: Path, ", "def _files(\n    root: Path,\n    ", 1)
    assert edited != source
    trainer.write_text(edited + "\n# trailing comment\n")
    assert {s: _fresh_digest(s, pkg) for s in identity.CODE_SCOPES} == before
    # any change to executed code moves both scopes: a constant, a name, a default
    for old, new in (
        ("CONTENT_LIMIT_BYTES = 512 * 2**20", "CONTENT_LIMIT_BYTES = 511 * 2**20"),
        ("def _files(", "def _files_renamed("),
        ('scope: str = "run", root', 'scope: str = "sweep", root'),
    ):
        assert old in edited, old
        trainer.write_text(edited.replace(old, new, 1))
        after = {s: _fresh_digest(s, pkg) for s in identity.CODE_SCOPES}
        assert all(after[s] != before[s] for s in identity.CODE_SCOPES), old
    trainer.write_text(source.replace("CONTENT_LIMIT_BYTES = 512 * 2**20", "CONTENT_LIMIT_BYTES = 511 * 2**20"))
    after = {s: _fresh_digest(s, pkg) for s in identity.CODE_SCOPES}
    # the report code reads results only: no run or sweep identity moves
    rep = pkg / "analysis" / "report.py"
    rep.write_text(rep.read_text() + "\nEDITED = 1\n")
    assert {s: _fresh_digest(s, pkg) for s in identity.CODE_SCOPES} == after
    # the sweep driver is in the sweep's scope, not in a run's
    sweep = pkg / "sweep" / "__init__.py"
    sweep.write_text(sweep.read_text() + "\nEDITED = 1\n")
    assert _fresh_digest("run", pkg) == after["run"]
    assert _fresh_digest("sweep", pkg) != after["sweep"]
    # other sources (a kernel's C++) count by their bytes
    cpp = next(pkg.rglob("*.cpp"))
    cpp.write_text(cpp.read_text() + "\n// edited\n")
    assert _fresh_digest("run", pkg) != after["run"]
    with pytest.raises(ValueError, match="unknown code scope"):
        identity.code_files("nope", pkg)


def test_tree_digest_content_and_listing(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"\x00" * 100)
    (root / "manifest.json").write_text('{"n": 1}')
    (root / ".tmp-partial").mkdir()  # hidden: an interrupted writer's temp dir is not part of the dataset
    (root / ".tmp-partial" / "x").write_bytes(b"junk")
    d0 = identity.tree_digest(root)
    assert d0.startswith("content:")
    (root / "images" / "a.png").write_bytes(b"\x01" + b"\x00" * 99)  # same size, other bytes
    d1 = identity.tree_digest(root)
    assert d1 != d0
    # above the content limit: image bytes are identified by size, annotation/manifest files by content
    l1 = identity.tree_digest(root, content_limit=10)
    assert l1.startswith("listing:")
    (root / "images" / "a.png").write_bytes(b"\x02" + b"\x00" * 99)
    assert identity.tree_digest(root, content_limit=10) == l1
    (root / "manifest.json").write_text('{"n": 2}')
    assert identity.tree_digest(root, content_limit=10) != l1


def _tiny_cfg(tmp_path: Path, weights: Path | None, threads: int = 1):
    data = tmp_path / "data"
    (data / "x").mkdir(parents=True, exist_ok=True)
    if not (data / "x" / "f.bin").exists():
        (data / "x" / "f.bin").write_bytes(b"abc")
    sets = [f"data.root={data}", f"train.threads={threads}"]
    if weights is None:
        sets.append("weights.init=scratch")
    else:
        sets += ["weights.init=pretrained", f"weights.source={weights}"]
    return load_config("cpu_default", [], sets)


def _write_weights(path: Path, value: float) -> None:
    import torch

    from vit_adapter.engine.weights import _save_safetensors, sha256_file, sidecar_path

    _save_safetensors({"w": torch.full((4,), value)}, path)
    sidecar_path(path).write_text(json.dumps({"output_sha256": sha256_file(path)}))


def test_run_identity_hashes_weight_bytes_not_the_path(tmp_path: Path) -> None:
    w = tmp_path / "weights.safetensors"
    _write_weights(w, 1.0)
    cfg = _tiny_cfg(tmp_path, w)
    id1, inputs1 = identity.run_identity(cfg)
    assert inputs1["weights"] == identity.sha256_file(w) and inputs1["data"].startswith("content:")
    assert inputs1["code"] == identity.code_digest("run")
    _write_weights(w, 2.0)  # re-pretrained at the same path (another CPU, another seed)
    id2, inputs2 = identity.run_identity(cfg)
    assert id2 != id1 and inputs2["weights"] != inputs1["weights"]
    # execution-only settings do not change the identity (a run resumes with other threads)
    assert identity.run_identity(_tiny_cfg(tmp_path, w, threads=2))[0] == id2
    # the data's bytes do
    (tmp_path / "data" / "x" / "f.bin").write_bytes(b"abd")
    assert identity.run_identity(cfg)[0] != id2
    # a random init reads no weights
    assert identity.run_identity(_tiny_cfg(tmp_path, None))[1]["weights"] is None


# ---------------------------------------------------------------------------------------------------------
# aggregation and report refuse mixed inputs


def _record_inputs(run: Path, **inputs: str | None) -> None:
    meta = {"inputs": {"code": "c1", "data": "d1", "weights": "w1", **inputs}}
    (run / "run.json").write_text(json.dumps(meta))


def _runs_with_inputs(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    for variant in ("baseline", "full"):
        for seed in (0, 1):
            run = make_run(runs, variant, seed, 30.0 + seed + (variant == "full"))
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            cfg["weights"] = {"init": "pretrained"}
            (run / "config.yaml").write_text(yaml.safe_dump(cfg))
            _record_inputs(run)
    return runs


def test_aggregate_refuses_runs_with_different_input_digests(tmp_path: Path, capsys) -> None:
    runs = _runs_with_inputs(tmp_path)
    df = aggregate.collect_runs(runs)
    assert df.attrs["inputs"] == {"code": "c1", "data": "d1", "weights": "w1"}
    _record_inputs(runs / "full" / "s1", weights="w2")  # one run trained from other weights
    code = aggregate.main(["--runs", str(runs), "--out", str(tmp_path / "out"), "--no-check"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "different weights" in err and "full/s1" in err and "baseline/s0" in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_random_init_runs_join_a_table_without_weights(tmp_path: Path) -> None:
    runs = _runs_with_inputs(tmp_path)
    run = make_run(runs, "baseline_scratch", 0, 20.0)  # weights.init: scratch
    _record_inputs(run, weights=None)
    assert aggregate.collect_runs(runs).attrs["inputs"]["weights"] == "w1"
    _record_inputs(run, weights=None, data="d2")  # but never other data
    with pytest.raises(ValueError, match="different data"):
        aggregate.collect_runs(runs)


def test_runs_without_digests_cannot_join_recorded_ones(tmp_path: Path) -> None:
    runs = _runs_with_inputs(tmp_path)
    (runs / "full" / "s0" / "run.json").write_text("{}")  # an old run: no digests recorded
    with pytest.raises(ValueError, match="without recorded input digests.*full/s0"):
        aggregate.collect_runs(runs)


def test_metrics_document_lists_every_variant(tmp_path: Path) -> None:
    runs = _runs_with_inputs(tmp_path)
    out = tmp_path / "out"
    assert aggregate.main(["--runs", str(runs), "--out", str(out), "--no-check", "--n-boot", "10"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc["variants"]) == {"baseline", "full"} and doc["metric"] == "mIoU"
    assert doc["variants"]["full"]["mean"] == pytest.approx(31.5) and doc["variants"]["full"]["n"] == 2
    assert doc["variants"]["baseline"]["delta_vs_full"] == pytest.approx(-1.0)
    assert doc["inputs"] == {"code": "c1", "data": "d1", "weights": "w1"}


def test_report_refuses_weights_other_than_the_runs(tmp_path: Path) -> None:
    runs = _runs_with_inputs(tmp_path)
    df = aggregate.collect_runs(runs)
    pj = tmp_path / "w.safetensors.json"
    pj.write_text(json.dumps({"output_sha256": "w1"}))
    assert report.shared_inputs(df, pj, None)["weights"] == "w1"
    pj.write_text(json.dumps({"output_sha256": "w9" * 10}))
    with pytest.raises(ValueError, match="runs are stale"):
        report.shared_inputs(df, pj, None)


# ---------------------------------------------------------------------------------------------------------
# DVC deps cover all imported code


def _module_file(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for cand in (REPO / rel.with_suffix(".py"), REPO / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports_of(path: Path, module: str) -> set[str]:
    """Every vit_adapter module `path` imports, at top level or inside functions (lazy imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vit_adapter")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("vit_adapter"):
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names if _module_file(f"{target}.{a.name}")}
    # importing a.b.c runs a/__init__.py and a/b/__init__.py too
    for name in list(found):
        parts = name.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return {m for m in found if _module_file(m)}


def import_closure(entry: str) -> set[Path]:
    todo, seen = [entry], set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo += sorted(_imports_of(_module_file(mod), mod) - seen)
    return {_module_file(m) for m in seen}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _entry(cmd: str) -> tuple[str, Path] | None:
    words = cmd.split()
    if words[:2] == ["python", "-m"]:
        return words[2], _module_file(words[2])
    if words[0] == "python" and words[1].endswith(".py"):
        return "__main__", REPO / words[1]
    return None


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_stage_deps_cover_every_module_its_entry_point_imports(stage: str) -> None:
    spec = _stages()[stage]
    entry = _entry(" ".join(spec["cmd"].split()))
    assert entry is not None, f"stage {stage}: unrecognised command"
    name, path = entry
    if name == "__main__":  # a bench script: its own file and what it imports from vit_adapter
        files = {path}
        for mod in _imports_of(path, "bench.__main__"):
            files |= import_closure(mod)
    else:
        files = import_closure(name)
    deps = [d for d in spec["deps"] if isinstance(d, str)]
    missing = sorted(p.relative_to(REPO).as_posix() for p in files if not _covered(p, deps))
    assert not missing, f"stage {stage} imports code outside its deps: {missing}"


def test_train_stage_code_deps_equal_the_run_identity_scope() -> None:
    """DVC reruns a train stage exactly when a file the run identity digests changes (and vice versa)."""
    deps = [d for d in _stages()["train"]["deps"] if d.startswith("vit_adapter")]
    under_deps = {p for p in PKG.rglob("*") if p.is_file() and _covered(p, deps)}
    under_deps = {p for p in under_deps if p.suffix in identity.CODE_SUFFIXES and "__pycache__" not in p.parts}
    assert under_deps == set(identity.code_files("run"))
    # and everything the training process imports is in that scope
    assert import_closure("vit_adapter.pipeline") <= set(identity.code_files("run"))


def test_overlays_are_dvc_params_of_their_stage() -> None:
    params = _stages()["train"]["params"]
    assert {"ablations/${item.variant}.yaml": None} in params


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# ---------------------------------------------------------------------------------------------------------
# the fresh-clone contract, on the real repository


def _git(*args: str) -> str:
    import subprocess

    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def test_a_clean_checkout_is_up_to_date_with_its_committed_results() -> None:
    """On a clean clone (CI), everything the committed results depend on is committed too: `dvc status` has
    nothing to do, so `make repro` is a no-op. Skipped in a working tree with uncommitted changes, where a stale
    lock is work in progress rather than a broken contract."""
    import os
    import subprocess

    if _git("status", "--porcelain", "--untracked-files=no").strip():
        pytest.skip("working tree differs from HEAD: the contract is checked on a clean checkout")
    for rel in ("dvc.lock", "data/generated", "weights/vit_cpu_pretrained.safetensors", "results/metrics.json"):
        assert (REPO / rel).exists(), f"{rel} is not committed"
    dvc = Path(sys.executable).parent / "dvc"
    env = {**os.environ, "PATH": f"{dvc.parent}:{os.environ['PATH']}"}
    proc = subprocess.run([str(dvc), "status", "--json"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout or "{}") == {}, f"stale stages on a clean checkout: {proc.stdout[:2000]}"
