"""`vit-adapter plan` and the safe paper route: the paper rows with one seed, GPU counts and GPU-hours before any
GPU starts, the one complete command the docs print, paper weights that never overwrite committed files, one
worker under a multi-GPU launcher, and the single-GPU profile's matrix within about a day."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vit_adapter import pipeline
from vit_adapter.cli import main
from vit_adapter.pipeline import launcher_gpus
from vit_adapter.plan import apply_overrides, plan, resolve

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
PAPER_ROWS = ["baseline", "variant1_add", "variant2_injector", "full", "n1", "n2", "n6", "dense_attention"]
EIGHT = "launcher=torchrun --standalone --nproc_per_node 8"


def _coco(root: Path) -> Path:
    for rel in ("annotations", "train2017", "val2017"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}2017.json").write_text("{}")
    return root


def _rows(text: str) -> list[list[str]]:
    body = text.split("command:")[0].splitlines()
    start = next(k for k, line in enumerate(body) if line.split()[:1] == ["variant"]) + 1
    return [line.split() for line in body[start:] if not line.strip().startswith("total")]


def test_plan_of_the_paper_profile(tmp_path) -> None:
    coco = _coco(tmp_path / "coco")
    text, ok = plan(PARAMS, ["profile=paper", f"data_root={coco}", EIGHT], visible_gpus=8)
    assert ok, text
    rows = _rows(text)
    assert [r[0] for r in rows] == PAPER_ROWS  # the paper's rows; scratch and compute-matched are opt-in
    assert all(r[1] == "0" and r[2] == "8" and r[3] == "87960" for r in rows)  # one seed, 8 GPUs, 1x schedule
    # 87960 iterations x 0.36 s x 8 GPUs (Table 7), the dense row at Table 7's 1.61 s
    assert [float(r[5]) for r in rows] == [70.4] * 7 + [314.7]
    assert "total 807.3 GPU-hours" in text
    command = text.split("command:\n")[1]
    for part in ("pretrain.out=weights/paper/", "pretrain.init_from=weights/paper/", "workers=1", "'seeds=[0]'"):
        assert part in command
    assert f"'variants=[{','.join(PAPER_ROWS)}]'" in command
    # The checks: no GPUs visible, a missing data root.
    text, ok = plan(PARAMS, ["profile=paper", f"data_root={tmp_path / 'none'}", EIGHT], visible_gpus=0)
    assert not ok and "check GPUs           BAD 0 visible, 8 per run" in text and "lacks annotations/" in text


def test_opt_in_rows_and_a_recorded_smoke_measurement(tmp_path) -> None:
    coco = _coco(tmp_path / "coco")
    smoke = tmp_path / "smoke.json"
    row = {"check": "maskrcnn_s_1333x800", "status": "ok", "mode": "fp32", "s_per_iter": 0.72}
    smoke.write_text(json.dumps({"device": "NVIDIA H100", "checks": [row]}))
    sets = ["profile=paper", f"data_root={coco}", EIGHT, "paper.opt_in=[baseline_scratch,baseline_compute_matched]"]
    text, _ = plan(PARAMS, sets, smoke=smoke, visible_gpus=8)
    rows = {r[0]: r for r in _rows(text)}
    assert list(rows) == [*PAPER_ROWS, "baseline_scratch", "baseline_compute_matched"]
    assert float(rows["baseline"][4]) == 0.72 and "gpu_smoke record" in text and "NVIDIA H100" in text
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"checks": []}))
    with pytest.raises(ValueError, match="no measured 'maskrcnn_s_1333x800' fp32 row"):
        plan(PARAMS, sets, smoke=bad, visible_gpus=8)


def test_the_docs_print_the_plans_command(capsys) -> None:
    code = main(["plan", "-S", "profile=paper", "-S", "data_root=data/coco", "-S", EIGHT])
    out, err = capsys.readouterr()
    assert code == 2 and err.strip().startswith("vit-adapter plan: error:") and len(err.strip().splitlines()) == 1
    command = "\n".join(line.strip() for line in out.split("command:\n")[1].strip().splitlines())
    for doc in ("README.md", "docs/paper_profile.md"):
        text = "\n".join(line.strip() for line in (REPO / doc).read_text(encoding="utf-8").splitlines())
        assert command in text, doc


def test_single_gpu_profile_fits_about_a_day_per_seed(tmp_path) -> None:
    text, _ = plan(PARAMS, ["profile=ade20k_semfpn_1gpu_s", f"data_root={tmp_path}"], visible_gpus=1)
    rows = _rows(text)
    assert [r[0] for r in rows] == PAPER_ROWS and all(r[2] == "1" for r in rows)
    hours = sum(float(r[5]) for r in rows)
    assert 12 <= hours <= 24, hours


def test_workers_forced_to_one_under_a_multi_gpu_launcher(tmp_path, monkeypatch, capsys) -> None:
    assert launcher_gpus("torchrun --standalone --nproc_per_node 8") == 8
    assert launcher_gpus("torchrun --nproc-per-node=4") == 4 and launcher_gpus(None) == 1
    seen = []
    real = pipeline.ThreadPoolExecutor

    def pool(max_workers: int):
        seen.append(max_workers)
        return real(max_workers=max_workers)

    monkeypatch.setattr(pipeline, "ThreadPoolExecutor", pool)
    monkeypatch.setattr(pipeline, "_run_one", lambda cfg, out, launcher=None: (out.name, 0, False))
    params = {"workers": 2, "launcher": "torchrun --standalone --nproc_per_node 8"}
    assert pipeline.train_runs(params, [(None, tmp_path / "s0")], tmp_path, "train@x") == 0
    assert seen == [1] and "workers forced to 1" in capsys.readouterr().out
    assert resolve(apply_overrides(pipeline.load_params(PARAMS), [f"{EIGHT}"]))["workers"] == 1


def test_a_paper_dry_run_changes_no_committed_file(tmp_path) -> None:
    """In a copy of the repository: the plan, the unsafe `-S profile=paper` weights step (refused before it writes)
    and the data + weights steps of the plan's command; git then sees no committed file changed."""
    copy = tmp_path / "repo"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for rel in files:
        if (REPO / rel).is_file() and not rel.startswith(("results/", "reports/", "data/")):
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, copy / rel)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run([*git, *cmd], cwd=copy, check=True, capture_output=True)
    coco = _coco(tmp_path / "coco")
    deit = tmp_path / "deit_small.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 4), "pos_embed": torch.zeros(1, 5, 4)}}, deit)
    script = textwrap.dedent(
        f"""
        import yaml
        from vit_adapter import pipeline
        from vit_adapter.cli import main
        from vit_adapter.plan import apply_overrides, resolve
        sets = ["profile=paper", "data_root={coco}", "sets=[weights.source={deit}]", "{EIGHT}"]
        assert main(["plan", *[a for s in sets for a in ("-S", s)]]) == 2  # no GPU here: a BAD check, exit 2
        unsafe = apply_overrides(pipeline.load_params(), sets)
        with open("{tmp_path}/unsafe.yaml", "w") as f:
            yaml.safe_dump(unsafe, f)
        assert pipeline.main(["weights", "--params", "{tmp_path}/unsafe.yaml"]) == 2
        with open("{tmp_path}/safe.yaml", "w") as f:
            yaml.safe_dump(resolve(unsafe), f)
        assert pipeline.main(["data", "--params", "{tmp_path}/safe.yaml"]) == 0
        assert pipeline.main(["weights", "--params", "{tmp_path}/safe.yaml"]) == 0
        """
    )
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=copy, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "pretrain.out = weights/vit_cpu_pretrained.safetensors is outside weights/paper/" in proc.stderr
    status = subprocess.run(["git", "status", "--porcelain"], cwd=copy, capture_output=True, text=True).stdout
    changed = [line for line in status.splitlines() if not line.startswith("??")]
    assert changed == [], status
    new = sorted(p.relative_to(copy).as_posix() for p in (copy / "weights" / "paper").iterdir())
    assert new == [
        "weights/paper/deit_small.safetensors",
        "weights/paper/deit_small.safetensors.json",
        "weights/paper/deit_small_init.safetensors",
        "weights/paper/deit_small_init.safetensors.json",
    ]
