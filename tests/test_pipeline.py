"""The DVC pipeline in a temporary copy of the repository: a micro profile runs every stage (2 variants, 1 seed,
a few steps); a training stage killed with SIGKILL resumes from its checkpoint on the next `dvc repro`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .helpers import kill_after_iteration

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


# A new ablation, added as docs/ablations.md "Adding an ablation" says and nothing else: its overlay, one line
# appended to the registry and its name in params.yaml `variants` (the train matrix). No code knows its name.
NEW_ABLATION = "no_convffn"
NEW_OVERLAY = """\
# Test ablation: the full model without the extractors' ConvFFN.
model:
  use_spm: true
  injector: attention
  use_extractor: true
  extra_extractors: 2
  output_neck: adapter
  attention: deformable
  n_interactions: 4
  with_cffn: false
"""
NEW_REGISTRY_LINE = (
    '  no_convffn: {label: "no ConvFFN", role: leave_one_out, '
    'tables: {leave_one_out: {row: "no ConvFFN (new)", removes: "the ConvFFN"}}}\n'
)


def _add_new_ablation(repo: Path, params: dict) -> None:
    (repo / "ablations" / f"{NEW_ABLATION}.yaml").write_text(NEW_OVERLAY)
    with (repo / "ablations" / "index.yml").open("a") as index:
        index.write(NEW_REGISTRY_LINE)
    params["variants"].append(NEW_ABLATION)


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
        # Committed inputs and results of the real pipeline stay behind: the micro profile makes its own.
        if src.is_file() and not rel.startswith(("results/", "reports/", "data/", "weights/")) and rel != "dvc.lock":
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
            # The default's two phases, micro-sized: scene tokens continuing from an item classifier.
            "objective": "scene_tokens",
            "init_from": "weights/vit_micro_items.safetensors",
            "first": {
                "objective": "classify",
                "image_size": 32,
                "steps": 2,
                "batch_size": 8,
                "n_train": 32,
                "n_val": 16,
                "warmup_steps": 1,
                "seed": 0,
            },
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
    _add_new_ablation(dst, params)  # trained by the module's repro: test_a_new_ablation_needs_no_code
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
    killed = _dvc(micro_repo, "repro", "train@full", env=kill_after_iteration(2), check=False)
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


def test_dvc_shows_metrics_plots_and_overlay_params(micro_repo: Path) -> None:
    """After the micro repro: `dvc metrics show` has the flat headline (every variant's mean; numbers only), the
    detail files are outputs, `dvc plots show` renders data for each plot, and an edited overlay flag shows in
    `dvc params diff`."""
    metrics = json.loads(_dvc(micro_repo, "metrics", "show", "--json").stdout)
    files = next(iter(metrics.values()))["data"]
    assert {"results/headline/baseline.json", "results/headline/full.json"} <= set(files)
    assert all(f.startswith("results/headline/") for f in files)
    assert "mean" in files["results/headline/full.json"]["data"]
    assert "delta" in files["results/headline/full-baseline.json"]["data"]
    assert all(isinstance(v, int | float) for f in files.values() for v in f["data"].values())
    shown = _dvc(micro_repo, "metrics", "show").stdout.splitlines()
    assert len(shown) <= 80 and max(map(len, shown)) <= 160, shown  # fits a terminal
    on_disk = json.loads((micro_repo / "results/metrics.json").read_text())["variants"]
    assert all({"mean", "std", "n", "delta_vs_full", "delta_lo", "delta_hi"} <= set(v) for v in on_disk.values())
    assert all(v["n"] == 1 and v["mean"] is not None for v in on_disk.values())
    assert "findings" in json.loads((micro_repo / "results/findings.json").read_text())
    assert "results/headline/full-baseline.json" in "\n".join(shown)

    shown = json.loads(_dvc(micro_repo, "plots", "show", "--json", "--split").stdout)
    assert not shown.get("errors"), shown.get("errors")
    plots = shown["data"]
    assert {"findings_forest", "train_loss", "metric_vs_n", "paper_metric_vs_n", "cost_vs_metric"} <= set(plots)
    field = {"findings_forest": "delta", "paper_metric_vs_n": "APb"}  # the others plot `mean`
    for name, renders in plots.items():
        for r in renders:
            if r["type"] == "vega":  # every declared field found: one data point per row
                rows = r["anchor_definitions"]["<DVC_METRIC_DATA>"]
                y = [row.get(field.get(name, "mean")) for row in rows]
                assert rows and all(v not in (None, "") for v in y), name
            else:
                assert r["type"] == "image" and Path(r["url"]).stat().st_size > 0, name
    curves = plots["train_loss"][0]["anchor_definitions"]["<DVC_METRIC_DATA>"]
    assert {row["variant"] for row in curves} >= {"baseline", "full"}  # one line per variant, in one plot

    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", "add", "-A"], cwd=micro_repo, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "micro results"], cwd=micro_repo, check=True, capture_output=True)
    overlay = micro_repo / "ablations" / "full.yaml"
    original = overlay.read_text()
    try:
        raw = yaml.safe_load(original)
        raw["model"]["n_interactions"] = 3
        overlay.write_text(yaml.safe_dump(raw))
        diff = _dvc(micro_repo, "params", "diff").stdout
        assert "ablations/full.yaml" in diff and "model.n_interactions" in diff
    finally:
        overlay.write_text(original)


def test_a_new_ablation_needs_no_code(micro_repo: Path) -> None:
    """The ablation added by `_add_new_ablation` (overlay + registry line + params variant, no code) is a DVC
    stage, was trained, and appears in the summary, its table, the figures' data, the metrics and the report."""
    assert f"train@{NEW_ABLATION}" in _dvc(micro_repo, "stage", "list").stdout
    _dvc(micro_repo, "repro")  # a no-op after the module's earlier repro; makes the test standalone
    # the copy's code is the working tree's: nothing under vit_adapter/ names the new ablation
    grep = subprocess.run(["grep", "-rl", NEW_ABLATION, "vit_adapter"], cwd=micro_repo, capture_output=True, text=True)
    assert grep.returncode == 1 and not grep.stdout
    results = micro_repo / "results"
    assert json.loads((results / f"runs/{NEW_ABLATION}/s0/metrics.json").read_text())["final"]
    summary = (results / "summary.csv").read_text()
    assert f"\n{NEW_ABLATION}," in summary and summary.index("\nfull,") < summary.index(f"\n{NEW_ABLATION},")
    with (results / "leave_one_out.csv").open(newline="") as f:
        loo = {row["variant"]: row for row in csv.DictReader(f)}
    assert loo[NEW_ABLATION]["row"] == "no ConvFFN (new)" and loo[NEW_ABLATION]["n"] == "1"  # a row, trained
    assert NEW_ABLATION in json.loads((results / "metrics.json").read_text())["variants"]
    assert f"\n{NEW_ABLATION}," in (results / "plots/train_curves.csv").read_text()  # its line in the loss plot
    assert NEW_ABLATION in (results / "plots/cost_vs_metric.csv").read_text()
    assert (micro_repo / "reports/figures/leave_one_out.png").stat().st_size > 1000
    assert f"train@{NEW_ABLATION}" in (results / "stage_timings.csv").read_text()
    report = (micro_repo / "reports/ablation_report.md").read_text()
    assert "| no ConvFFN (new) " in report  # its table row
    assert "`model.with_cffn`" in report and f"({NEW_ABLATION})" in report  # Method: the setting it changes


def test_a_comment_edit_reruns_stages_that_reuse_every_output(micro_repo: Path) -> None:
    """Run identity follows the code's meaning: after comment, docstring and layout edits DVC reruns the stages
    (their dependency bytes changed), and they keep every run, both pretrained weights and the data as they
    were: nothing trains, nothing is rewritten."""
    outputs = sorted((micro_repo / "results/runs").glob("*/s0/run.json"))
    outputs += sorted((micro_repo / "weights").glob("vit_micro*.safetensors*"))
    outputs += [micro_repo / "data/generated/manifest.json"]
    before = {p: p.read_bytes() for p in outputs}
    for rel in ("vit_adapter/engine/trainer.py", "vit_adapter/models/adapter.py", "vit_adapter/data/synth.py"):
        path = micro_repo / rel
        text = path.read_text()
        path.write_text("# An edited comment.\n" + text.replace('"""', '"""Edited. ', 1) + "\n\n# trailing\n")
    proc = _dvc(micro_repo, "repro")
    assert "Running stage 'train@full'" in proc.stdout and "Running stage 'weights'" in proc.stdout
    weights_log = proc.stdout[proc.stdout.index("Running stage 'weights'") :][:3000]
    assert "reused weights/vit_micro_items.safetensors" in weights_log, weights_log
    assert "reused weights/vit_micro.safetensors" in weights_log, weights_log
    assert {p: p.read_bytes() for p in outputs} == before, "an edit that changes no computation retrained"
    assert "up to date" in _dvc(micro_repo, "status").stdout


def _weights_sha(repo: Path) -> str:
    return json.loads((repo / "weights/vit_micro.safetensors.json").read_text())["output_sha256"]


def test_new_weight_bytes_at_the_same_path_retrain_every_dependent_result(micro_repo: Path) -> None:
    """The fresh-clone failure: the weights stage writes other bytes to the same path (another CPU; here another
    pretraining seed). Every run that loads them and the sweep retrain, the report shows the new digest."""
    runs = sorted((micro_repo / "results/runs").glob("*/s0"))
    before = {r: json.loads((r / "run.json").read_text()) for r in runs}
    configs = {r: (r / "config.yaml").read_text() for r in runs}
    old_sha = _weights_sha(micro_repo)
    old_study = json.loads((micro_repo / "results/sweeps/summary.json").read_text())["study_name"]
    assert f"`{old_sha}`" in (micro_repo / "reports/ablation_report.md").read_text()

    params = yaml.safe_load((micro_repo / "params.yaml").read_text())
    params["pretrain"]["seed"] = 1
    (micro_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _dvc(micro_repo, "repro")

    new_sha = _weights_sha(micro_repo)
    assert new_sha != old_sha
    for r in runs:
        after = json.loads((r / "run.json").read_text())
        if r.parent.name != "baseline_compute_matched":  # its schedule follows the measured time ratio
            assert (r / "config.yaml").read_text() == configs[r], "same config: only the weights' bytes changed"
        if before[r]["inputs"]["weights"] is None:
            continue  # a random-init run reads no weights
        assert after["identity"] != before[r]["identity"] and after["inputs"]["weights"] == new_sha, r
        assert after["utc_time"] >= before[r]["utc_time"] and after["resumed_from_iteration"] == 0
    summary = json.loads((micro_repo / "results/sweeps/summary.json").read_text())
    assert summary["study_name"] != old_study, "the sweep reused the study of other weights"
    report_text = (micro_repo / "reports/ablation_report.md").read_text()
    assert f"`{new_sha}`" in report_text and f"`{old_sha}`" not in report_text
    assert "up to date" in _dvc(micro_repo, "status").stdout


README_EXP_SHOW = r"^Experiment$|^results/headline/full-baseline\.json:(delta|ci_lo|ci_hi)$"


def test_dvc_exp_run_then_the_documented_exp_show_fits_a_terminal(micro_repo: Path) -> None:
    """`dvc exp run -S seeds=[0,1]` on the micro pipeline, then the README's `dvc exp show` plus the varied param:
    the experiment's row holds its param and the finding's numbers, none cut to an ellipsis.
    Last in the module: the experiment leaves its params in the workspace."""
    assert f"--keep '{README_EXP_SHOW}'" in (REPO / "README.md").read_text(encoding="utf-8")
    who = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "t@example.invalid"}
    who |= {"GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", "add", "-A"], cwd=micro_repo, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "before the experiment"], cwd=micro_repo, capture_output=True)
    _dvc(micro_repo, "exp", "run", "-S", "seeds=[0,1]", "--name", "two-seeds", env=who)
    env = {"COLUMNS": "160", **who}
    keep = README_EXP_SHOW + r"|^seeds$"
    shown = _dvc(micro_repo, "exp", "show", "--drop", ".*", "--keep", keep, env=env).stdout.splitlines()
    assert shown, shown  # 168 columns wide here with the experiment's row and one param column (see the note)
    row = next(line for line in shown if "two-seeds" in line)
    header = next(line for line in shown if "Experiment" in line)
    assert "seeds" in header and "full-baseline.json:delta" in header
    assert "0, 1" in row and "…" not in row, row


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


def _paper_params(tmp_path: Path, data_root: Path, weights_src: Path | None) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profile"] = "paper"
    params["data_root"] = str(data_root)
    params["sets"] = [f"weights.source={weights_src}"] if weights_src is not None else []
    params["pretrain"] = {"out": str(tmp_path / "weights" / "deit_s.safetensors")}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_paper_route_data_and_weights_stages(tmp_path: Path, capsys) -> None:
    """`profile: paper` passes the data and weights stages given a COCO root and a local DeiT file, and stops with
    one line saying what to provide when the dataset is missing."""
    import torch

    from vit_adapter import pipeline

    coco = tmp_path / "coco"
    code = pipeline.main(["data", "--params", str(_paper_params(tmp_path, coco, None))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "annotations/instances_train2017.json" in err and "data_root" in err

    for rel in ("annotations", "train2017", "val2017"):
        (coco / rel).mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (coco / "annotations" / f"instances_{split}2017.json").write_text("{}")
    deit = tmp_path / "deit_small.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 4), "pos_embed": torch.zeros(1, 5, 4)}}, deit)
    params = _paper_params(tmp_path, coco, deit)
    assert pipeline.main(["data", "--params", str(params)]) == 0
    assert pipeline.main(["weights", "--params", str(params)]) == 0
    out = tmp_path / "weights" / "deit_s.safetensors"
    assert out.is_file() and (tmp_path / "weights" / "deit_s.safetensors.json").is_file()
    # every profile's runs read the file the weights stage wrote
    cfg = pipeline.variant_config(yaml.safe_load(params.read_text()), "full", 0)
    assert cfg.weights.source == str(out) and cfg.data.root == str(coco) and cfg.data.dataset == "coco"


def test_launcher_starts_each_run(tmp_path: Path, monkeypatch) -> None:
    """params.yaml `launcher` (e.g. torchrun for 8 GPUs) replaces the plain python process of each run."""
    from vit_adapter import pipeline

    seen: list[list[str]] = []
    monkeypatch.setattr(pipeline, "run_identity", lambda cfg: ("id", {}))
    monkeypatch.setattr(pipeline.subprocess, "call", lambda cmd, **kw: seen.append(cmd) or 1)
    cfg = pipeline.variant_config(pipeline.load_params(REPO / "params.yaml"), "full", 0)
    out = tmp_path / "full" / "s0"
    out.parent.mkdir()
    pipeline._run_one(cfg, out, launcher="torchrun --standalone --nproc_per_node 8")
    pipeline._run_one(cfg, out)
    assert seen[0][:4] == ["torchrun", "--standalone", "--nproc_per_node", "8"]
    assert seen[0][4:7] == ["-m", "vit_adapter.pipeline", "run-one"] and seen[1][0] == sys.executable
