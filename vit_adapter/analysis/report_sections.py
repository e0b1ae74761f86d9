"""The report's result sections, each a list of Markdown lines computed from the result files: the verdict
table, the paper-mirroring tables with their figures, the attention bench, the discussion, the stand-in
pretraining and the sweep. The document's order and its first screen are the template's (templates/report.md.j2).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from .registry import Registry
from .report_inputs import ratio, read_json, rel, show
from .stats import Interval
from .summary import paired_delta
from .tables import attention_markdown, fmt, fmt_delta, fmt_signed, metric_digits, read_table, render_markdown

TARGET_RATIO = 3.0  # a margin counts as resolved when it exceeds 3x the larger seed std
_signed = fmt_signed


def _ci_text(ci: Interval, digits: int) -> str:
    return f"95% CI [{fmt(ci.lo, digits)}, {fmt(ci.hi, digits)}]"


def human_duration(td: pd.Timedelta | Any) -> str:
    """A duration as a person writes it: 1 min 40 s, 2 h 03 min, 12 s ("–" when missing)."""
    if td is None or pd.isna(td):
        return "–"
    secs = int(round(td.total_seconds()))
    h, rem = divmod(secs, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h} h {m:02d} min"
    return f"{m} min {s} s" if m else f"{s} s"


def paper_value(paper: dict[str, dict[str, Any]], variant: str, key: str) -> float:
    """A paper number of a variant's row; NaN when the variant has no row or the paper no number."""
    value = paper.get(variant, {}).get(key)
    return math.nan if value is None else value


def _power_text(power: float, mde: float, dg: int) -> str:
    p = "–" if math.isnan(power) else f"{power:.2f}"
    return f"{p} / {fmt(mde, dg)}"


def findings_markdown(fr: pd.DataFrame, metric: str) -> str:
    """The verdict table: one row per finding (and the compute-matched comparison of ours)."""
    dg = metric_digits(metric)
    show = pd.DataFrame(
        {
            "finding": [f"{f} ({src})" for f, src in zip(fr["finding"], fr["source"])],
            "a − b": [f"{a} − {b}" for a, b in zip(fr["a"], fr["b"])],
            "paper ΔAPb / ΔAPm": [
                "–" if math.isnan(x) else f"{_signed(x, 1)} / {_signed(y, 1)}"
                for x, y in zip(fr["paper_dAPb"], fr["paper_dAPm"])
            ],
            f"our Δ{metric} [95% CI]": [
                fmt_delta(d, lo, hi, "paired", dg) for d, lo, hi in zip(fr["delta"], fr["lo"], fr["hi"])
            ],
            "pairs": fr["n_pairs"].astype(str),
            f"power at paper Δ / MDE₈₀ ({metric})": [_power_text(p, m, dg) for p, m in zip(fr["power"], fr["mde"])],
            "verdict": fr["verdict"],
        }
    )
    return show.to_markdown(index=False, disable_numparse=True)


def section_tables(
    results_dir: Path, figures_dir: Path, out_dir: Path, metric: str, conf: float, registry: Registry
) -> list[str]:
    lines = [
        "## Tables",
        "",
        f"Each row: our {metric} mean ± sample std (ddof=1) over seeds (n), Δ vs the table's reference row paired by "
        f"seed with its {conf:.0%} CI, our parameter count (backbone + our head), and the paper's numbers (COCO "
        "APb/APm, #Param of ViT-S + Mask R-CNN) beside them. 'not run' rows have no result files. Each figure shows "
        "the paired Δ with its CI (left) and the paper's Δ vs the same row (right, its own axis); both axes "
        "include 0.",
        "",
    ]
    for spec in registry.tables:
        table = read_table(results_dir, spec.name)
        lines += [f"### {spec.title}", "", f"Mirrors: {spec.paper_ref}. CSV: `{spec.name}.csv`.", ""]
        lines += [render_markdown(table, spec, metric, conf), ""]
        matched = registry.role("compute_matched")
        if spec.panel == "wall_time" and matched is not None and "wall_time_s" in table:
            t = table.set_index("variant")
            if {matched, spec.reference} <= set(t.index):
                wall = ratio(float(t.loc[matched, "wall_time_s"]), float(t.loc[spec.reference, "wall_time_s"]))
                lines += [
                    f"Measured: `{matched}` ran {fmt(wall, 2)}× the wall time of `{spec.reference}` (mean per run). "
                    "Its iterations were scaled by the measured seconds per training iteration; wall time also "
                    "counts evaluation and start-up, so the match is approximate.",
                    "",
                ]
        fig = figures_dir / f"{spec.name}.png"
        if fig.is_file():
            lines += [f"![{spec.title}]({rel(fig, out_dir)})", ""]
        if spec.extra == "interactions" and (figures_dir / "metric_vs_n.png").is_file():
            lines += [f"![metric vs N]({rel(figures_dir / 'metric_vs_n.png', out_dir)})", ""]
    for name, title in (("train_curves", "Training curves"), ("cost_vs_metric", "Cost vs accuracy")):
        fig = figures_dir / f"{name}.png"
        if fig.is_file():
            lines += [f"### {title}", "", f"![{title}]({rel(fig, out_dir)})", ""]
    return lines


def section_attention(results_dir: Path, figures_dir: Path, out_dir: Path, bench_json: Path | None) -> list[str]:
    path = results_dir / "attention_cost.csv"
    if not path.is_file():
        return []
    df = pd.read_csv(path)
    lines = ["### Attention cost vs input size (bench)", ""]
    meta: dict[str, Any] = {}
    if bench_json is not None and bench_json.is_file():
        meta = read_json(bench_json).get("meta", {})
        parts = [
            f"{label} {show(meta[key])}"
            for key, label in (
                ("what", "measured:"),
                ("preset", "preset"),
                ("dim", "width D ="),
                ("heads", "heads:"),
                ("points", "points:"),
                ("batch", "batch"),
                ("threads", "threads:"),
                ("warmup", "warm-ups:"),
                ("repeats", "timed calls:"),
                ("timing", "timing:"),
                ("memory_method", "memory:"),
            )
            if meta.get(key) is not None
        ]
        lines += ["`bench/attention_cost.py` — " + "; ".join(parts) + ".", ""]
    lines += [attention_markdown(df), ""]
    by = df.drop_duplicates("size").set_index("size")

    def sides(mask: pd.Series) -> str:
        listed = ", ".join(f"{int(v)}" for v in by.index[mask])
        return f"{listed} px" if listed else "no tested size"

    t, m = by["dense_over_deformable_ms"], by["dense_over_deformable_mem"]

    def wins(ratio: pd.Series, what: str) -> str:
        dense, deform = sides(ratio < 1), sides(ratio >= 1)
        return (
            f"{what}: dense wins at {dense}, deformable at {deform} "
            f"(dense/deformable {fmt(ratio.min(), 2)}–{fmt(ratio.max(), 2)}×)."
        )

    lines.append(wins(t, "Time (forward+backward)") + " " + wins(m, "Peak memory"))
    fig = figures_dir / "attention_cost.png"
    if fig.is_file():
        lines += ["", f"![attention cost]({rel(fig, out_dir)})"]
    return lines + [""]


def section_discussion(
    runs: pd.DataFrame,
    summary: pd.DataFrame,
    fr: pd.DataFrame,
    paper: dict[str, dict[str, Any]],
    metric: str,
    n_boot: int,
    registry: Registry,
) -> list[str]:
    """Sentences about the variants holding the registry's roles (reference = the full model, baseline,
    compute_matched, attention) and every table row that `removes` a component; ``paper`` keyed by variant."""
    s = summary.set_index("variant")
    have = set(s.index)
    dg = metric_digits(metric)
    lines = ["## Discussion (every statement computed from the tables above)", ""]
    full, base = registry.reference, registry.role("baseline")
    matched, dense = registry.role("compute_matched"), registry.role("attention")
    if base is not None and {full, base} <= have:
        ci = paired_delta(runs, metric, full, base, n_boot=n_boot)
        big_std = max(float(s.loc[full, "std"]), float(s.loc[base, "std"]))
        margin_ratio = ci.estimate / big_std if big_std > 0 else math.nan
        verdict = "meets" if margin_ratio > TARGET_RATIO else "does not meet"
        paper_margin = paper_value(paper, full, "APb") - paper_value(paper, base, "APb")
        lines.append(
            f"- The full model's margin over the ViT baseline is {_signed(ci.estimate, dg)} ± "
            f"{fmt(ci.half_width, dg)} {metric} ({_ci_text(ci, dg)}, {ci.n} paired seeds), i.e. "
            f"{fmt(margin_ratio, 1)}× the larger seed std ({fmt(big_std, dg)}); this {verdict} the > "
            f"{TARGET_RATIO:g}× target. The paper's margin is {_signed(paper_margin, 1)} APb."
        )
    if matched is not None and {full, matched} <= have:
        ci = paired_delta(runs, metric, full, matched, n_boot=n_boot)
        wall = ratio(float(s.loc[matched, "wall_time_s"]), float(s.loc[full, "wall_time_s"]))
        iters = ratio(float(s.loc[matched, "n_iters"]), float(s.loc[full, "n_iters"]))
        sig = "significant" if ci.excludes_zero else "not significant"
        lines.append(
            f"- Against the ViT baseline given the full model's time budget (it ran {fmt(iters, 2)}× the iterations "
            f"in {fmt(wall, 2)}× the full model's measured wall time) the full model's margin is "
            f"{_signed(ci.estimate, dg)} {metric} ({_ci_text(ci, dg)}; {sig}). The paper compares equal schedules "
            "only."
        )
    stated: set[tuple[str, str]] = set()  # a row in two tables is stated once
    for spec in registry.tables:
        for row in spec.rows:
            pair = (row.variant, spec.reference)
            if row.removes is None or pair in stated or not set(pair) <= have:
                continue
            stated.add(pair)
            ci = paired_delta(runs, metric, row.variant, spec.reference, n_boot=n_boot)
            if ci.n >= 2:
                sig = "CI excludes 0" if ci.excludes_zero else "CI includes 0"
                whom = "the full model" if spec.reference == full else f"`{spec.reference}`"
                lines.append(
                    f"- Removing {row.removes} from {whom} changes {metric} by {_signed(ci.estimate, dg)} "
                    f"({_ci_text(ci, dg)}; {sig})."
                )
    if dense is not None and {full, dense} <= have:
        f, d = s.loc[full], s.loc[dense]
        ours = [ratio(d[c], f[c]) for c in ("s_per_iter", "peak_memory_mb", "flops_G")]
        theirs = [ratio(paper_value(paper, dense, c), paper_value(paper, full, c))
                  for c in ("train_time_s", "memory_G", "flops_G")]  # fmt: skip
        lines.append(
            "- Dense/deformable cost ratios, ours vs the paper's: time per iteration "
            f"{fmt(ours[0], 2)}× vs {fmt(theirs[0], 2)}×, memory {fmt(ours[1], 2)}× vs {fmt(theirs[1], 2)}×, FLOPs "
            f"{fmt(ours[2], 2)}× vs {fmt(theirs[2], 2)}× (our FLOPs omit grid_sample; the paper trains at "
            "1333×800, where the dense attention's quadratic term dominates, and does not state its FLOPs input size)."
        )
    if base is not None and {full, base} <= have:
        added = float(s.loc[full, "params_backbone_M"] - s.loc[base, "params_backbone_M"])
        rel = added / float(s.loc[base, "params_total_M"])
        p_base = paper_value(paper, base, "params_M")
        p_added = paper_value(paper, full, "params_M") - p_base
        lines.append(
            f"- Parameters: the adapter adds {fmt(added, 3)} M to our backbone ({fmt(100 * rel, 1)}% of the baseline "
            f"model's {fmt(float(s.loc[base, 'params_total_M']), 3)} M); in the paper it adds "
            f"{fmt(p_added, 1)} M ({fmt(100 * p_added / p_base, 1)}%)."
        )
    tested = fr[(fr["n_pairs"] >= 2) & fr["lo"].notna()]
    if len(tested):
        hw = (tested["hi"] - tested["lo"]) / 2
        lo_n, hi_n = int(tested["n_pairs"].min()), int(tested["n_pairs"].max())
        pairs = str(lo_n) if lo_n == hi_n else f"{lo_n}–{hi_n}"
        lines.append(
            f"- Resolution: the 95% CI half-widths of the tested findings range from {fmt(hw.min(), dg)} to "
            f"{fmt(hw.max(), dg)} {metric} with {pairs} seed pairs; "
            "smaller effects are not resolved at this budget (more seeds or a longer schedule narrow them)."
        )
    lines.append(
        "- Scale: our runs are small CPU-budget stand-ins (see Method); the paper's are ViT-S on COCO with ImageNet "
        "pretraining. Agreement in sign supports the paper's component ranking at our scale; it does not reproduce "
        "the paper's absolute numbers."
    )
    return lines + [""]


def section_pretrain(
    pretrain_json: Path | None, figures_dir: Path, out_dir: Path, results_dir: Path, registry: Registry
) -> list[str]:
    lines = ["## Stand-in pretraining", ""]
    # Each registry table with `pretraining`: its reference is the pretrained row, its other row the random-init
    # one; the table's Δ is scratch − pretrained, paired by seed.
    for spec in registry.tables:
        if spec.pretraining is None:
            continue
        pretrained, scratch, what = spec.reference, spec.others[0], spec.pretraining
        table = results_dir / f"{spec.name}.csv"
        if not table.is_file():
            continue
        df = pd.read_csv(table).set_index("variant")
        if not {pretrained, scratch} <= set(df.index) or not df.loc[scratch, "n"] > 0:
            continue
        metric = next(c[: -len("_mean")] for c in df.columns if c.endswith("_mean"))
        r = df.loc[scratch]
        # negated: pretrained − scratch, and its interval [−hi, −lo]
        d, lo, hi = (-float(r[f"delta_{metric}{k}"]) for k in ("", "_hi", "_lo"))
        verdict = "the pretrained ViT is better" if lo > 0 else "the random init is better" if hi < 0 else (
            "no significant difference")  # fmt: skip
        lines += [
            f"Downstream, {what} (table '{spec.title}'): from the pretrained ViT minus the same run "
            f"from a random ViT = {fmt_signed(d, 2)} {metric} (95% CI [{fmt(lo, 2)}, {fmt(hi, 2)}], "
            f"{int(r['delta_n'])} paired seeds): {verdict}.",
            "",
        ]
    if pretrain_json is None or not pretrain_json.is_file():
        return lines + ["_Not available: no pretraining JSON was given._", ""]
    lines += [f"The pretraining run's settings, its top-1 and its file digests: appendix, `{pretrain_json.name}`.", ""]
    fig = figures_dir / "pretrain_curve.png"
    if fig.is_file():
        lines += [f"![pretraining]({rel(fig, out_dir)})", ""]
    return lines


def section_sweeps(sweep_dir: Path | None, out_dir: Path) -> list[str]:
    """The latest sweep (``<sweep_dir>/summary.json``): the best trial against the paper's default and "no
    ConvFFN" on the same seeds, the leading trials and the Optuna plots."""
    lines = ["## Sweeps: γ init × ConvFFN ratio (Optuna)", ""]
    summary_path = Path(sweep_dir) / "summary.json" if sweep_dir is not None else None
    if summary_path is None or not summary_path.is_file():
        return lines + ["_Not available: no sweep summary (`vit-adapter sweep` writes `summary.json`)._", ""]
    sm = read_json(summary_path)
    metric, seeds = sm.get("metric", "metric"), sm.get("seeds", [])
    counts = sm.get("counts", {})
    space = ", ".join(
        f"{k} ∈ [{show(v.get('low'))}, {show(v.get('high'))}]{' (log)' if v.get('log') else ''}"
        for k, v in sm.get("search_space", {}).items()
    )
    wall = sm.get("wall_s")
    lines += [
        f"Study `{sm.get('study_name')}`: objective = validation {metric} after {sm.get('max_iters')} iterations, "
        f"seeds {', '.join(map(str, seeds))}; search space {space}; trials: {counts.get('complete', 0)} complete, "
        f"{counts.get('pruned', 0)} pruned, {counts.get('fail', 0)} failed (target {sm.get('n_trials_target')}); "
        f"wall time {fmt(wall / 60, 1) if isinstance(wall, int | float) else '–'} min. Storage: `{sm.get('storage')}`.",
        "",
    ]
    best = sm.get("best") or {}
    rows = []
    if best:
        prm = best.get("params", {})
        rows.append(("best trial " + str(best.get("trial")), prm.get("gamma_init"), prm.get("cffn_ratio"), True,
                     best.get("per_seed", {})))  # fmt: skip
    for name, ref in (sm.get("references") or {}).items():
        prm = ref.get("params", {})
        rows.append((name, prm.get("gamma_init"), prm.get("cffn_ratio"), prm.get("with_cffn", True),
                     ref.get("per_seed", {})))  # fmt: skip
    if rows:
        table = pd.DataFrame(
            {
                "point": [r[0] for r in rows],
                "γ init": [fmt(r[1], 6) if isinstance(r[1], float) and 0 < r[1] < 1e-2 else show(r[1]) for r in rows],
                "ConvFFN ratio": [fmt(r[2], 3) if r[3] else "no ConvFFN" for r in rows],
                **{f"{metric} seed {sd}": [fmt((r[4] or {}).get(str(sd)), 2) for r in rows] for sd in seeds},
                f"{metric} mean": [fmt(sum(r[4].values()) / len(r[4]), 2) if r[4] else "–" for r in rows],
            }
        )
        lines += [table.to_markdown(index=False, disable_numparse=True), ""]
    for name, cmp in (sm.get("best_vs_references") or {}).items():
        delta = cmp.get("mean_delta")
        lines.append(
            f"- best − {name}: {fmt_signed(delta, 2) if isinstance(delta, int | float) else '–'} {metric} "
            f"(best wins on {cmp.get('best_wins_on_seeds')} of {len(seeds)} seed(s))."
        )
    if sm.get("note"):
        lines.append(f"- Caveat: {sm['note']}.")
    imp = sm.get("importances") or {}
    if imp:
        lines.append("- fANOVA importances: " + ", ".join(f"{k} {fmt(v, 2)}" for k, v in imp.items()) + ".")
    lines.append("")
    study = Path(sweep_dir) / str(sm.get("study_name", ""))  # the journal, trials.csv and plots/ of this study
    trials_csv = study / "trials.csv"
    if trials_csv.is_file():
        df = pd.read_csv(trials_csv)
        value = next((c for c in df.columns if c == "value" or c.startswith("value_")), None)
        keep = [c for c in ("number", "state", value, "params_gamma_init", "params_cffn_ratio", "duration") if c]
        keep = [c for c in keep if c in df.columns]
        if value is not None:
            df = df.sort_values(value, ascending=False, na_position="last")
        if "duration" in df.columns:  # Optuna writes a timedelta ("0 days 00:01:40.025570")
            df["duration"] = [human_duration(x) for x in pd.to_timedelta(df["duration"], errors="coerce")]
        lines += [f"All trials (`{rel(trials_csv, out_dir)}`), best first:", "",
                  df[keep].to_markdown(index=False), ""]  # fmt: skip
    for png in sorted((study / "plots").glob("*.png")):
        lines += [f"![{png.stem}]({rel(png, out_dir)})", ""]
    return lines
