"""Fault reproducers for bad input, paths and signals (docs/faults.md, "Tested faults"): each `test_b<N>_...`
reproduces fault B<N> of the table there and checks the promised outcome: one `error:` line and exit 2 for bad
input, 130 for SIGINT, 143 for SIGTERM, nothing half-written, nothing deleted that this tool did not make.

In-process (``cli.main(argv)``) except where a real signal or a killed process is the point."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_engine import tiny_sets
from vit_adapter.cli import main
from vit_adapter.data import generate_dataset

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--set", "data.n_train=2", "--set", "data.n_val=1", "--set", "data.image_size=64", "--quiet"]

# torch logs "No CUDA runtime is found" once per process when cpp_extension is first imported; import it now so
# that the first CLI call's stderr holds only ours.
import torch.utils.cpp_extension  # noqa: E402, F401


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "gen"
    generate_dataset(root, n_train=8, n_val=4, image_size=64, seed=0, objects_per_image=(2, 3))
    return root


def _train(out: Path | None, root: Path, *extra: str, config: str = "cpu_default") -> list[str]:
    """A 4-iteration seg run on the tiny set; `extra` are further --set values (they win)."""
    sets = tiny_sets(root, "seg", iters=4, extra=list(extra))
    out_args = [] if out is None else ["--out", str(out)]
    return ["train", "--config", config, *out_args, "--quiet", *[a for s in sets for a in ("--set", s)]]


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr (stripped); stdout is dropped."""
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def _one_error(code: int, err: str, *needles: str) -> None:
    """Exit 2 and exactly one `error:` line holding every needle."""
    assert code == 2, err
    assert len(err.splitlines()) == 1 and ": error: " in err, err
    for needle in needles:
        assert needle in err, err


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------------
# B2, B3: `data` deletes only the work directories its own writers made, found by exact name and marker


def test_b2_data_root_name_is_not_expanded_as_a_glob(tmp_path, capsys) -> None:
    # A concurrent `data --out d1` is rendering into its work dir; `d[1]` as a glob pattern matches `d1`.
    other = tmp_path / ".d1.tmp-abcd1234"
    (other / "content" / "train2017").mkdir(parents=True)
    (other / "content" / "train2017" / "000000000001.png").write_bytes(b"in progress")
    (other / ".vit-adapter-workdir").write_text(json.dumps({"target": "d1", "kind": "tmp", "pid": os.getpid()}))
    code, err = _cli(["data", "--out", str(tmp_path / "d[1]"), *SMALL], capsys)
    assert code == 0, err
    assert (other / "content" / "train2017" / "000000000001.png").read_bytes() == b"in progress"
    assert (tmp_path / "d[1]" / "manifest.json").is_file()
    assert _listing(tmp_path) == [".d1.tmp-abcd1234", "d[1]"]


def test_b3_data_never_deletes_a_user_folder_named_like_its_temp_dirs(tmp_path, capsys) -> None:
    folder = tmp_path / "X"
    mine = [folder / ".mydata.old-2024", folder / ".mydata.tmp-notes123", folder / ".mydata.old-abcdefgh"]
    for path in mine:
        path.mkdir(parents=True)
        (path / "notes.txt").write_text("mine")
    code, err = _cli(["data", "--out", str(folder / "mydata"), *SMALL], capsys)
    assert code == 0, err
    for path in mine:
        assert (path / "notes.txt").read_text() == "mine", path
    assert (folder / "mydata" / "manifest.json").is_file()


def test_b3_data_removes_the_marked_work_dirs_of_a_killed_writer_and_checks_workers(tmp_path, capsys) -> None:
    from vit_adapter.data.workdirs import make_workdir

    root = tmp_path / "gen"
    killed_tmp = make_workdir(root, "tmp")  # what a writer killed mid-render leaves
    (killed_tmp / "content" / "train2017").mkdir(parents=True)
    (killed_tmp / "content" / "train2017" / "000000000001.png").write_bytes(b"half")
    killed_old = make_workdir(root, "old")  # ... or one killed while swapping an old dataset out
    code, err = _cli(["data", "--out", str(root), "--workers", "-3"], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and "--workers must be >= 1, got -3" in err, err
    code, err = _cli(["data", "--out", str(root), *SMALL], capsys)
    assert code == 0, err
    assert not killed_tmp.exists() and not killed_old.exists()
    assert _listing(tmp_path) == ["gen"]  # no lock file left either
    # Other parameters: refused without --overwrite, replaced with it (it is a dataset this tool wrote).
    code, err = _cli(["data", "--out", str(root), *SMALL, "--data-seed", "1"], capsys)
    _one_error(code, err, "holds a dataset generated with other parameters; pass --overwrite")
    assert _cli(["data", "--out", str(root), *SMALL, "--data-seed", "1", "--overwrite"], capsys)[0] == 0
    assert json.loads((root / "manifest.json").read_text())["params"]["seed"] == 1
    assert _listing(tmp_path) == ["gen"]


# ---------------------------------------------------------------------------------------------------------
# B5, B6, B12, B14, B15, B16: config validation before anything is written


@pytest.mark.parametrize("key", ["data.n_train", "data.n_val"])
def test_b5_negative_image_counts_are_refused(tmp_path, data_root, capsys, key) -> None:
    out = tmp_path / "run"
    code, err = _cli(_train(out, data_root, f"{key}=-1"), capsys)
    _one_error(code, err, f"{key} = -1 (from --set {key}) is invalid: must be >= 1")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("key", ["data.n_val", "data.n_train"])
def test_b6_zero_images_are_refused_not_finished_with_null_metrics(tmp_path, data_root, capsys, key) -> None:
    out = tmp_path / "run"
    code, err = _cli(_train(out, data_root, f"{key}=0"), capsys)
    _one_error(code, err, f"{key} = 0 (from --set {key}) is invalid: must be >= 1, or null for the whole split")
    assert _listing(tmp_path) == []


def test_b12_image_size_has_an_upper_bound(tmp_path, capsys, monkeypatch) -> None:
    from vit_adapter.data import synth
    from vit_adapter.engine.config import ConfigError, load_config

    def no_render(*args, **kwargs):
        raise AssertionError("rendering started: the size was not refused up front")

    monkeypatch.setattr(synth, "_encode_scene", no_render)
    code, err = _cli(["data", "--out", str(tmp_path / "d"), "--set", "data.image_size=100000"], capsys)
    _one_error(code, err, "data.image_size = 100000", "must be <= 4096")
    assert _listing(tmp_path) == []
    with pytest.raises(ConfigError, match=r"data.image_size = 100000 .* must be <= 4096"):
        load_config("cpu_default", [], ["data.image_size=100000"])  # what `train` loads
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config("cpu_default", [], ["data.image_size=100"])
    assert load_config("cpu_default", [], ["data.image_size=4096"]).data.image_size == 4096


def test_b14_unknown_generator_key_is_refused_by_data_and_train(tmp_path, data_root, capsys) -> None:
    code, err = _cli(["data", "--out", str(tmp_path / "d"), "--set", "data.generator.objects_per_imag=3"], capsys)
    _one_error(code, err, "data.generator", "objects_per_imag", "allowed: ", "objects_per_image")
    code, err = _cli(_train(tmp_path / "run", data_root, "data.generator.camuflage_prob=0.2"), capsys)
    _one_error(code, err, "data.generator (from --set data.generator.camuflage_prob)", "camouflage_prob")
    code, err = _cli(_train(tmp_path / "run", data_root, "data.generator.clutter=3"), capsys)
    _one_error(code, err, "clutter must be a list of 2 values")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (
            ["model.embed_dim=100", "model.num_heads=3"],
            "model.embed_dim = 100 (from --set model.embed_dim) is invalid: ",
        ),
        (["model.num_heads=0"], "model.num_heads = 0 (from --set model.num_heads) is invalid: must be >= 1"),
        (["model.depth=0"], "model.depth = 0 (from --set model.depth) is invalid: must be >= 1"),
    ],
)
def test_b15_model_shapes_are_checked_before_anything_is_written(tmp_path, data_root, capsys, sets, needle) -> None:
    code, err = _cli(_train(tmp_path / "run", data_root, *sets), capsys)
    _one_error(code, err, needle)
    assert _listing(tmp_path) == []


def test_b15_embed_dim_that_the_preset_heads_do_not_divide(capsys) -> None:
    from vit_adapter.engine.config import ConfigError, load_config

    # cpu_default's preset has 3 heads: 100 is refused naming them, 96 passes.
    with pytest.raises(ConfigError, match=r"must be divisible by model.num_heads = 3 \(preset vit_adapter_cpu\)"):
        load_config("cpu_default", [], ["model.embed_dim=100"])
    assert load_config("cpu_default", [], ["model.embed_dim=96"]).model.embed_dim == 96


@pytest.mark.parametrize("threads", [-1, 0])
def test_b16_thread_count_must_be_positive(tmp_path, data_root, capsys, threads) -> None:
    before = torch.get_num_threads()
    code, err = _cli(_train(tmp_path / "run", data_root, f"train.threads={threads}"), capsys)
    _one_error(code, err, f"train.threads = {threads} (from --set train.threads) is invalid: must be >= 1")
    assert _listing(tmp_path) == [] and torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------------------------
# B13, B22, B23: unreadable sidecars and configs are named


def _weights_with_sidecar(tmp_path: Path, sidecar: bytes) -> Path:
    from vit_adapter.engine.weights import fetch_weights, sidecar_path

    pth = tmp_path / "w.pth"
    torch.save({"pos_embed": torch.zeros(1, 17, 64)}, pth)
    out = fetch_weights(pth, tmp_path / "w.safetensors")
    sidecar_path(out).write_bytes(sidecar)
    return out


@pytest.mark.parametrize(
    ("sidecar", "needle"),
    [(b"[]", "holds a JSON list, not an object"), (b'{"source": "w.pth", "output_sha', "is not valid JSON")],
    ids=["list", "truncated"],
)
def test_b13_b22_bad_weights_sidecar_is_one_line_naming_it(tmp_path, data_root, capsys, sidecar, needle) -> None:
    weights = _weights_with_sidecar(tmp_path, sidecar)
    out = tmp_path / "run"
    argv = _train(out, data_root, "weights.init=pretrained", f"weights.source={weights}")
    code, err = _cli(argv, capsys)
    _one_error(code, err, f"weights sidecar {weights}.json", needle)
    assert not out.exists() and not out.with_name("run.partial").exists()


def test_b22_truncated_sidecar_named_by_load_weights(tmp_path) -> None:
    from vit_adapter.engine.weights import WeightsError, load_weights

    weights = _weights_with_sidecar(tmp_path, b'{"output_sha256": "ab')
    with pytest.raises(WeightsError, match=re.escape(f"weights sidecar {weights}.json is not valid JSON")):
        load_weights(weights)


def test_b23_non_utf8_config_file_is_named(tmp_path, data_root, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes("train:\n  max_iters: 3  # caf\u00e9\n".encode("latin-1"))
    code, err = _cli(_train(tmp_path / "run", data_root, config=str(bad)), capsys)
    _one_error(code, err, f"config file {bad} is not UTF-8 text (byte 0xe9 at offset", "save it as UTF-8")
    assert _listing(tmp_path) == ["bad.yaml"]


# ---------------------------------------------------------------------------------------------------------
# B19, B24, B27: --out paths that could only fail later


def test_b19_non_utf8_out_is_refused_with_one_line(tmp_path, data_root, capsys) -> None:
    bad = tmp_path / os.fsdecode(b"run\xff")  # a surrogate-escaped byte, as argv delivers it
    code, err = _cli(_train(bad, data_root), capsys)
    _one_error(code, err, "--out", repr(str(bad)), "is not valid UTF-8")
    code, err = _cli(["data", "--out", str(bad), *SMALL], capsys)
    _one_error(code, err, "is not valid UTF-8")
    assert _listing(tmp_path) == []


def test_b24_out_dot_is_one_clear_line(tmp_path, data_root, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for argv in (_train(Path("."), data_root), ["data", "--out", ".", *SMALL], _train(Path(".."), data_root)):
        code, err = _cli(argv, capsys)
        _one_error(code, err, "names no directory of its own", "give a new directory such as runs/x")
    assert _listing(tmp_path) == []


def test_b27_out_below_a_file_names_the_file(tmp_path, data_root, capsys) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    for argv in (_train(blocker / "run", data_root), ["data", "--out", str(blocker / "sub" / "d"), *SMALL]):
        code, err = _cli(argv, capsys)
        _one_error(code, err, f"{blocker} is a file, not a directory")
    assert _listing(tmp_path) == ["notes.txt"] and blocker.read_text() == "a file"


# ---------------------------------------------------------------------------------------------------------
# Defaults a user expects: train without --out, data saying that it reused a dataset


def test_train_without_out_uses_runs_profile_variant_seed(tmp_path, data_root, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = _cli([*_train(None, data_root), "--overlay", "n1", "--seed", "3"], capsys)
    assert code == 0, err
    expected = Path("runs") / "cpu_default" / "n1-s3"
    assert f"no --out given; the run goes to {expected}" in err
    assert (tmp_path / expected / "metrics.json").is_file()


def test_data_says_when_it_reused_a_dataset(tmp_path, capsys) -> None:
    root = tmp_path / "d"
    assert main(["data", "--out", str(root), *SMALL]) == 0
    assert capsys.readouterr().out.strip().endswith(", generated")
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert main(["data", "--out", str(root), *SMALL]) == 0
    assert "reused (it already holds a dataset with these parameters; nothing generated)" in capsys.readouterr().out
    assert (root / "manifest.json").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------------------------------------------------
# B17, B20, B29: real signals and a killed parent (subprocesses)


def _cli_process(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "vit_adapter.cli", *args]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie, or a process gone, is not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc to list child processes")
def test_b20_kill_9_of_data_workers_leaves_no_orphans(tmp_path, capsys) -> None:
    root = tmp_path / "gen"
    big = ["--set", "data.n_train=400", "--set", "data.n_val=16", "--set", "data.image_size=128"]
    proc = _cli_process("data", "--out", str(root), "--workers", "2", "--quiet", *big)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = _children(proc.pid)
        assert len(workers) >= 2, f"the workers never started: {proc.communicate()[1][-2000:]}"
        time.sleep(1.0)  # rendering
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "worker processes outlived their killed parent"
    finally:
        for pid in workers:  # only the workers this test saw start
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    leftovers = [p for p in _listing(tmp_path) if p.startswith(".gen.tmp-")]
    assert leftovers and not root.exists()  # killed mid-render: only its marked work dir
    # The next writer removes that work dir, and the worker count does not change a byte.
    from vit_adapter.engine.identity import tree_digest

    assert main(["data", "--out", str(root), *SMALL[:-1], "--set", "data.n_train=20", "--workers", "2"]) == 0
    assert _listing(tmp_path) == ["gen"]
    assert main(["data", "--out", str(tmp_path / "one"), *SMALL[:-1], "--set", "data.n_train=20"]) == 0
    assert tree_digest(root) == tree_digest(tmp_path / "one")


@pytest.mark.parametrize("delay", [0.8, 1.5])  # after interpreter start, during the imports
def test_b17_sigint_while_starting_exits_130_with_one_line(tmp_path, delay) -> None:
    proc = _cli_process("data", "--out", str(tmp_path / "d"), *SMALL)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err, err[-3000:]
    assert not (tmp_path / "d").exists()


def test_b29_sigterm_during_data_exits_143_with_one_line_and_removes_its_temp(tmp_path) -> None:
    root = tmp_path / "gen"
    proc = _cli_process("data", "--out", str(root), "--quiet", "--set", "data.n_train=400")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.startswith(".gen.tmp-") for p in _listing(tmp_path)):
                break
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err[-3000:]
    assert len(err.strip().splitlines()) == 1 and "terminated (SIGTERM)" in err, err[-3000:]
    assert _listing(tmp_path) == []  # no temp dir, no dataset, no lock file


# ---------------------------------------------------------------------------------------------------------
# docs/faults.md lists every tested fault: each B-number once, each naming test functions that exist

FAULT_TEST_FILES = ("test_faults.py", "test_faults_input.py", "test_faults_engine.py", "test_sweep_faults.py")
N_FAULTS = 29


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_faults_doc_table_matches_the_fault_tests() -> None:
    text = (REPO / "docs" / "faults.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (B\d+) \|.*\| `tests/([\w.]+)::(test_b\d+_)\*` \|$", text, flags=re.M)
    numbers = [int(b[1:]) for b, _, _ in rows]
    assert sorted(numbers) == list(range(1, N_FAULTS + 1)), "each of B1..B29 once, in the table"
    present = {
        name: _test_functions(REPO / "tests" / name) for name in FAULT_TEST_FILES if (REPO / "tests" / name).is_file()
    }
    missing_files = set()
    for fault, file, prefix in rows:
        assert file in FAULT_TEST_FILES, f"{fault}: {file} is not a fault test file"
        assert prefix == f"test_{fault.lower()}_", f"{fault}: names {prefix}*"
        if file not in present:
            missing_files.add(file)
            continue
        assert any(t.startswith(prefix) for t in present[file]), f"{fault}: no {prefix}* in tests/{file}"
    # Every B-numbered test is listed under its number, in its own file.
    listed = {(int(b[1:]), f) for b, f, _ in rows}
    for file, tests in present.items():
        for name in tests:
            if m := re.match(r"test_b(\d+)_", name):
                assert (int(m.group(1)), file) in listed, f"{file}::{name} is not in docs/faults.md's table"
    if missing_files:
        pytest.skip(f"rows checked except those of {', '.join(sorted(missing_files))} (not in this checkout)")
