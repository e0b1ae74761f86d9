"""vit_adapter.analysis on synthetic run directories with known numbers: statistics against hand computation,
paper columns, figures, the report (complete, deterministic) and one-line errors for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from vit_adapter.analysis import aggregate, plots, registry, report, stats, tables
from vit_adapter.engine.config import ABLATIONS_DIR

T_975_2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t_{0.975, 2} = 4.3027 in closed form

# mIoU per seed 0, 1, 2 (segmentation metrics are percent). Δ vs full by seed is easy to do by hand.
MIOU = {
    "full": [30.0, 32.0, 34.0],
    "baseline": [20.0, 23.0, 23.0],  # Δ = -10, -9, -11
    "variant1_add": [24.0, 26.0, 25.0],
    "variant2_injector": [27.0, 28.0, 30.0],
    "no_spm": [25.0, 27.0, 26.0],
    "no_injector": [29.0, 31.0, 34.0],
    "dense_attention": [29.0, 33.0, 31.0],
    "n1": [26.0, 27.0, 29.0],
    "n2": [28.0, 30.0, 31.0],
    "baseline_compute_matched": [27.0, 29.0, 33.0],
    "baseline_scratch": [22.0, 24.0, 25.0],  # pretrained − scratch = -2, -1, -2
    "full_scratch": [28.0, 29.0, 30.0],  # pretrained − scratch = +2, +3, +4
}
PARAMS = {"baseline": (5.0e6, 0, 1.0e6), "full": (5.0e6, 2.0e6, 1.0e6)}  # vit, adapter, head
S_PER_ITER = {"full": 0.6, "dense_attention": 0.5, "baseline": 0.2, "baseline_compute_matched": 0.2}


def _overlay(variant: str) -> dict:
    return yaml.safe_load((ABLATIONS_DIR / f"{variant}.yaml").read_text())["model"]


def make_run(
    runs: Path,
    variant: str,
    seed: int,
    value: float,
    *,
    task: str = "seg",
    iters: int = 100,
    dataset: str = "generated",
) -> Path:
    """A run directory in the engine's format (trainer.train) with known metric, costs and a short log."""
    d = runs / variant / f"s{seed}"
    d.mkdir(parents=True)
    model = {"preset": "vit_adapter_cpu", "task": task, **_overlay(variant)}
    iters = 3 * iters if variant == "baseline_compute_matched" else iters
    cfg = {
        "model": model,
        "head": {"type": "upernet" if task == "seg" else "mask_rcnn", "num_classes": 11},
        "data": {"dataset": dataset, "image_size": 64, "n_train": 100, "n_val": 20, "batch_size": 4},
        "optim": {"lr": 2e-4, "weight_decay": 0.05, "schedule": "step", "milestones": [66, 91], "warmup_iters": 5},
        "train": {"max_iters": iters, "eval_interval": iters // 2, "seed": seed},
        "weights": {"init": "scratch"},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
    if task == "seg":
        final = {"mIoU": value, "mAcc": value + 10, "aAcc": 80.0, "IoU_per_class": [value] * 3}
    else:
        final = {"bbox_mAP": value, "segm_mAP": value / 2, "bbox_mAP_l": None}
    key = "mIoU" if task == "seg" else "bbox_mAP"
    history = [{"iter": iters // 2, key: value - 5, "mAcc": 1.0}, {"iter": iters, **final}]
    (d / "metrics.json").write_text(json.dumps({"final": final, "history": history, "iterations": iters}))
    vit, adapter, head = PARAMS.get(variant, (5.0e6, 1.5e6, 1.0e6))
    s_it = S_PER_ITER.get(variant, 0.5)
    costs = {
        "params": {"vit": int(vit), "adapter": int(adapter), "head": int(head), "total": int(vit + adapter + head)},
        "flops_backbone_forward": int(2e9 if variant == "dense_attention" else 1e9),
        "train_images_per_s": 4 / s_it,
        "train_s_per_iter": s_it + 0.01 * seed,
        "peak_memory_mb": 1000.0 + (500 if variant == "dense_attention" else 0),
        "wall_time_s": s_it * iters + 5,
        "threads": 1,
        "device": "cpu",
    }
    (d / "costs.json").write_text(json.dumps(costs))
    log = [{"iter": k, "epoch": 0, "lr": 1e-4, "loss": 2.0 - k / iters - 0.01 * seed} for k in (25, 50, 75, iters)]
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    meta = {
        "versions": {"torch": "2.14.1", "numpy": "2.4.6"},
        "python": "3.11.0",
        "platform": "Linux-x86_64",
        "cpu_model": "Test CPU",
        "cuda_device": None,
        "git": {"commit": "abc123", "dirty": False},
        "seed": seed,
    }
    (d / "run.json").write_text(json.dumps(meta))
    return d


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic runs (3 seeds per variant, n6 absent as on the CPU default) → aggregate → plots → report."""
    root = tmp_path_factory.mktemp("analysis")
    runs, results, figures = root / "results" / "runs", root / "results", root / "reports" / "figures"
    for variant, values in MIOU.items():
        for seed, v in enumerate(values):
            make_run(runs, variant, seed, v)
    (runs / "full-s3.partial").mkdir()  # an unfinished run: skipped
    bench = {
        "meta": {"what": "test", "batch": 1},
        "results": [
            {
                "size": s,
                "attention": k,
                "median_ms": ms,
                "q25_ms": ms - 1,
                "q75_ms": ms + 1,
                "peak_mem_mb": mem,
                "gflops_fwd": 0.1,
                "queries": {"injector": 16, "extractor": 84},
            }
            for s, k, ms, mem in (
                (64, "deformable", 10.0, 2.0),
                (64, "dense", 5.0, 1.0),
                (128, "deformable", 20.0, 4.0),
                (128, "dense", 40.0, 8.0),
            )
        ],  # fmt: skip
    }
    (results / "attention_cost.json").write_text(json.dumps(bench))
    assert aggregate.main(["--runs", str(runs), "--out", str(results), "--ablations", str(ABLATIONS_DIR)]) == 0
    assert plots.main(["--results", str(results), "--out", str(figures)]) == 0
    md = root / "reports" / "ablation_report.md"
    rc = report.main(["--results", str(results), "--figures", str(figures), "--out", str(md), "--dvc-lock", "none"])
    assert rc == 0
    return {"root": root, "runs": runs, "results": results, "figures": figures, "md": md}


# ---------------------------------------------------------------------------------------------------------
# Statistics


def test_t_quantiles_match_closed_forms_and_tables() -> None:
    assert stats.t_ppf(0.975, 2) == pytest.approx(T_975_2, abs=1e-9)
    assert stats.t_ppf(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-10)
    assert stats.t_ppf(0.975, 4) == pytest.approx(2.776445105, abs=1e-8)  # printed t tables
    assert stats.t_ppf(0.975, 9) == pytest.approx(2.262157163, abs=1e-8)
    assert stats.t_ppf(0.025, 2) == pytest.approx(-T_975_2, abs=1e-9)
    assert stats.t_cdf(0.0, 5) == 0.5


def test_summary_mean_std_delta_ci_by_hand(pipeline: dict[str, Path]) -> None:
    s = pd.read_csv(pipeline["results"] / "summary.csv").set_index("variant")
    assert s.loc["baseline", "n"] == 3 and s.loc["baseline", "seeds"] == "0 1 2"
    assert s.loc["baseline", "mean"] == pytest.approx(22.0)
    assert s.loc["baseline", "std"] == pytest.approx(math.sqrt(3.0))  # deviations -2, 1, 1 → 6/2
    # Paired by seed: 20-30, 23-32, 23-34 = -10, -9, -11 → mean -10, sd 1, half-width t·1/√3.
    half = T_975_2 / math.sqrt(3)
    assert s.loc["baseline", "delta"] == pytest.approx(-10.0)
    assert s.loc["baseline", "delta_lo"] == pytest.approx(-10.0 - half, abs=1e-9)
    assert s.loc["baseline", "delta_hi"] == pytest.approx(-10.0 + half, abs=1e-9)
    assert s.loc["baseline", "ci_method"] == "t" and s.loc["baseline", "delta_n"] == 3
    assert s.loc["full", "ci_method"] == "reference" and s.loc["full", "delta"] == 0
    # An unpaired difference would be -10 too, but its CI would differ: check one with non-constant pairing.
    d = np.array(MIOU["dense_attention"]) - np.array(MIOU["full"])  # -1, 1, -3
    assert s.loc["dense_attention", "delta_hi"] == pytest.approx(d.mean() + T_975_2 * d.std(ddof=1) / math.sqrt(3))
    assert s.loc["full", "params_total_M"] == pytest.approx(8.0)
    assert s.loc["full", "params_backbone_M"] == pytest.approx(7.0)
    assert s.loc["dense_attention", "flops_G"] == pytest.approx(2.0)
    assert s.loc["full", "s_per_iter"] == pytest.approx(0.61)  # 0.60, 0.61, 0.62
    assert s.loc["baseline_compute_matched", "n_iters"] == 300
    assert "n6" not in s.index  # not run → no summary row


def test_bootstrap_path_for_ten_pairs_is_deterministic(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    rng = np.random.default_rng(1)
    for seed in range(10):
        make_run(runs, "full", seed, 30.0 + rng.normal())
        make_run(runs, "n1", seed, 28.0 + rng.normal())
    df = aggregate.collect_runs(runs)
    a = aggregate.summarise(df, "mIoU", n_boot=2000).set_index("variant")
    b = aggregate.summarise(df, "mIoU", n_boot=2000).set_index("variant")
    assert a.loc["n1", "ci_method"] == "bootstrap"
    assert (a.loc["n1", "delta_lo"], a.loc["n1", "delta_hi"]) == (b.loc["n1", "delta_lo"], b.loc["n1", "delta_hi"])
    d = df[df.variant == "n1"]["mIoU"].to_numpy() - df[df.variant == "full"]["mIoU"].to_numpy()
    idx = np.random.default_rng(0).integers(0, 10, size=(2000, 10))
    lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    assert a.loc["n1", "delta_lo"] == pytest.approx(lo) and a.loc["n1", "delta_hi"] == pytest.approx(hi)
    assert a.loc["n1", "delta_lo"] < d.mean() < a.loc["n1", "delta_hi"]


def test_detection_runs_default_to_bbox_map(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed, (f, b) in enumerate([(0.30, 0.20), (0.32, 0.21)]):
        make_run(runs, "full", seed, f, task="det")
        make_run(runs, "baseline", seed, b, task="det")
    df = aggregate.collect_runs(runs)
    assert aggregate.default_metric(df) == "bbox_mAP"
    assert math.isnan(df["bbox_mAP_l"].iloc[0])  # null metrics become NaN, not errors
    s = aggregate.summarise(df, "bbox_mAP").set_index("variant")
    assert s.loc["baseline", "delta"] == pytest.approx(-0.105)


# ---------------------------------------------------------------------------------------------------------
# Tables, plots, report


def test_tables_have_paper_columns(pipeline: dict[str, Path]) -> None:
    paper = tables.load_paper_numbers()
    comp = pd.read_csv(pipeline["results"] / "table6_components.csv")
    assert list(comp["variant"]) == ["baseline", "variant1_add", "variant2_injector", "full"]
    for col in ("mIoU_mean", "mIoU_std", "delta_mIoU", "delta_mIoU_lo", "paper_APb", "paper_APm", "paper_params_M"):
        assert col in comp.columns
    assert list(comp["paper_APb"]) == [paper[v]["APb"] for v in comp["variant"]]
    assert list(comp["paper_params_M"]) == [43.8, 45.1, 46.6, 47.8]
    assert list(comp["SPM"].fillna("")) == ["", "✓", "✓", "✓"]  # read from the runs' configs
    inter = pd.read_csv(pipeline["results"] / "table6_interactions.csv")
    assert list(inter["N"]) == [0, 1, 2, 4]  # N=6 not run → optional row dropped
    t7 = pd.read_csv(pipeline["results"] / "table7_attention.csv").set_index("variant")
    assert t7.loc["dense_attention", "paper_train_time_s"] == 1.61 and t7.loc["full", "paper_flops_G"] == 403
    assert t7.loc["dense_attention", "peak_memory_mb"] == pytest.approx(1500.0)
    loo = pd.read_csv(pipeline["results"] / "leave_one_out.csv").set_index("variant")
    assert math.isnan(loo.loc["no_spm", "paper_APb"])  # not in the paper
    cm = pd.read_csv(pipeline["results"] / "compute_matched.csv").set_index("variant")
    assert cm.loc["baseline_compute_matched", "n_iters"] == 300
    att = pd.read_csv(pipeline["results"] / "attention_cost.csv")
    assert att.loc[att["size"] == 128, "dense_over_deformable_ms"].iloc[0] == pytest.approx(2.0)


def test_registry_and_paper_numbers_cover_every_overlay() -> None:
    """Every overlay is registered (and every registered variant has an overlay); every paper row a variant names
    exists; every variant the pipeline trains is registered. A new ablation needs no paper row."""
    reg = registry.load_registry()
    overlays = {p.stem for p in ABLATIONS_DIR.glob("*.yaml")}
    assert set(reg.names) == overlays
    paper = tables.load_paper_numbers()
    rows = reg.paper_rows(paper, tables.PAPER_NUMBERS)
    assert set(rows) == {v.name for v in reg.variants if v.paper is not None} and set(rows) <= set(paper)
    for v in ("no_spm", "no_injector", "baseline_compute_matched"):
        assert v not in rows or (rows[v]["APb"] is None and rows[v]["params_M"] is None)
    assert "docs/reference.md §3" in (tables.PAPER_NUMBERS).read_text()
    params = yaml.safe_load((ABLATIONS_DIR.parent / "params.yaml").read_text())
    assert set(params["variants"]) <= set(reg.names)


def test_plots_written(pipeline: dict[str, Path]) -> None:
    figs = pipeline["figures"]
    for name in [t.name for t in tables.TABLES] + ["metric_vs_n", "train_curves", "cost_vs_metric", "attention_cost"]:
        assert (figs / f"{name}.png").stat().st_size > 1000, name
    pl = pipeline["results"] / "plots"
    curves = pd.read_csv(pl / "train_curves.csv")
    full = curves[(curves.variant == "full") & (curves.iter == 100)]
    assert full["mean"].iloc[0] == pytest.approx(1.0 - 0.01)  # 2 - 1 - 0.01·seed, mean over seeds 0..2
    assert set(curves["variant"]) == set(MIOU)  # one series per variant in dvc's training-curve plot
    assert list(pd.read_csv(pl / "metric_vs_n.csv")["N"]) == [0, 1, 2, 4]
    assert list(pd.read_csv(pl / "paper_metric_vs_n.csv")["N"]) == [0, 1, 2, 4, 6]


def test_png_bytes_are_reproducible(pipeline: dict[str, Path], tmp_path: Path) -> None:
    res = pipeline["results"]
    runs = pd.read_csv(res / "runs.csv")
    plots._style()
    for name in ("table7_attention", "compute_matched"):  # the 3-panel figures: enough to catch metadata/time
        table = pd.read_csv(res / f"{name}.csv")
        out = plots.plot_table(table, tables.TABLE_BY_NAME[name], runs, "mIoU", tmp_path / f"{name}.png")
        assert out.read_bytes() == (pipeline["figures"] / f"{name}.png").read_bytes(), name


def test_report_mentions_each_table_and_is_deterministic(pipeline: dict[str, Path], tmp_path: Path) -> None:
    text = pipeline["md"].read_text()
    for spec in tables.TABLES:
        assert spec.title in text
        assert f"]({Path('figures') / (spec.name + '.png')})" in text  # figure linked relative to the report
    for finding in report.FINDINGS[:6]:
        assert finding.claim in text
    assert "N=6 brings no further gain" in text and "not run (n6)" in text
    # The discussion's numbers come from the runs: margin 10 ± t·1/√3, 10 / max(std) = 10 / 2 = 5×.
    assert f"+10.00 ± {T_975_2 / math.sqrt(3):.2f} mIoU" in text
    assert "5.0× the larger seed std" in text and "meets the > 3×" in text
    assert "Time (forward+backward): dense wins at 64 px, deformable at 128 px" in text
    assert "Test CPU" in text and "abc123" in text and "- `train.max_iters`: " in text
    assert "## Sweeps" in text and "Not available" in text
    # the pretraining check, per model: pretrained − scratch, paired by seed (3 ± t·1/√3 for the adapter)
    assert "Downstream, the ViT baseline (table 'Pretrained vs randomly initialised ViT (ours" in text
    assert "random ViT = -1.67 mIoU (95% CI [-3.10, -0.23], 3 paired seeds): the random init is better." in text
    lo, hi = 3 - T_975_2 / math.sqrt(3), 3 + T_975_2 / math.sqrt(3)
    assert f"= +3.00 mIoU (95% CI [{lo:.2f}, {hi:.2f}], 3 paired seeds): the pretrained ViT is better." in text
    # Same inputs, same bytes (figure links are relative to the output, so write beside the first one).
    again2 = pipeline["md"].with_name("again.md")
    report.write_report(
        pipeline["results"], pipeline["figures"], again2, profile_info={}, timings=None, sweep_dir=None,
        dvc_lock=Path("none"),
    )  # fmt: skip
    assert again2.read_text() == text


def test_report_optional_sections(pipeline: dict[str, Path], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    (sweep / "st1" / "plots").mkdir(parents=True)
    trials = {
        "number": [0, 1],
        "value_mIoU": [50.5, 52.25],
        "state": ["COMPLETE", "COMPLETE"],
        "duration": ["0 days 00:01:40.025570", "0 days 01:02:03.5"],
    }  # as Optuna's trials_dataframe writes
    pd.DataFrame(trials | {"params_gamma_init": [1e-3, 0.5], "params_cffn_ratio": [0.5, 0.1]}).to_csv(
        sweep / "st1" / "trials.csv", index=False
    )
    plots.save_png(plots.plt.figure(), sweep / "st1" / "plots" / "contour_gamma_ratio.png")
    refs = {
        "paper_default": {"params": {"gamma_init": 0.0, "cffn_ratio": 0.25, "with_cffn": True},
                          "per_seed": {"0": 51.0, "1": 50.0}},
        "no_convffn": {"params": {"gamma_init": 0.0, "cffn_ratio": 0.25, "with_cffn": False},
                    "per_seed": {"0": 49.0, "1": 48.0}},
    }  # fmt: skip
    summary = {
        "study_name": "st1", "metric": "mIoU", "seeds": [0, 1], "max_iters": 7, "n_trials_target": 2,
        "counts": {"complete": 2, "pruned": 0, "fail": 0}, "wall_s": 90.0,
        "search_space": {"gamma_init": {"low": 1e-6, "high": 1.0, "log": True}},
        "best": {"trial": 1, "params": {"gamma_init": 0.5, "cffn_ratio": 0.1}, "per_seed": {"0": 52.5, "1": 52.0}},
        "references": refs,
        "best_vs_references": {"paper_default": {"mean_delta": 1.75, "best_wins_on_seeds": 2}},
    }  # fmt: skip
    (sweep / "summary.json").write_text(json.dumps(summary))
    overhead = tmp_path / "overhead.json"
    overhead.write_text(
        json.dumps(
            {"vit_adapter_t@256": {"adapter_ms": 10, "baseline_ms": 4, "ratio": 2.5, "timm_ms": 3}, "host": "CPU-X9"}
        )
    )
    pre = tmp_path / "vit_cpu_pretrained.json"
    hist = [{"step": k, "train_loss": 2.3 - k / 100, "train_top1": k / 200} for k in (10, 20, 30)]
    pre.write_text(json.dumps({"preset": "vit_cpu", "top1": 0.42, "steps": 30, "history": hist}))
    plots.plot_pretrain(json.loads(pre.read_text()), tmp_path / "figs" / "pretrain_curve.png")
    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\n")
    out = tmp_path / "r.md"
    report.write_report(
        pipeline["results"], tmp_path / "figs", out, profile_info={"profile": "cpu_default", "seeds": [0, 1, 2]},
        timings={"train": 12.5}, sweep_dir=sweep, overhead_json=overhead, dvc_lock=lock, pretrain_json=pre,
    )  # fmt: skip
    text = out.read_text()
    assert "vit_adapter_t" in text and "2.50" in text and "| 1.333 " in text  # ratio, baseline / timm
    assert "measured on CPU-X9." in text and "| host" not in text  # the host is named, not a table row
    # the sweep section compares the best trial with the paper default over the same seeds
    assert "| best trial 1 " in text and "| paper_default " in text and "no ConvFFN" in text
    assert "best − paper_default: +1.75 mIoU (best wins on 2 of 2 seed(s))" in text
    assert "trials.csv" in text and "52.25" in text and "](sweep/st1/plots/contour_gamma_ratio.png)" in text
    assert "| 1 min 40 s " in text and "| 1 h 02 min " in text and "days" not in text
    assert "| top1   | 0.42 " in text and "](figs/pretrain_curve.png)" in text
    assert "cpu_default" in text and "## Stage timings" in text and "| train " in text and "other 0.2 min" in text
    import hashlib

    assert hashlib.sha256(lock.read_bytes()).hexdigest() in text


def test_report_leads_with_the_answer_and_ends_with_the_appendix(pipeline: dict[str, Path]) -> None:
    text = pipeline["md"].read_text()
    answer, rest = text.split("\n# Results\n")
    results, appendix = rest.split("\n# Appendix")
    # first screen: the paragraph with the run's power, the verdict table, the forest plot, the rows not run
    assert answer.index("## The answer") < answer.index("What it can say") < answer.index("| finding")
    assert "minimum detectable effect at 80% power" in answer and "power at paper Δ / MDE₈₀ (mIoU)" in answer
    assert "](figures/findings_forest.png)" in answer
    assert "| Table 6 (right) N=6 (n6) " in answer and "CSwin" in answer and "Pale" in answer
    # the compute-matched comparison by its measured wall ratio (make_run: wall = s/iter · iters + 5 s)
    ratio = (0.2 * 300 + 5) / (0.6 * 100 + 5)
    assert f"given {ratio:.2f}× the full model's measured wall time" in answer
    assert "equal wall-clock" not in text and f"ran {ratio:.2f}× the wall time of `full`" in results
    # settings, digests, environment and timings only in the appendix
    for heading in ("## Method", "## Inputs every number", "## Environment", "## Stage timings"):
        assert heading in appendix and heading not in answer + results, heading
    assert "Test CPU" in appendix and "Test CPU" not in answer + results


def test_figures_have_no_hidden_labels_and_complete_legends(
    pipeline: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The twin-axis pretraining figure lists all three lines; the table figures keep legends off the axes and
    show Δ bars from 0 (no truncated axis)."""
    figs: list = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path: figs.append(fig) or path)
    hist = [{"step": k, "train_loss": 2.3 - k / 100, "train_top1": k / 200} for k in (10, 20, 30)]
    plots.plot_pretrain({"history": hist, "top1": 0.4}, tmp_path / "p.png")
    (legend,) = [a.get_legend() for a in figs[0].axes if a.get_legend() is not None]
    assert [t.get_text() for t in legend.get_texts()] == ["train loss", "train top-1", "val top-1 0.400"]
    runs = pd.read_csv(pipeline["results"] / "runs.csv")
    for spec in tables.TABLES:
        table = pd.read_csv(pipeline["results"] / f"{spec.name}.csv")
        plots.plot_table(table, spec, runs, "mIoU", tmp_path / "t.png")
        fig = figs[-1]
        ours = fig.axes[0]
        lo, hi = ours.get_ylim()
        assert lo <= 0 <= hi, spec.name  # Δ axis includes 0
        for ax in fig.axes:
            leg = ax.get_legend()
            if leg is not None and leg.get_bbox_to_anchor() is not None and ax is not fig.axes[-1]:
                assert leg.get_bbox_to_anchor().transformed(ax.transAxes.inverted()).y0 < 0, spec.name


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_malformed_run_dir_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "full", 0, 30.0)
    bad = make_run(runs, "baseline", 0, 20.0)
    (bad / "metrics.json").write_text("{not json")
    with pytest.raises(aggregate.RunFormatError, match="baseline/s0"):
        aggregate.collect_runs(runs)
    assert aggregate.main(["--runs", str(runs), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: malformed run directory") and "baseline/s0" in err and "\n" not in err
    (bad / "metrics.json").unlink()
    with pytest.raises(aggregate.RunFormatError, match="missing metrics.json"):
        aggregate.collect_runs(runs)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: (d / "config.yaml").write_text(yaml.safe_dump({"model": {}, "train": {"seed": 7}, "data": {}})),
         "train.seed=7"),
        (lambda d: (d / "costs.json").write_text("{}"), "params"),
        (lambda d: d.rename(d.with_name("seed0")), "path is not"),
    ],
)  # fmt: skip
def test_inconsistent_run_dirs(tmp_path: Path, mutate, match: str) -> None:
    runs = tmp_path / "runs"
    mutate(make_run(runs, "full", 0, 30.0))
    with pytest.raises(aggregate.RunFormatError, match=match):
        aggregate.collect_runs(runs)


def test_mislabelled_run_is_caught_against_overlays(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    d = make_run(runs, "full", 0, 30.0)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["model"]["attention"] = "dense"
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    aggregate.collect_runs(runs)  # without overlays: accepted
    with pytest.raises(aggregate.RunFormatError, match="ablations/full.yaml"):
        aggregate.collect_runs(runs, ablations_dir=ABLATIONS_DIR)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert aggregate.main(["--runs", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert plots.main(["--results", str(tmp_path), "--out", str(tmp_path / "f")]) == 2
    assert report.main(["--results", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 2
    (tmp_path / "runs").mkdir()
    assert aggregate.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path)]) == 2
    errs = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(errs) == 4 and all(e.startswith("error: ") for e in errs)


# ---------------------------------------------------------------------------------------------------------
# bench/attention_cost.py


def _bench_module():
    from bench import attention_cost

    return attention_cost


def test_attention_bench_arguments_and_analytic_flops(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench_module()  # torch is imported only after the arguments are checked
    assert bench.main(["--sizes", "60"]) == 2
    assert bench.main(["--sizes", "64", "--repeats", "3"]) == 2
    errs = capsys.readouterr().err.splitlines()
    assert len(errs) == 2 and all(e.startswith("error: ") for e in errs)
    # Dense attention's QKᵀ/AV term is quadratic in the token count: its FLOP ratio to deformable grows with size.
    ratios = []
    for s in (64, 256, 1024):
        toks = {"lx": (s // 16) ** 2, "lc": 21 * s * s // 1024}
        ratios.append(
            bench.analytic_gflops("dense", 192, 192, 6, 4, toks)
            / bench.analytic_gflops("deformable", 192, 192, 6, 4, toks)
        )
    assert ratios[0] < ratios[1] < ratios[2] and ratios[2] > 10


@pytest.mark.slow
def test_attention_bench_measures_both_kinds(tmp_path: Path) -> None:
    bench = _bench_module()
    out = tmp_path / "attention_cost.json"
    assert (
        bench.main(["--sizes", "32,64", "--batch", "1", "--repeats", "5", "--analytic-sizes", "", "--json", str(out)])
        == 0
    )
    data = json.loads(out.read_text())
    assert {(r["size"], r["attention"]) for r in data["results"]} == {
        (s, k) for s in (32, 64) for k in ("deformable", "dense")
    }
    for r in data["results"]:
        assert len(r["times_ms"]) == 5 and r["q25_ms"] <= r["median_ms"] <= r["q75_ms"]
        assert r["peak_mem_mb"] is None or r["peak_mem_mb"] > 0
    assert data["results"][0]["queries"] == {"injector": 4, "extractor": 21}  # deform_inputs at 32 px
    assert set(data["summary"]["faster"]) == {"32", "64"}
    frame = tables.attention_cost_frame(data)
    assert len(frame) == 4 and frame["dense_over_deformable_ms"].notna().all()


# ---------------------------------------------------------------------------------------------------------
# The registry (ablations/index.yml)


def test_registry_drives_order_reference_and_findings() -> None:
    reg = registry.load_registry()
    assert reg.reference == "full" and aggregate.REFERENCE == "full"  # the old module constant still reads
    assert reg.names == aggregate.VARIANT_ORDER and reg.names[:4] == (
        "baseline",
        "variant1_add",
        "variant2_injector",
        "full",
    )
    assert aggregate.variant_sort_key("zzz_unregistered") == (len(reg.names), "zzz_unregistered")
    assert [t.name for t in tables.TABLES] == [t.name for t in reg.tables]
    inter = tables.TABLE_BY_NAME["table6_interactions"]
    assert [r.variant for r in inter.rows] == ["baseline", "n1", "n2", "full", "n6"] and inter.rows[-1].optional
    assert tables.TABLE_BY_NAME["pretraining"].others == ("baseline_scratch",)
    assert reg.findings == report.FINDINGS and ("n6", "full") in {(f.a, f.b) for f in reg.findings}


def _registry_copy(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(registry.DEFAULT_REGISTRY.read_text())
    edit(raw)
    path = tmp_path / "index.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r["variants"]["n1"].update(lable="N=1"),
         r"variants\.n1\.lable: unknown key \(did you mean 'label'\?\)"),
        (lambda r: r["variants"]["n1"].update(tables=["table6_interaction"]),
         r"variants\.n1\.tables\[0\]: .*did you mean 'table6_interactions'"),
        (lambda r: r["variants"]["n1"].update(role="interaction"),
         r"variants\.n1\.role: .*did you mean 'interactions'"),
        (lambda r: r["variants"]["n1"].update(paper="n_1"), r"variants\.n1\.paper: no row 'n_1' .*did you mean 'n1'"),
        (lambda r: r["findings"][0].update(a="variant1add"), r"findings\[0\]\.a: unknown variant .*'variant1_add'"),
        (lambda r: r["variants"]["n1"].update(role="reference"), r"variants: full, n1 all have role 'reference'"),
        (lambda r: r["tables"]["pretraining"].update(reference="baselin"),
         r"tables\.pretraining\.reference: .*'baseline'"),
        (lambda r: r["tables"]["table7_attention"].update(costs=["flops_G"]), r"tables\.table7_attention: panel"),
        (lambda r: r.update(table={}), r"\(top level\)\.table: unknown key \(did you mean 'tables'\?\)"),
    ],
)  # fmt: skip
def test_registry_errors_name_the_file_and_key(tmp_path: Path, edit, match: str) -> None:
    path = _registry_copy(tmp_path, edit)
    with pytest.raises(registry.RegistryError, match=match) as err:
        reg = registry.load_registry(path)
        reg.paper_rows(tables.load_paper_numbers(), tables.PAPER_NUMBERS)  # paper rows are checked against the file
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_registry_refuses_a_repeated_variant(tmp_path: Path) -> None:
    path = tmp_path / "index.yml"
    text = registry.DEFAULT_REGISTRY.read_text()
    path.write_text(text.replace("  n2:\n", "  n1:\n", 1))
    with pytest.raises(registry.RegistryError, match=r"variants\.n1: repeated key at line"):
        registry.load_registry(path)


def test_cli_reports_a_bad_registry_in_one_line(pipeline: dict[str, Path], tmp_path: Path, capsys) -> None:
    bad = _registry_copy(tmp_path, lambda r: r["variants"]["full"].update(tables=["leave_one_ut"]))
    args = ["--results", str(pipeline["results"]), "--registry", str(bad)]
    assert aggregate.main(["--runs", str(pipeline["runs"]), "--out", str(tmp_path / "o"), "--registry", str(bad)]) == 2
    assert plots.main([*args, "--out", str(tmp_path / "f")]) == 2
    assert report.main([*args, "--out", str(tmp_path / "r.md")]) == 2
    errs = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(errs) == 3 and all(e.startswith(f"error: {bad}: variants.full.tables[0]") for e in errs), errs


def test_new_variant_is_one_registry_entry(pipeline: dict[str, Path], tmp_path: Path) -> None:
    """A variant the code has never heard of, registered with one line, lands in its table, the summary, the
    figures' data, a finding and the report (the micro pipeline test does the same end to end with dvc)."""
    runs = tmp_path / "runs"
    (runs / "no_convffn").mkdir(parents=True)
    for seed, v in enumerate((28.0, 29.5, 31.0)):  # Δ vs full = -2, -2.5, -3
        make_run(runs, "full", seed, MIOU["full"][seed])
        make_run(runs, "baseline", seed, MIOU["baseline"][seed])
        make_run(tmp_path / "other", "full", seed, v).rename(runs / "no_convffn" / f"s{seed}")  # full's config

    def add(raw: dict) -> None:
        raw["variants"]["no_convffn"] = {
            "label": "no ConvFFN",
            "role": "leave_one_out",
            "tables": {"leave_one_out": {"row": "no ConvFFN", "removes": "the ConvFFN"}},
        }
        raw["findings"].append({"claim": "ConvFFN helps", "source": "ours", "a": "full", "b": "no_convffn"})

    reg = _registry_copy(tmp_path, add)
    res, figs, md = tmp_path / "results", tmp_path / "figures", tmp_path / "report.md"
    assert aggregate.main(["--runs", str(runs), "--out", str(res), "--registry", str(reg)]) == 0
    assert plots.main(["--results", str(res), "--runs", str(runs), "--out", str(figs), "--registry", str(reg)]) == 0
    assert report.main(["--results", str(res), "--runs", str(runs), "--figures", str(figs), "--out", str(md),
                        "--registry", str(reg), "--dvc-lock", "none"]) == 0  # fmt: skip
    loo = pd.read_csv(res / "leave_one_out.csv").set_index("variant")
    assert loo.loc["no_convffn", "row"] == "no ConvFFN" and loo.loc["no_convffn", "delta_mIoU"] == pytest.approx(-2.5)
    assert list(pd.read_csv(res / "summary.csv")["variant"]) == ["baseline", "full", "no_convffn"]  # registry order
    assert "no_convffn" in set(pd.read_csv(res / "plots" / "train_curves.csv")["variant"])  # a dvc plots series
    assert "no_convffn" in set(pd.read_csv(res / "plots" / "cost_vs_metric.csv")["variant"])
    text = md.read_text()
    assert (
        "| no ConvFFN " in text and "| ConvFFN helps " in text and "- Removing the ConvFFN from the full model" in text
    )


def test_analysis_modules_import_no_cycle() -> None:
    """aggregate ↔ tables once imported each other; the package's import graph is acyclic now."""
    import ast

    pkg = Path(aggregate.__file__).parent
    graph = {}
    for path in pkg.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vit_adapter.analysis"):
                deps |= (
                    {node.module.rsplit(".", 1)[-1]}
                    if node.module != "vit_adapter.analysis"
                    else {a.name for a in node.names}
                )
        graph[path.stem] = deps & {p.stem for p in pkg.glob("*.py")}

    def visit(mod: str, stack: tuple[str, ...]) -> None:
        assert mod not in stack, f"import cycle: {' -> '.join((*stack, mod))}"
        for dep in graph[mod]:
            visit(dep, (*stack, mod))

    for mod in graph:
        visit(mod, ())


def test_analysis_cli_contract_prints_paths_or_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    """The shared entry-point contract of aggregate, plots and report: written paths on stdout, exit 0; a bad
    input is one readable `error:` line (a KeyError without its repr quotes) and exit 2."""
    from vit_adapter.analysis.cli_common import analysis_parser, run_step

    assert run_step(lambda: [Path("a.csv"), Path("b.csv")]) == 0
    assert capsys.readouterr().out.splitlines() == ["a.csv", "b.csv"]
    assert run_step(lambda: Path("report.md")) == 0
    assert capsys.readouterr().out == "report.md\n"

    def missing_key() -> Path:
        raise KeyError("summary.csv lacks column 'mIoU'")

    assert run_step(missing_key) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "error: summary.csv lacks column 'mIoU'\n"
    args = analysis_parser("plots", "Plot things.\n\nMore.").parse_args(["--paper", "p.yml"])
    assert vars(args) == {"paper_path": Path("p.yml"), "registry_path": None}  # dests = the step functions' names
