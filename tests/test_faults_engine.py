"""Fault injection of the training engine's files (docs/faults.md): the run log and checkpoints survive a full
disk and a damaged file, intervals of 0 mean "off", bad sizes fail before the run directory exists, and `eval`
opens only what it reads and checks its --out first. Each test drives the CLI in-process, as a user would.

Tests that need a full disk mount a small tmpfs, which needs root (CI runs as root); elsewhere they are skipped
with that reason."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_engine import tiny_sets
from tests.test_faults import ADE_TRAIN, _cli, _one_line, _partial, _train, _tree
from vit_adapter.cli import main
from vit_adapter.data import generate_dataset
from vit_adapter.engine import evaluation, hooks, trainer
from vit_adapter.engine.config import load_config
from vit_adapter.utils.locks import lock_path

CKPT_FILES_2 = ["iter_00000002.pt", "iter_00000002.pt.sha256", "latest"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The fault suite's tiny dataset: 8 + 4 images of 64 px."""
    root = tmp_path_factory.mktemp("data") / "gen"
    generate_dataset(root, n_train=8, n_val=4, image_size=64, seed=0, objects_per_image=(2, 3))
    return root


@pytest.fixture(scope="module")
def straight(data_root, tmp_path_factory) -> Path:
    """The reference: the 4-iteration run (checkpoints after 2 and 4) without interruption."""
    out = tmp_path_factory.mktemp("ref") / "straight"
    assert main(_train(out, data_root)) == 0
    return out


def _mount_tmpfs(where: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {res.stderr.strip()}")


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 48 MiB file system of its own, to be filled up."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=48m")
    try:
        yield disk
    finally:
        _umount(disk)


def _fill(disk: Path) -> Path:
    """Fill `disk` to the last byte, like `dd if=/dev/zero of=disk/filler`."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:
        block = b"\0" * (1 << 20)
        try:
            while True:
                fh.write(block)
        except OSError as err:
            assert err.errno == errno.ENOSPC
        for size in (4096, 1):  # what a 1 MiB write left over
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                pass
    return filler


def _stop_at(n: int, cfg_sets: list[str], out: Path) -> None:
    """Train the tiny run in-process up to iteration `n`, stopping as a SIGINT would after its checkpoint."""

    def stop(it: int) -> None:
        if it == n:
            raise hooks.StopTraining("test interruption")

    with pytest.raises(hooks.StopTraining):
        trainer.train(load_config("cpu_default", [], cfg_sets), out, progress=False, hooks=[hooks.Callbacks(stop)])


def _hooked(monkeypatch, after_iteration) -> None:
    """Make the CLI's train() run with `after_iteration` too (a hook added to train()'s default hooks)."""
    defaults = trainer.default_hooks
    monkeypatch.setattr(trainer, "default_hooks", lambda extra: defaults([*extra, hooks.Callbacks(after_iteration)]))


# ---------------------------------------------------------------------------------------------------------
# log.jsonl: whole rows only; a torn last line is dropped with one warning, a damaged middle one is an error


def test_b1_torn_last_log_line_is_dropped_on_resume(tmp_path, data_root, straight, capsys) -> None:
    out = tmp_path / "run"
    _stop_at(2, tiny_sets(data_root, "seg", iters=4, extra=["train.checkpoint_interval=2"]), out)
    log = _partial(out) / "log.jsonl"
    with open(log, "a", encoding="utf-8") as fh:
        fh.write('{"iter": 3, "epoch": 0, "lr": 0.0005')  # a row cut by a full disk or a crash
    code, err = _cli(_train(out, data_root), capsys)
    assert code == 0, err
    _one_line(err, f"warning: {log}: dropped its incomplete last line 3")
    for name in ("log.jsonl", "metrics.json"):
        assert (out / name).read_bytes() == (straight / name).read_bytes(), name


def test_b1_damaged_middle_log_line_is_one_line_naming_file_and_line(tmp_path, data_root, capsys) -> None:
    out = tmp_path / "run"
    _stop_at(2, tiny_sets(data_root, "seg", iters=4, extra=["train.checkpoint_interval=2"]), out)
    log = _partial(out) / "log.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines()
    log.write_text(lines[0] + "\n" + "{garbage\n" + lines[1] + "\n", encoding="utf-8")
    code, err = _cli(_train(out, data_root), capsys)
    assert code == 2
    _one_line(err, f"error: {log}: line 2 is not a JSON row")


def test_b1_a_short_append_leaves_the_log_as_it_was(tmp_path, monkeypatch) -> None:
    from vit_adapter.utils import jsonl

    log = tmp_path / "log.jsonl"
    jsonl.append_row(log, {"iter": 1})
    before = log.read_bytes()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))  # a full disk
    with pytest.raises(OSError, match="No space left on device") as exc:
        jsonl.append_row(log, {"iter": 2, "loss": 0.5})
    assert exc.value.filename == str(log)
    assert log.read_bytes() == before
    monkeypatch.undo()
    assert jsonl.read_rows(log) == [{"iter": 1}]


def test_b1_full_disk_while_logging_is_one_line_and_resumes_exactly(small_disk, data_root, straight, capsys) -> None:
    """The disk fills while log.jsonl's last page has room for only half of the next row: the kernel writes that
    half and refuses the rest (the torn line of the report). A row is all or nothing, and the run resumes."""
    out = small_disk / "run"
    _stop_at(2, tiny_sets(data_root, "seg", iters=4, extra=["train.checkpoint_interval=2"]), out)
    log = _partial(out) / "log.jsonl"
    rows = (straight / "log.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)  # what 3 and 4 will be
    page = os.sysconf("SC_PAGE_SIZE")
    pad = {"iter": 0, "pad": ""}  # a row the resume keeps (iter <= 2): it places row 4 across a page boundary
    gap = -(log.stat().st_size + len(json.dumps(pad)) + 1 + len(rows[2]) + len(rows[3]) // 2) % page
    pad["pad"] = "x" * gap
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(pad) + "\n")
    filled: list[Path] = []

    def fill_after_3(it: int) -> None:
        if it == 3:
            filled.append(_fill(small_disk))

    with pytest.MonkeyPatch.context() as mp:
        _hooked(mp, fill_after_3)
        code, err = _cli(_train(out, data_root), capsys)
    assert code == 2
    _one_line(err, f"error: No space left on device: {log}")
    text = log.read_text(encoding="utf-8")
    assert text.endswith(rows[2])  # row 3 whole, no half of row 4
    filled[0].unlink()  # the user frees space and reruns the same command
    code, err = _cli(_train(out, data_root), capsys)
    assert code == 0, err
    kept = [r for r in (out / "log.jsonl").read_text(encoding="utf-8").splitlines(keepends=True) if '"pad"' not in r]
    assert kept == rows
    assert (out / "metrics.json").read_bytes() == (straight / "metrics.json").read_bytes()


# ---------------------------------------------------------------------------------------------------------
# checkpoints: a full disk while saving names the checkpoint and keeps the previous one


def test_b10_full_disk_during_a_checkpoint_keeps_the_previous_one(small_disk, data_root, capsys, monkeypatch) -> None:
    out = small_disk / "run"
    filled: list[Path] = []
    _hooked(monkeypatch, lambda it: filled.append(_fill(small_disk)) if it == 3 else None)
    argv = _train(out, data_root, "train.log_interval=5", iters=6)  # no log row between the fill and iteration 4
    code, err = _cli(argv, capsys)
    ckpts = _partial(out) / "checkpoints"
    assert code == 2
    _one_line(err, f"error: No space left on device: {ckpts / 'iter_00000004.pt'}")
    assert _tree(ckpts) == CKPT_FILES_2  # nothing half-written; the pointer still names iteration 2
    assert (ckpts / "latest").read_text() == "iter_00000002.pt\n"
    assert not lock_path(out).exists()
    monkeypatch.undo()
    filled[0].unlink()
    code, err = _cli(argv, capsys)
    assert code == 0 and err == "", err  # iteration 2 was intact: no warning
    assert json.loads((out / "run.json").read_text())["resumed_from_iteration"] == 2


# ---------------------------------------------------------------------------------------------------------
# checkpoints carry a digest: a damaged newest one is skipped with one warning, never trained on


def _flip(path: Path, how: str) -> None:
    """Damage the largest tensor stored in a torch checkpoint (a zip archive of uncompressed entries)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    header = info.header_offset
    start = header + 30 + int.from_bytes(raw[header + 26 : header + 28], "little")
    start += int.from_bytes(raw[header + 28 : header + 30], "little")
    if how == "bit flip":
        raw[start + 8] ^= 0x01  # a low mantissa bit: the file still loads, the weights are silently different
    else:
        raw[start : start + 4] = b"\x00\x00\xc0\x7f"  # a float32 NaN
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "how, needle",
    [("bit flip", "do not match the sha256 in iter_00000004.pt.sha256"), ("nan", "holds non-finite values")],
)
def test_b4_damaged_newest_checkpoint_falls_back_with_one_warning(tmp_path, data_root, capsys, how, needle) -> None:
    out = tmp_path / "run"
    _stop_at(4, tiny_sets(data_root, "seg", iters=6, extra=["train.checkpoint_interval=2"]), out)
    newest = _partial(out) / "checkpoints" / "iter_00000004.pt"
    _flip(newest, how)
    if how == "nan":  # a checkpoint from before digests (or saved by a process killed before its sidecar)
        newest.with_name(newest.name + ".sha256").unlink()
    code, err = _cli(_train(out, data_root, iters=6), capsys)
    assert code == 0, err  # not "training diverged; lower optim.lr": the weights were damaged, not the lr
    _one_line(err, f"warning: cannot read checkpoint {newest}: ")
    assert needle in err and err.endswith("trying the previous checkpoint")
    assert json.loads((out / "run.json").read_text())["resumed_from_iteration"] == 2


def test_b4_eval_checks_the_digest_and_follows_latest(tmp_path, straight, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    ckpts = run / "checkpoints"
    assert _tree(ckpts) == ["iter_00000004.pt", "iter_00000004.pt.sha256", "latest"]
    assert (ckpts / "latest").read_text() == "iter_00000004.pt\n"
    _flip(ckpts / "iter_00000004.pt", "bit flip")
    code, err = _cli(["eval", str(run), "--quiet"], capsys)
    assert code == 2
    _one_line(err, f"error: cannot read checkpoint {ckpts / 'iter_00000004.pt'}: its bytes do not match the sha256")


# ---------------------------------------------------------------------------------------------------------
# intervals: 0 = off (only the final iteration logs, evaluates and checkpoints)


def test_b11_intervals_of_zero_are_off(tmp_path, data_root, capsys) -> None:
    out = tmp_path / "run"
    off = ("train.eval_interval=0", "train.checkpoint_interval=0", "train.log_interval=0")
    code, err = _cli(_train(out, data_root, *off, iters=3), capsys)
    assert code == 0, err
    assert not _partial(out).exists() and not lock_path(out).exists()
    assert [json.loads(r)["iter"] for r in (out / "log.jsonl").read_text().splitlines()] == [3]
    assert [h["iter"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [3]
    assert _tree(out / "checkpoints") == ["iter_00000003.pt", "iter_00000003.pt.sha256", "latest"]
    code, err = _cli(_train(tmp_path / "neg", data_root, "train.eval_interval=-1"), capsys)
    assert code == 2
    _one_line(err, "train.eval_interval = -1 (from --set train.eval_interval) is invalid: must be >= 0 (0 = off)")


# ---------------------------------------------------------------------------------------------------------
# fewer training images than one batch: an error before the run directory exists


@pytest.mark.parametrize("extra", [("data.n_train=8", "data.batch_size=16"), ("data.n_train=0",)])
def test_b25_fewer_images_than_one_batch_leave_no_run_dir(tmp_path, data_root, capsys, extra) -> None:
    out = tmp_path / "run"
    code, err = _cli(_train(out, data_root, *extra), capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and "error: " in err and "data.n_train" in err, err
    assert sorted(tmp_path.iterdir()) == []  # no <out>, no <out>.partial, no lock


# ---------------------------------------------------------------------------------------------------------
# eval: opens only the split it evaluates; checks --out before the evaluation


def test_b26_eval_does_not_open_the_train_split(tmp_path, data_root, straight, capsys) -> None:
    root = tmp_path / "gen"
    shutil.copytree(data_root, root)
    shutil.rmtree(root / ADE_TRAIN)  # e.g. a machine that holds only the validation images
    code = main(["eval", str(straight), "--quiet", "--set", f"data.root={root}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out) == json.loads((straight / "metrics.json").read_text())["final"]


def test_b28_eval_out_that_cannot_be_written_fails_first(tmp_path, straight, capsys, monkeypatch) -> None:
    folder = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes through permissions: a read-only file system
        _mount_tmpfs(folder, "size=1m,ro")
    else:
        folder.mkdir()
        folder.chmod(0o555)
    calls: list[object] = []
    monkeypatch.setattr(evaluation, "evaluate_checkpoint", lambda *a, **k: calls.append(a) or {})
    try:
        out = folder / "metrics.json"
        code, err = _cli(["eval", str(straight), "--quiet", "--out", str(out)], capsys)
        assert code == 2
        _one_line(err, f"error: cannot write --out {out}: ")
        assert ".tmp" not in err and ".probe" not in err and calls == []  # before the evaluation, not after
    finally:
        if os.geteuid() == 0:
            _umount(folder)
        else:
            folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------------------
# `data --overwrite` under a running run: the run stops instead of evaluating on other data


def test_b7_data_replaced_mid_run_stops_the_run(tmp_path, data_root, capsys, monkeypatch) -> None:
    root = tmp_path / "gen"
    shutil.copytree(data_root, root)

    def regenerate(it: int) -> None:  # what `vit-adapter data --out root --data-seed 1 --overwrite` does
        if it == 2:
            generate_dataset(root, n_train=8, n_val=4, image_size=64, seed=1, objects_per_image=(2, 3), overwrite=True)

    _hooked(monkeypatch, regenerate)
    out = tmp_path / "run"
    code, err = _cli(_train(out, root), capsys)
    assert code == 2
    _one_line(err, f"error: dataset {root} was replaced or changed while this run used it")
    assert not out.exists() and not lock_path(out).exists()
