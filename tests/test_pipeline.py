"""The DVC pipeline in a temporary copy of the repository: a micro profile runs every stage (2 variants, 1 seed,
a few steps); a training stage killed with SIGKILL resumes from its checkpoint on the next `dvc repro`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

MICRO_SETS = [
    "data.image_size=64",
    "data.n_train=8",
    "data.n_val=4",
    "data.batch_size=4",
    "model.pretrain_size=32",  # the micro pretraining's resolution
    "train.max_iters=4",
    "train.eval_interval=2",
    "train.checkpoint_interval=2",
    "train.log_interval=1",
    "optim.warmup_iters=0",
]


def _dvc(repo: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def micro_repo(tmp_path_factory) -> Path:
    """A copy of the working tree (tracked + untracked, not ignored) with a micro params.yaml."""
    dst = tmp_path_factory.mktemp("pipeline") / "repo"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("results/", "reports/")) and rel != "dvc.lock":
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params.update(
        sets=MICRO_SETS,
        seeds=[0],
        workers=1,
        variants=["baseline", "full"],
        pretrain={
            "preset": "vit_cpu",
            "out": "weights/vit_micro.safetensors",
            "seed": 0,
            "image_size": 32,
            "steps": 3,
            "batch_size": 8,
            "n_train": 32,
            "n_val": 16,
            "warmup_steps": 1,
        },
        bench={
            "attention_sizes": "32,64",
            "overhead_models": "vit_adapter_t",
            "overhead_res": "64",
            "overhead_repeats": 1,
        },
    )
    sweep_sets = [*MICRO_SETS, "weights.source=weights/vit_micro.safetensors", "data.root=data/generated"]
    params["sweep"].update(n_trials=2, max_iters=2, n_workers=1, seeds=[0], timeout_s=600, sets=sweep_sets)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst


def test_dvc_structure(micro_repo: Path) -> None:
    stages = _dvc(micro_repo, "stage", "list").stdout
    for name in (
        "data",
        "weights",
        "train@baseline",
        "train@full",
        "compute_matched",
        "sweep",
        "aggregate",
        "plots",
        "report",
        "attention_cost",
        "overhead",
    ):
        assert name in stages
    assert "report" in _dvc(micro_repo, "dag").stdout


def test_micro_profile_runs_every_stage_and_resumes_after_kill(micro_repo: Path) -> None:
    # Kill the first training process after iteration 2 (its checkpoint is written), like `kill -9`.
    killed = _dvc(micro_repo, "repro", "train@full", env={"VIT_ADAPTER_KILL_AFTER_ITER": "2"}, check=False)
    assert killed.returncode != 0
    partial = micro_repo / "results/runs/full/s0.partial"
    assert partial.is_dir() and any((partial / "checkpoints").glob("iter_*.pt"))

    _dvc(micro_repo, "repro")
    run = micro_repo / "results/runs/full/s0"
    assert json.loads((run / "run.json").read_text())["resumed_from_iteration"] == 2
    for rel in (
        "results/table6_components.csv",
        "results/table7_attention.csv",
        "results/compute_matched.csv",
        "results/attention_cost.csv",
        "reports/ablation_report.md",
        "results/sweeps/summary.json",
        "results/overhead.json",
        "results/stage_timings.csv",
        "results/pretraining.csv",
    ):
        assert (micro_repo / rel).is_file(), rel
    report = (micro_repo / "reports/ablation_report.md").read_text()
    assert "Table 6" in report and "Table 7" in report
    # every train stage recorded its wall time, and the report shows it with the overhead benchmark's table
    timings = (micro_repo / "results/stage_timings.csv").read_text()
    assert "train@full" in timings and "train@baseline" in timings and "compute_matched" in timings
    assert "## Stage timings" in report and "vit_adapter_t" in report
    assert "Data and pipeline changed" not in _dvc(micro_repo, "status").stdout  # up to date after repro
    assert "up to date" in _dvc(micro_repo, "status").stdout


def test_variant_configs_follow_their_overlays() -> None:
    """The pipeline's own overrides never undo an overlay (a pipeline-wide `weights.init=pretrained` once did)."""
    from vit_adapter.pipeline import load_params, variant_config

    params = load_params(REPO / "params.yaml")
    assert variant_config(params, "baseline_scratch", 0).weights.init == "scratch"
    assert variant_config(params, "full_scratch", 0).weights.init == "scratch"
    assert variant_config(params, "full", 0).weights.init == "pretrained"
    for variant in ("baseline", "full"):
        cfg = variant_config(params, variant, 3)
        assert cfg.weights.init == "pretrained" and cfg.weights.source == params["pretrain"]["out"]
        assert cfg.train.seed == 3 and cfg.train.threads == params["threads_per_worker"]
