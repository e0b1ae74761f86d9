"""What the CLI tells a user: the human-readable training log (train.log + logging), `eval RUN_DIR` from the run's
own config and checkpoint, YAML 1.2 `--set` values, and the hint when the pretrained weights are missing."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_engine import tiny_sets
from vit_adapter.cli import _parse_flag, main
from vit_adapter.data import generate_dataset

ITERS = 4
# iter 2/4  loss 0.4213  lr 9.1e-04  2.31 s/it  eta 0:00:04  mem 0.6 GiB
ITER_LINE = re.compile(
    r"iter (\d+)/(\d+)  loss \d+\.\d{4}  lr \d\.\de[-+]\d\d  \d+\.\d\d s/it  eta \d+:\d\d:\d\d  mem \d+\.\d GiB"
)


def _tiny_sets(root: Path) -> list[str]:
    """tests/test_engine.py's seconds-long semantic-segmentation run, logging every second iteration."""
    return tiny_sets(root, "seg", ITERS, extra=["train.log_interval=2"])


def _set_args(sets: list[str]) -> list[str]:
    return [arg for item in sets for arg in ("--set", item)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "gen"
    generate_dataset(root, n_train=8, n_val=4, image_size=64, seed=0, objects_per_image=(2, 3), progress=False)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root) -> tuple[Path, list[logging.LogRecord], str]:
    """One tiny run through `vit-adapter train`: (run dir, the trainer's log records, stdout)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    logger = logging.getLogger("vit_adapter.engine.progress")
    logger.addHandler(keep)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            rc = main(["train", "--config", "cpu_default", "--out", str(out), *_set_args(_tiny_sets(data_root))])
    finally:
        logger.removeHandler(keep)
    assert rc == 0
    return out, records, stdout.getvalue()


def test_train_writes_a_human_readable_log(trained) -> None:
    out, records, stdout = trained
    text = (out / "train.log").read_text(encoding="utf-8")
    lines = text.splitlines()
    iters = [m for line in lines if (m := ITER_LINE.search(line))]
    assert [(int(m.group(1)), int(m.group(2))) for m in iters] == [(2, ITERS), (4, ITERS)], text
    # every line starts with a time stamp
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in lines), text
    evals = [line for line in lines if " eval iter 4/4  " in line]
    assert len(evals) == 1 and "mIoU " in evals[0] and "IoU_per_class" not in evals[0], text
    assert any(" finished " in line for line in lines) and any(" train " in line for line in lines[:1]), text
    # the same lines go through `logging` (stderr when nothing else is configured)
    messages = [r.getMessage() for r in records]
    assert sum(bool(ITER_LINE.fullmatch(m)) for m in messages) == 2, messages
    # the machine-readable record is unchanged: one log.jsonl row per log_interval, metrics.json's final entry
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["iter"] for r in rows] == [2, 4] and set(rows[0]) >= {"iter", "epoch", "lr", "loss"}
    final = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["final"]
    assert json.loads(stdout.strip().splitlines()[-1]) == final
    # the loss on the log line is log.jsonl's, to 4 decimals
    assert f"loss {rows[-1]['loss']:.4f}" in iters[-1].group(0)


def test_eval_run_dir_reads_the_runs_config_checkpoint_and_threads(trained, capsys) -> None:
    out, _, _ = trained
    final = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["final"]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        capsys.readouterr()
        assert main(["eval", str(out), "--quiet"]) == 0  # no --config: the run's config.yaml
        metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert metrics == final
        assert torch.get_num_threads() == 1  # train.threads of the run's config
        # an override still wins; the metrics JSON can also be written to a file
        target = out.parent / "eval.json"
        assert main(["eval", str(out), "--set", "train.threads=2", "--out", str(target), "--quiet"]) == 0
        assert torch.get_num_threads() == 2
        assert set(json.loads(target.read_text(encoding="utf-8"))) == set(final)
    finally:
        torch.set_num_threads(before)


def test_eval_errors_are_one_line(trained, tmp_path, capsys) -> None:
    out, _, _ = trained
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run directory (no config.yaml)" in capsys.readouterr().err
    assert main(["eval", str(out), "--config", "cpu_default"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    no_ckpt = tmp_path / "copied"
    no_ckpt.mkdir()
    (no_ckpt / "config.yaml").write_text((out / "config.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    assert main(["eval", str(no_ckpt)]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint" in err and len(err.strip().splitlines()) == 1


def test_set_values_are_yaml_1_2(trained, capsys) -> None:
    assert _parse_flag("optim.lr=1e-4") == ("optim.lr", 1e-4)
    assert isinstance(_parse_flag("optim.lr=1e-4")[1], float)
    out, _, _ = trained
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert saved["optim"]["lr"] == pytest.approx(1e-3) and isinstance(saved["optim"]["lr"], float)
    assert main(["info", "vit_adapter_t", "--set", "drop_path_rate=1e-1", "--json"]) == 0
    flags = json.loads(capsys.readouterr().out)["flags"]
    assert flags["drop_path_rate"] == 0.1 and isinstance(flags["drop_path_rate"], float)
    assert main(["info", "vit_adapter_t", "--set", "drop_path_rate=[1", "--json"]) == 2  # bad YAML: one line
    assert "invalid YAML" in capsys.readouterr().err


def test_missing_weights_say_how_to_make_them(data_root, tmp_path, capsys) -> None:
    missing = tmp_path / "weights" / "vit_cpu_pretrained.safetensors"
    sets = [*_tiny_sets(data_root), "weights.init=pretrained", f"weights.source={missing}"]
    rc = main(["train", "--config", "cpu_default", "--out", str(tmp_path / "run"), "--quiet", *_set_args(sets)])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "weights file not found" in err and str(missing) in err and "vit-adapter pretrain" in err
    assert "dvc repro weights" in err and "weights.init=scratch" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_run_log_appends_to_the_file_and_falls_back_to_stderr(tmp_path, capsys, monkeypatch) -> None:
    import threading

    from vit_adapter.engine import progress

    monkeypatch.setattr(progress.log, "propagate", False)  # as outside pytest: no handler configured anywhere
    path = tmp_path / "train.log"
    with progress.run_log(path):
        progress.log.info("first")
    with progress.run_log(path):  # a resumed run continues the same file
        progress.log.info("second")
        other = threading.Thread(target=progress.log.info, args=("another run's thread",))  # a sweep's other trial
        other.start()
        other.join()
    progress.log.info("after")  # detached
    err = capsys.readouterr().err
    assert "first" in err and "second" in err and "another run" not in err and "after" not in err
    assert [line.split(" ", 2)[2] for line in path.read_text(encoding="utf-8").splitlines()] == ["first", "second"]
