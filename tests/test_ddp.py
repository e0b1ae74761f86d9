"""DDP through torchrun with 2 gloo processes on CPU: training writes one run directory, and one step's
synchronised gradients equal a single process's on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit_adapter.data import generate_dataset
from vit_adapter.engine.config import load_config

from .helpers.ddp_grad_step import global_batch, step_gradients
from .test_engine import tiny_sets

HERE = Path(__file__).parent


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp") / "gen"
    generate_dataset(root, n_train=8, n_val=4, image_size=64, seed=0, objects_per_image=(2, 3))
    return root


def test_ddp_train_writes_one_run_directory(tmp_path, data_root) -> None:
    out = tmp_path / "run"
    sets = tiny_sets(data_root, "seg", iters=2, extra=["data.batch_size=2", "data.n_train=8"])
    args = ["-m", "vit_adapter.cli", "train", "--config", "cpu_default", "--out", str(out), "--quiet"]
    proc = _torchrun(*args, *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "mIoU" in metrics["final"]
    costs = json.loads((out / "costs.json").read_text())
    assert costs["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # one run directory, no stray partials


def test_ddp_gradients_match_single_process(tmp_path, data_root) -> None:
    cfg = load_config("cpu_default", [], tiny_sets(data_root, "seg"))
    out = tmp_path / "grads.pt"
    proc = _torchrun(str(HERE / "helpers" / "ddp_grad_step.py"), json.dumps(cfg.to_dict()), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)
    images, targets = global_batch(cfg)
    single = step_gradients(cfg, images, targets, ddp=False)
    assert set(ddp) == set(single) and len(single) > 50
    for name, g in single.items():
        torch.testing.assert_close(ddp[name], g, rtol=1e-4, atol=1e-6, msg=name)
