"""bench/gpu_smoke.py: the CPU path runs the real train+eval loop of the toy seg and det profiles and reports the
CUDA-only checks as skipped, one JSON line per check; the deformable-attention check gives each run its own leaves
(it used to make the shared inputs grad-requiring, so the device copies had no .grad)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_smoke


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_cpu_path_runs_train_and_eval_and_skips_the_cuda_checks(tmp_path, capsys) -> None:
    out = tmp_path / "smoke.json"
    assert gpu_smoke.main(["--iters", "2", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    by_check = {row["check"]: row for row in lines}
    assert list(by_check) == [
        "nccl_world1",
        "train_eval_seg",
        "train_eval_det",
        "deform_cuda_vs_float64",
        "deform_backends",
        "maskrcnn_s_1333x800",
    ]
    for task, key in (("seg", "mIoU"), ("det", "bbox_mAP")):
        row = by_check[f"train_eval_{task}"]
        assert row["status"] == "ok" and row["iters"] == 2 and row["device"] == "cpu" and row["num_workers"] == 2
        assert row[key] is not None and row["train_s_per_iter"] > 0
    assert by_check["train_eval_seg"]["test_mode"] == "slide"
    for check in ("nccl_world1", "deform_cuda_vs_float64", "deform_backends", "maskrcnn_s_1333x800"):
        assert by_check[check] == {"check": check, "status": "skipped", "reason": "no CUDA"}
    recorded = json.loads(out.read_text())
    assert recorded["device"] == "cpu" and recorded["checks"] == lines


def test_deform_check_gives_each_run_its_own_leaves() -> None:
    # On the old code the second run's .to() copies were non-leaves: AttributeError on None.grad.
    row = gpu_smoke.deform_check(torch.device("cpu"), levels=((4, 6), (2, 3)), queries=5)
    assert row["status"] == "ok" and row["meets_float64_rule"]
    assert all(row[f"max_rel_err_{n}"] < 1e-5 for n in ("output", "grad_value", "grad_locations", "grad_weights"))


def test_bad_iteration_count_is_one_line_exit_2(capsys) -> None:
    assert gpu_smoke.main(["--iters", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("gpu_smoke: error:")
