"""Figures for the ablation report (PNG, Agg) and small CSVs for ``dvc plots``, all read from result files.

    python -m vit_adapter.analysis.plots --results results --out reports/figures [--runs results/runs]

Reads what ``aggregate`` wrote (``runs.csv``, ``summary.csv``, the table CSVs, ``attention_cost.csv``), the
runs' ``log.jsonl``/``metrics.json`` (training curves), ``ablations/paper_numbers.yml`` (the paper's curves) and
the registry ``ablations/index.yml`` (which tables, their third panels, the variants' order).
Our metric and the paper's APb/APm are on different tasks and scales, so they are never drawn on one axis: every
comparison is two side-by-side panels, each labelled with its source. PNGs carry no software/time metadata, so
re-running on the same inputs gives identical bytes.
"""

from __future__ import annotations

import io
import json
import math
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vit_adapter.utils.io import atomic_write_bytes  # noqa: E402

from .cli_common import analysis_parser, run_step  # noqa: E402
from .findings import findings_frame  # noqa: E402
from .registry import Registry, TableSpec, load_registry  # noqa: E402
from .stats import DEFAULT_N_BOOT  # noqa: E402
from .summary import write_csv  # noqa: E402
from .tables import paper_by_variant  # noqa: E402

OURS_COLOR, PAPER_COLORS = "#4C72B0", ("#DD8452", "#C44E52")
PAPER_LABEL = "paper: ViT-S + Mask R-CNN 1×, COCO val2017"


def _style() -> None:
    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    plt.rcParams["svg.hashsalt"] = "vit-adapter"  # only matters for SVG; PNG is deterministic already


def save_png(fig: plt.Figure, path: Path) -> Path:
    """Render to memory and write atomically; no Software/time metadata, so the bytes are reproducible."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _wrap(labels: Sequence[str], width: int = 16) -> list[str]:
    return [textwrap.fill(str(s), width) for s in labels]


def _metric_of(summary: pd.DataFrame) -> str:
    return str(summary["metric"].iloc[0])


# ---------------------------------------------------------------------------------------------------------
# Table bar charts


def _delta_bars(ax: plt.Axes, x: np.ndarray, d: np.ndarray, lo: np.ndarray, hi: np.ndarray, color: str) -> None:
    """Δ bars from 0 with their CI as error bars (NaN CI: no bar end); 0 is always on the axis (untruncated)."""
    err = np.vstack([np.nan_to_num(d - lo), np.nan_to_num(hi - d)])
    ax.bar(x, np.nan_to_num(d), yerr=err, color=color, alpha=0.85, capsize=4, ecolor="k")
    ax.axhline(0.0, color="k", lw=0.8)


def plot_table(table: pd.DataFrame, spec: TableSpec, runs: pd.DataFrame, metric: str, path: Path) -> Path:
    """Left: our seed-paired Δ vs the table's reference row with its 95 % CI (the numbers the verdicts rest on).
    Right: the paper's ΔAPb/ΔAPm vs the same row (different task and scale, so a separate axis). Both axes start
    from 0: no truncation. A table with a ``panel`` gets a third one: the cost ratios of its other row to its
    reference, ours vs the paper's (``cost_ratio``, Table 7), or each row's training wall-clock (``wall_time``)."""
    others = table[table["variant"] != spec.reference]  # the reference row's paper Δ is 0 by definition
    has_paper = bool(np.isfinite(others[["paper_delta_APb", "paper_delta_APm"]].to_numpy(float)).any())
    n_panels = 1 + has_paper + (spec.panel is not None)  # no empty paper panel for a table of ours only
    fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels + 1.3 * (n_panels == 1), 4.4), layout="constrained",
                             squeeze=False)  # fmt: skip
    axes = list(axes[0])
    x = np.arange(len(table))
    labels = _wrap(table["row"])
    ref_label = str(table.loc[table["variant"] == spec.reference, "row"].iloc[0]) if (
        table["variant"] == spec.reference).any() else spec.reference  # fmt: skip
    ax = axes[0]
    d = table[f"delta_{metric}"].to_numpy(float)
    _delta_bars(ax, x, d, table[f"delta_{metric}_lo"].to_numpy(float), table[f"delta_{metric}_hi"].to_numpy(float),
                OURS_COLOR)  # fmt: skip
    for i, n in enumerate(table["n"]):
        if not n:
            ax.text(i, 0.02, "not run", ha="center", va="bottom", rotation=90, fontsize=8,
                    transform=ax.get_xaxis_transform())  # fmt: skip
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel(f"ours: Δ{metric} vs reference (points)")
    ax.set_title(textwrap.fill(f"ours: Δ{metric} − '{ref_label}', paired by seed, 95% CI", 44), fontsize=9)

    if has_paper:
        _paper_delta_panel(axes[1], table, x, labels)
    if spec.panel == "cost_ratio":
        _cost_ratio_panel(axes[-1], table, spec.others[0], spec.reference)
    elif spec.panel == "wall_time":
        ax = axes[-1]
        ax.bar(x, table["wall_time_s"].fillna(0), color=OURS_COLOR, alpha=0.8)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel("ours: wall-clock per run (s, mean)")
        ax.set_title("training budget (ours)", fontsize=9)
    fig.suptitle(textwrap.fill(spec.title, 60 * n_panels), fontsize=10)
    return save_png(fig, path)


def _paper_delta_panel(ax: plt.Axes, table: pd.DataFrame, x: np.ndarray, labels: list[str]) -> None:
    """The paper's ΔAPb/ΔAPm vs the table's reference row, bars from 0."""
    w = 0.38
    for j, m in enumerate(("APb", "APm")):
        vals = table[f"paper_delta_{m}"].to_numpy(float)
        ax.bar(x + (j - 0.5) * w, np.nan_to_num(vals), w, color=PAPER_COLORS[j], label=f"paper Δ{m}")
        for i, v in enumerate(vals):
            if math.isnan(v) and j == 0:
                ax.text(i, 0.02, "no paper number", ha="center", va="bottom", rotation=90, fontsize=7,
                        transform=ax.get_xaxis_transform())  # fmt: skip
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("paper: ΔAP vs reference (COCO AP points)")
    ax.set_title(textwrap.fill(f"{PAPER_LABEL}: Δ vs the same row", 44), fontsize=9)
    # Below the axes: a legend inside would cover a bar or a 'not run' label.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)


def forest_frame(fr: pd.DataFrame) -> pd.DataFrame:
    """The forest plot's rows (findings that ran, in registry order, then ours): label, Δ, CI, paper ΔAPb."""
    ran = fr[fr["n_pairs"] > 0]
    label = [f"{f} ({a} − {b})" for f, a, b in zip(ran["finding"], ran["a"], ran["b"])]
    return pd.DataFrame({"finding": label, "a": ran["a"], "b": ran["b"], "delta": ran["delta"], "lo": ran["lo"],
                         "hi": ran["hi"], "paper_dAPb": ran["paper_dAPb"], "n_pairs": ran["n_pairs"],
                         "power": ran["power"]}).reset_index(drop=True)  # fmt: skip


def plot_forest(forest: pd.DataFrame, metric: str, path: Path) -> Path:
    """One row per finding. Left axis: our Δ with its 95 % CI; right axis (its own, other unit): the paper's Δ
    APb. A hollow marker on the right means no paper counterpart."""
    n = len(forest)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 0.45 * n + 1.6), sharey=True, layout="constrained",
                                 gridspec_kw={"width_ratios": [3, 1.3]})  # fmt: skip
    y = np.arange(n)[::-1]
    d, lo, hi = (forest[c].to_numpy(float) for c in ("delta", "lo", "hi"))
    ax.errorbar(d, y, xerr=np.vstack([d - lo, hi - d]), fmt="o", color=OURS_COLOR, capsize=3, label="ours")
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(y, _wrap(forest["finding"], 48), fontsize=7)
    ax.set_xlabel(f"ours: Δ{metric} (points, a − b), 95% CI")
    ax.set_title(f"ours: seed-paired Δ{metric}", fontsize=9)
    p = forest["paper_dAPb"].to_numpy(float)
    bx.plot(p, y, "D", color=PAPER_COLORS[0], label="paper ΔAPb")
    for yi, v in zip(y, p):
        if math.isnan(v):
            bx.text(0.5, yi, "no paper Δ", transform=bx.get_yaxis_transform(), ha="center", va="center", fontsize=7)
    bx.axvline(0.0, color="k", lw=0.8)
    bx.set_xlabel("paper: ΔAPb (AP points, a − b)")
    bx.set_title("paper (ViT-S + Mask R-CNN 1×)", fontsize=9)
    fig.suptitle("Findings: our Δ with its 95% CI (left) and the paper's Δ (right, its own axis)", fontsize=10)
    return save_png(fig, path)


def _cost_ratio_panel(ax: plt.Axes, table: pd.DataFrame, other: str, reference: str) -> None:
    """other/reference (Table 7: dense/deformable) ratio of each cost, ours next to the paper's (1.0 = equal)."""
    t = table.set_index("variant")
    pairs = [
        ("FLOPs", "flops_G", "paper_flops_G"),
        ("train time", "s_per_iter", "paper_train_time_s"),
        ("memory", "peak_memory_mb", "paper_memory_G"),
    ]
    x = np.arange(len(pairs))
    ours, paper = [], []
    for _, o, p in pairs:
        ok = {reference, other} <= set(t.index)
        ours.append(float(t.loc[other, o] / t.loc[reference, o]) if ok else math.nan)
        paper.append(float(t.loc[other, p] / t.loc[reference, p]) if ok else math.nan)
    ax.bar(x - 0.2, np.nan_to_num(ours), 0.4, color=OURS_COLOR, label="ours")
    ax.bar(x + 0.2, np.nan_to_num(paper), 0.4, color=PAPER_COLORS[0], label="paper")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x, [p[0] for p in pairs])
    ax.set_ylabel("dense / deformable")
    ax.set_title("cost ratio (ours: backbone FLOPs, s/iter, peak RSS)", fontsize=9)
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------------------------------------
# Metric vs N


def paper_curve(paper: dict[str, dict[str, Any]], spec: TableSpec) -> pd.DataFrame:
    """The paper's APb/APm against N over the rows of the interactions table (``paper`` keyed by variant)."""
    rows = [
        {"N": paper[v]["N"], "APb": paper[v]["APb"], "APm": paper[v]["APm"], "variant": v}
        for v in (r.variant for r in spec.rows)
        if v in paper and paper[v]["APb"] is not None
    ]
    return pd.DataFrame(rows, columns=["N", "APb", "APm", "variant"]).sort_values("N").reset_index(drop=True)


def plot_metric_vs_n(
    table: pd.DataFrame, runs: pd.DataFrame, paper: dict[str, dict[str, Any]], spec: TableSpec, metric: str, path: Path
) -> Path:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8.4, 3.4), layout="constrained")
    t = table[table["n"] > 0].sort_values("N")
    ref_n = t.loc[t["variant"] == spec.reference, "N"]
    d = t[f"delta_{metric}"].to_numpy(float)
    err = np.vstack([np.nan_to_num(d - t[f"delta_{metric}_lo"].to_numpy(float)),
                     np.nan_to_num(t[f"delta_{metric}_hi"].to_numpy(float) - d)])  # fmt: skip
    ax.errorbar(t["N"], d, yerr=err, fmt="o-", color=OURS_COLOR, capsize=4)
    ax.axhline(0.0, color="k", lw=0.8)
    ref = f"N={int(ref_n.iloc[0])}" if len(ref_n) else spec.reference
    ax.set_xlabel("number of interactions N (0 = ViT baseline)")
    ax.set_ylabel(f"ours: Δ{metric} vs {ref} (points)")
    ax.set_title(f"ours: Δ{metric} vs {ref}, paired by seed, 95% CI", fontsize=9)
    pc = paper_curve(paper, spec)
    at_ref = pc[pc["variant"] == spec.reference]
    for j, m in enumerate(("APb", "APm")):
        base = float(at_ref[m].iloc[0]) if len(at_ref) else math.nan  # Δ vs the same row as ours
        bx.plot(pc["N"], pc[m] - base, "s-", color=PAPER_COLORS[j], label=f"paper Δ{m}")
    bx.axhline(0.0, color="k", lw=0.8)
    bx.set_xlabel("number of interactions N")
    bx.set_ylabel(f"paper: ΔAP vs {ref} (COCO AP points)")
    bx.set_title(textwrap.fill(PAPER_LABEL, 40), fontsize=9)
    bx.legend(fontsize=7)
    ticks = sorted(set(pc["N"]) | set(t["N"]))
    for a in (ax, bx):
        a.set_xticks(ticks)
    fig.suptitle("Metric vs number of interactions (paper Table 6, right)", fontsize=10)
    return save_png(fig, path)


# ---------------------------------------------------------------------------------------------------------
# Training curves


def read_log(run_dir: Path) -> pd.DataFrame:
    """log.jsonl → iter, loss (other logged columns kept); empty frame if absent."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return pd.DataFrame(columns=["iter", "loss"])
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return pd.DataFrame(rows)


def read_history(run_dir: Path, metric: str) -> pd.DataFrame:
    data = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    rows = [{"iter": h["iter"], metric: h.get(metric)} for h in data.get("history", []) if "iter" in h]
    return pd.DataFrame(rows, columns=["iter", metric]).astype(float)


def curves(
    runs: pd.DataFrame, runs_dir: Path, metric: str, registry: Registry | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long tables (variant, iter, mean, std, n_seeds) of the training loss and the eval metric, variants in
    display order; the mean at an iteration is over the seeds that logged it."""
    order = (registry or load_registry()).sort_key
    loss_rows, eval_rows = [], []
    for variant in sorted(runs["variant"].unique(), key=order):
        names = runs.loc[runs["variant"] == variant, "run"]
        logs = [read_log(runs_dir / n)[["iter", "loss"]].assign(run=n) for n in names]
        hist = [read_history(runs_dir / n, metric).assign(run=n) for n in names]
        for frames, col, out in ((logs, "loss", loss_rows), (hist, metric, eval_rows)):
            df = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else None
            if df is None:
                continue
            g = df.groupby("iter")[col]
            agg = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n_seeds": g.count()}).reset_index()
            out.append(agg.assign(variant=variant)[["variant", "iter", "mean", "std", "n_seeds"]])
    cols = ["variant", "iter", "mean", "std", "n_seeds"]
    loss = pd.concat(loss_rows, ignore_index=True) if loss_rows else pd.DataFrame(columns=cols)
    ev = pd.concat(eval_rows, ignore_index=True) if eval_rows else pd.DataFrame(columns=cols)
    return loss, ev


def plot_train_curves(
    loss: pd.DataFrame, ev: pd.DataFrame, metric: str, path: Path, registry: Registry | None = None
) -> Path:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    cmap = plt.get_cmap("tab20")
    order = (registry or load_registry()).sort_key
    for i, variant in enumerate(sorted(set(loss["variant"]) | set(ev["variant"]), key=order)):
        color = cmap(i % 20)
        for a, df in ((ax, loss), (bx, ev)):
            d = df[df["variant"] == variant]
            if not len(d):
                continue
            a.plot(d["iter"], d["mean"], "-" if a is ax else "o-", color=color, lw=1.2, ms=3, label=variant)
            s = d["std"].fillna(0).to_numpy(float)
            a.fill_between(d["iter"], d["mean"] - s, d["mean"] + s, color=color, alpha=0.15, lw=0)
    ax.set_xlabel("iteration (optimizer steps)")
    ax.set_ylabel("training loss (nats, mean ± std)")
    ax.set_title("training loss (log.jsonl)", fontsize=9)
    bx.set_xlabel("iteration")
    bx.set_ylabel(f"validation {metric} (mean ± std)")
    bx.set_title(f"validation {metric} (metrics.json history)", fontsize=9)
    bx.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_png(fig, path)


# ---------------------------------------------------------------------------------------------------------
# Cost vs accuracy, attention cost, pretraining


def plot_cost_vs_metric(summary: pd.DataFrame, path: Path) -> Path:
    metric = _metric_of(summary)
    s = summary[summary["n"] > 0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for ax, col, err, label in (
        (axes[0], "s_per_iter", "s_per_iter_std", "training time per iteration (s, mean ± std)"),
        (axes[1], "flops_G", None, "backbone forward GFLOPs (grid_sample not counted)"),
    ):
        xerr = s[err].fillna(0) if err else None
        ax.errorbar(s[col], s["mean"], xerr=xerr, yerr=s["std"].fillna(0), fmt="o", color=OURS_COLOR, capsize=3)
        for _, r in s.iterrows():
            ax.annotate(r["variant"], (r[col], r["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} (mean ± std)")
    fig.suptitle("Cost vs accuracy (ours)", fontsize=10)
    return save_png(fig, path)


def plot_attention_cost(df: pd.DataFrame, path: Path) -> Path:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    for j, kind in enumerate(("deformable", "dense")):
        d = df[df["attention"] == kind].sort_values("size")
        yerr = np.vstack([d["median_ms"] - d["q25_ms"], d["q75_ms"] - d["median_ms"]])
        ax.errorbar(d["size"], d["median_ms"], yerr=yerr, fmt="o-", capsize=3, color=PAPER_COLORS[j], label=kind)
        bx.plot(d["size"], d["peak_mem_mb"], "o-", color=PAPER_COLORS[j], label=kind)
    for a, ylabel in ((ax, "forward+backward ms (median, IQR)"), (bx, "peak extra CPU memory (MB)")):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xticks(sorted(df["size"].unique()), [str(int(s)) for s in sorted(df["size"].unique())])
        a.set_xlabel("input side (px)")
        a.set_ylabel(ylabel)
        a.legend(fontsize=7)
    fig.suptitle("Injector + extractor cross-attention cost vs input size (bench/attention_cost.py)", fontsize=10)
    return save_png(fig, path)


def plot_pretrain(meta: dict[str, Any], path: Path) -> Path:
    hist = pd.DataFrame(meta.get("history", []))
    fig, ax = plt.subplots(figsize=(5.5, 3.4), layout="constrained")
    if len(hist):
        ax.plot(hist["step"], hist["train_loss"], color=OURS_COLOR, label="train loss")
        bx = ax.twinx()
        bx.plot(hist["step"], hist["train_top1"], color=PAPER_COLORS[0], label="train top-1")
        if meta.get("top1") is not None:
            bx.axhline(float(meta["top1"]), color=PAPER_COLORS[1], ls="--", label=f"val top-1 {meta['top1']:.3f}")
        bx.set_ylabel("top-1 (fraction)")
        # One legend for both axes (a twin axis' legend lists only its own lines), outside the data.
        handles = ax.get_legend_handles_labels()[0] + bx.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3,
                  frameon=False)  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (cross-entropy, nats)")
    ax.set_title("Stand-in ViT pretraining (the run's JSON sidecar)", fontsize=9)
    return save_png(fig, path)


# ---------------------------------------------------------------------------------------------------------


def make_plots(
    results_dir: Path,
    out_dir: Path,
    *,
    runs_dir: Path | None = None,
    paper_path: Path | None = None,
    pretrain_json: Path | None = None,
    registry_path: Path | None = None,
    n_boot: int = DEFAULT_N_BOOT,
) -> list[Path]:
    """Every figure into ``out_dir`` and the dvc-plots CSVs into ``<results>/plots/``; returns all paths."""
    registry = load_registry(registry_path)
    _style()
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    runs_dir = Path(runs_dir) if runs_dir is not None else results_dir / "runs"
    for name in ("runs.csv", "summary.csv"):
        if not (results_dir / name).is_file():
            raise FileNotFoundError(f"{results_dir / name} not found; run vit_adapter.analysis.aggregate first")
    runs = pd.read_csv(results_dir / "runs.csv")
    summary = pd.read_csv(results_dir / "summary.csv")
    paper = paper_by_variant(registry, paper_path)
    metric = _metric_of(summary)
    plots_dir = results_dir / "plots"
    written: list[Path] = []
    for spec in registry.tables:
        table = pd.read_csv(results_dir / f"{spec.name}.csv")
        written.append(plot_table(table, spec, runs, metric, out_dir / f"{spec.name}.png"))
    n_spec = registry.table_with("interactions")
    if n_spec is not None:
        inter = pd.read_csv(results_dir / f"{n_spec.name}.csv")
        written.append(plot_metric_vs_n(inter, runs, paper, n_spec, metric, out_dir / "metric_vs_n.png"))
        ours_n = inter[inter["n"] > 0][["N", "variant", f"{metric}_mean", f"{metric}_std", "n"]].sort_values("N")
        # Generic column names, so that dvc.yaml's plot definitions hold for every task's metric.
        ours_n = ours_n.rename(columns={f"{metric}_mean": "mean", f"{metric}_std": "std"}).assign(metric=metric)
        written.append(write_csv(ours_n, plots_dir / "metric_vs_n.csv"))
        written.append(write_csv(paper_curve(paper, n_spec), plots_dir / "paper_metric_vs_n.csv"))

    loss, ev = curves(runs, runs_dir, metric, registry)
    written.append(plot_train_curves(loss, ev, metric, out_dir / "train_curves.png", registry))
    written.append(write_csv(loss, plots_dir / "train_curves.csv"))
    written.append(write_csv(ev, plots_dir / "eval_curves.csv"))

    fr = findings_frame(runs, paper, metric, n_boot, registry)
    forest = forest_frame(fr)
    written.append(plot_forest(forest, metric, out_dir / "findings_forest.png"))
    written.append(write_csv(forest, plots_dir / "findings.csv"))

    written.append(plot_cost_vs_metric(summary, out_dir / "cost_vs_metric.png"))
    cost_cols = ["variant", "s_per_iter", "s_per_iter_std", "flops_G", "peak_memory_mb", "mean", "std", "n"]
    written.append(write_csv(summary[summary["n"] > 0][cost_cols], plots_dir / "cost_vs_metric.csv"))

    if (results_dir / "attention_cost.csv").is_file():
        att = pd.read_csv(results_dir / "attention_cost.csv")
        written.append(plot_attention_cost(att, out_dir / "attention_cost.png"))
    if pretrain_json is not None and Path(pretrain_json).is_file():
        meta = json.loads(Path(pretrain_json).read_text(encoding="utf-8"))
        written.append(plot_pretrain(meta, out_dir / "pretrain_curve.png"))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = analysis_parser("plots", __doc__)
    p.add_argument(
        "--results", dest="results_dir", type=Path, default=Path("results"), help="aggregate's output directory"
    )
    p.add_argument("--out", dest="out_dir", type=Path, default=Path("reports/figures"), help="where the PNGs go")
    p.add_argument("--runs", dest="runs_dir", type=Path, default=None, help="run directories (default <results>/runs)")
    p.add_argument("--pretrain-json", type=Path, default=None, help="pretraining sidecar JSON (optional figure)")
    args = p.parse_args(argv)
    return run_step(lambda: make_plots(**vars(args)))


if __name__ == "__main__":
    sys.exit(main())
