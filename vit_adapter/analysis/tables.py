"""Paper-mirroring tables: our mean ± std (n), Δ vs the full model (or the table's reference row) with its CI,
and the paper's numbers beside.

Every table is built from ``collect_runs`` + ``summarise`` output and ``ablations/paper_numbers.yml``; which tables
exist and their rows (labels, order) come from the registry ``ablations/index.yml``. Our metric columns are
named after our metric (``mIoU_mean``, ...), the paper's after the paper's (``paper_APb``, ``paper_APm``,
``paper_params_M``, ...): different tasks, different scales.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from vit_adapter.utils.io import atomic_write_text
from vit_adapter.utils.paths import project_root

from .registry import Registry, TableSpec, load_registry
from .summary import summarise, write_csv

PAPER_NUMBERS = project_root() / "ablations" / "paper_numbers.yml"
PAPER_KEYS = ("table", "label", "N", "APb", "APm", "params_M", "flops_G", "train_time_s", "memory_G", "complexity")
PAPER_METRICS = ("APb", "APm")


def __getattr__(name: str) -> Any:
    """``TABLES`` and ``TABLE_BY_NAME`` as before, now read from the registry when first asked for."""
    if name == "TABLES":
        return load_registry().tables
    if name == "TABLE_BY_NAME":
        return {t.name: t for t in load_registry().tables}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_paper_numbers(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Paper row name → the paper's row (keys ``PAPER_KEYS``; None where the paper reports nothing). The rows are
    named as the variants that read them; ``paper_by_variant`` maps them through the registry."""
    path = Path(path) if path is not None else PAPER_NUMBERS
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read paper numbers {path}: {err}") from err
    variants = raw.get("variants") if isinstance(raw, dict) else None
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"paper numbers {path} need a non-empty 'variants' mapping")
    out = {}
    for name, row in variants.items():
        if not isinstance(row, dict) or set(row) != set(PAPER_KEYS):
            raise ValueError(f"paper numbers {path}: row {name!r} must have exactly the keys {', '.join(PAPER_KEYS)}")
        out[name] = dict(row)
    return out


def paper_by_variant(registry: Registry, path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Variant → its paper row (the registry's ``paper`` key; variants without one have no entry)."""
    return registry.paper_rows(load_paper_numbers(path), path if path is not None else PAPER_NUMBERS)


def _paper(paper: dict[str, dict[str, Any]], variant: str, key: str) -> Any:
    value = paper.get(variant, {}).get(key)
    return math.nan if value is None and key != "complexity" else value


def _check(flag: Any) -> str:
    return "✓" if isinstance(flag, bool | np.bool_) and flag else ""  # numpy bools come from DataFrame rows


def _components(run: pd.Series | None) -> dict[str, str]:
    """The paper's Table 6 descriptive columns, read from what the run's config actually had."""
    if run is None:
        return {"SPM": "", "injector": "", "extractor": "", "mode": ""}
    injector = run["injector"]
    mode = {"add": "add", "attention": str(run["attention"] or "attention")}.get(str(injector), "-")
    return {
        "SPM": _check(run["use_spm"]),
        "injector": _check(injector == "attention"),
        "extractor": _check(run["use_extractor"]),
        "mode": mode,
    }


def build_table(
    spec: TableSpec, runs: pd.DataFrame, summary: pd.DataFrame, paper: dict[str, dict[str, Any]], metric: str
) -> pd.DataFrame:
    """One paper-mirroring table; rows for variants not run keep n=0 and NaN (optional rows are dropped).
    ``paper`` is keyed by variant (``paper_by_variant``)."""
    by_variant = summary.set_index("variant")
    ref_paper = {m: _paper(paper, spec.reference, m) for m in PAPER_METRICS}
    # `summary` pairs every Δ with one reference (its "reference" row); a table with another one re-pairs.
    if spec.reference in by_variant.index and by_variant.loc[spec.reference, "ci_method"] != "reference":
        conf = float(by_variant["conf"].iloc[0])
        by_variant = summarise(runs, metric, conf=conf, reference=spec.reference).set_index("variant")
    rows = []
    for r in spec.rows:
        ran = r.variant in by_variant.index
        if not ran and r.optional:
            continue
        s = by_variant.loc[r.variant] if ran else None
        first = runs[runs["variant"] == r.variant].iloc[0] if ran else None
        row: dict[str, Any] = {"row": r.label, "variant": r.variant}
        if spec.extra == "components":
            row |= _components(first)
        elif spec.extra == "interactions":
            ran_n = first["n_interactions"] if first is not None else None
            row["N"] = int(ran_n) if ran_n is not None and not pd.isna(ran_n) else paper.get(r.variant, {}).get("N")
        row |= {
            "n": int(s["n"]) if ran else 0,
            "seeds": s["seeds"] if ran else "",
            f"{metric}_mean": s["mean"] if ran else math.nan,
            f"{metric}_std": s["std"] if ran else math.nan,
            f"delta_{metric}": s["delta"] if ran else math.nan,
            f"delta_{metric}_lo": s["delta_lo"] if ran else math.nan,
            f"delta_{metric}_hi": s["delta_hi"] if ran else math.nan,
            "delta_n": int(s["delta_n"]) if ran else 0,
            "ci_method": s["ci_method"] if ran else "none",
            "params_M": s["params_total_M"] if ran else math.nan,
            "backbone_params_M": s["params_backbone_M"] if ran else math.nan,
        }
        for c in spec.costs:
            row[c] = s[c] if ran else math.nan
        for m in PAPER_METRICS:
            row[f"paper_{m}"] = _paper(paper, r.variant, m)
        row["paper_params_M"] = _paper(paper, r.variant, "params_M")
        for m in PAPER_METRICS:
            row[f"paper_delta_{m}"] = row[f"paper_{m}"] - ref_paper[m]
        for c in spec.paper_costs:
            row[f"paper_{c}"] = _paper(paper, r.variant, c)
        rows.append(row)
    return pd.DataFrame(rows)


def build_tables(
    runs: pd.DataFrame,
    summary: pd.DataFrame,
    paper: dict[str, dict[str, Any]],
    metric: str,
    *,
    registry: Registry | None = None,
) -> dict[str, pd.DataFrame]:
    specs = (registry or load_registry()).tables
    return {spec.name: build_table(spec, runs, summary, paper, metric) for spec in specs}


# ---------------------------------------------------------------------------------------------------------
# Formatting


def fmt(x: Any, digits: int | None = None) -> str:
    """Numbers for Markdown: '–' for missing; 4 decimals below 1 in magnitude (COCO fractions), else 2."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, str):
        return x
    x = float(x)
    if digits is None:
        digits = 4 if 0 < abs(x) < 1 else 2
    return f"{x:.{digits}f}"


def metric_digits(metric: str) -> int:
    """Decimals for a metric: COCO-style AP is a fraction (bbox_*, segm_*), segmentation metrics are percent."""
    return 4 if metric.startswith(("bbox_", "segm_")) else 2


def fmt_mean_std(mean: float, std: float, n: int, digits: int = 2) -> str:
    if n == 0:
        return "not run"
    return f"{fmt(mean, digits)} ± {fmt(std, digits)} (n={n})" if n >= 2 else f"{fmt(mean, digits)} (n=1)"


def fmt_signed(x: float, digits: int | None = None) -> str:
    if x is None or math.isnan(x):
        return "–"
    return ("+" if x > 0 else "") + fmt(x, digits)


def fmt_delta(delta: float, lo: float, hi: float, method: str, digits: int = 2) -> str:
    if method == "reference":
        return "reference"
    if delta is None or math.isnan(delta):
        return "–"
    if lo is None or math.isnan(lo):
        return f"{fmt_signed(delta, digits)} (no CI)"
    return f"{fmt_signed(delta, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def _text(v: Any) -> str:
    """A descriptive cell read back from CSV ('' comes back as NaN)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


_COST_DIGITS = {"flops_G": 3, "s_per_iter": 3, "peak_memory_mb": 1, "n_iters": 0, "wall_time_s": 1}
_PAPER_COST_DIGITS = {"flops_G": 0, "train_time_s": 2, "memory_G": 1}
_COST_LABELS = {
    "flops_G": "FLOPs (G, backbone fwd)",
    "s_per_iter": "train s/iter",
    "peak_memory_mb": "peak memory (MB)",
    "n_iters": "iterations",
    "wall_time_s": "wall time (s)",
}
_PAPER_COST_LABELS = {
    "flops_G": "paper FLOPs (G)",
    "train_time_s": "paper train time (s/iter)",
    "memory_G": "paper memory (GB)",
    "complexity": "paper complexity",
}


def render_markdown(table: pd.DataFrame, spec: TableSpec, metric: str, conf: float = 0.95) -> str:
    """A display version of one table (formatted strings) as a GitHub Markdown table."""
    digits = metric_digits(metric)
    show = pd.DataFrame({"row": table["row"]})
    if spec.extra == "components":
        for c in ("SPM", "injector", "extractor", "mode"):
            show[c] = [_text(v) for v in table[c]]
    elif spec.extra == "interactions":
        show["N"] = [_text(v) for v in table["N"]]
    show[f"ours: {metric} mean ± std"] = [
        fmt_mean_std(m, s, n, digits) for m, s, n in zip(table[f"{metric}_mean"], table[f"{metric}_std"], table["n"])
    ]
    show[f"Δ vs {spec.reference} [{conf:.0%} CI]"] = [
        fmt_delta(d, lo, hi, meth, digits)
        for d, lo, hi, meth in zip(
            table[f"delta_{metric}"], table[f"delta_{metric}_lo"], table[f"delta_{metric}_hi"], table["ci_method"]
        )
    ]
    show["ours #params (M)"] = [fmt(x, 3) for x in table["params_M"]]
    for c in spec.costs:
        show[_COST_LABELS[c]] = [fmt(x, _COST_DIGITS[c]) for x in table[c]]
    show["paper APb"] = [fmt(x, 1) for x in table["paper_APb"]]
    show["paper APm"] = [fmt(x, 1) for x in table["paper_APm"]]
    show["paper #Param (M)"] = [fmt(x, 1) for x in table["paper_params_M"]]
    for c in spec.paper_costs:
        show[_PAPER_COST_LABELS[c]] = [
            _text(x) or "–" if c == "complexity" else fmt(x, _PAPER_COST_DIGITS[c]) for x in table[f"paper_{c}"]
        ]
    return show.to_markdown(index=False, disable_numparse=True)


def write_tables(
    runs: pd.DataFrame,
    summary: pd.DataFrame,
    paper: dict[str, dict[str, Any]],
    out_dir: Path,
    metric: str,
    *,
    registry: Registry | None = None,
) -> list[Path]:
    """``<out>/<table>.csv`` for every registry table plus ``<out>/tables.md`` (all of them, for reading)."""
    registry = registry or load_registry()
    built = build_tables(runs, summary, paper, metric, registry=registry)
    conf = float(summary["conf"].iloc[0]) if len(summary) else 0.95
    written, md = [], [f"# Ablation tables ({metric}; Δ = variant − reference row, paired by seed)\n"]
    for spec in registry.tables:
        written.append(write_csv(built[spec.name], out_dir / f"{spec.name}.csv"))
        body = render_markdown(built[spec.name], spec, metric, conf)
        md.append(f"## {spec.title}\n\nMirrors: {spec.paper_ref}. Δ vs `{spec.reference}`.\n\n{body}\n")
    written.append(atomic_write_text(out_dir / "tables.md", "\n".join(md)))
    return written


def read_table(results_dir: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(Path(results_dir) / f"{name}.csv", keep_default_na=True)


# ---------------------------------------------------------------------------------------------------------
# Attention cost (bench/attention_cost.py JSON)


def attention_cost_frame(bench: dict[str, Any]) -> pd.DataFrame:
    """Measured rows (size × attention) with the dense/deformable ratios per size."""
    rows = bench.get("results") if isinstance(bench, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError("attention-cost JSON has no 'results' list")
    keys = ("size", "attention", "median_ms", "q25_ms", "q75_ms", "peak_mem_mb", "gflops_fwd")
    try:
        records = [
            {k: r[k] for k in keys}
            | {"vit_tokens": r["queries"]["injector"], "prior_tokens": r["queries"]["extractor"]}
            for r in rows
        ]
    except (KeyError, TypeError) as err:
        raise ValueError(f"attention-cost JSON row lacks {err}") from err
    df = pd.DataFrame(records).sort_values(["size", "attention"])
    wide = df.pivot(index="size", columns="attention", values=["median_ms", "peak_mem_mb"])
    ratio_ms = (wide["median_ms"]["dense"] / wide["median_ms"]["deformable"]).rename("dense_over_deformable_ms")
    ratio_mem = (wide["peak_mem_mb"]["dense"] / wide["peak_mem_mb"]["deformable"]).rename("dense_over_deformable_mem")
    df = df.merge(ratio_ms.reset_index(), on="size").merge(ratio_mem.reset_index(), on="size")
    return df.reset_index(drop=True)


def write_attention_cost(json_path: Path, csv_path: Path) -> Path:
    try:
        bench = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read attention-cost JSON {json_path}: {err}") from err
    return write_csv(attention_cost_frame(bench), csv_path)


def attention_markdown(df: pd.DataFrame) -> str:
    show = pd.DataFrame(
        {
            "input (px)": df["size"].astype(int).astype(str),
            "attention": df["attention"],
            "fwd+bwd ms (median [IQR])": [
                f"{fmt(m, 2)} [{fmt(a, 2)}, {fmt(b, 2)}]"
                for m, a, b in zip(df["median_ms"], df["q25_ms"], df["q75_ms"])
            ],
            "peak MB": [fmt(x, 2) for x in df["peak_mem_mb"]],
            "analytic GFLOP fwd": [fmt(x, 3) for x in df["gflops_fwd"]],
            "dense/deformable time": [fmt(x, 2) for x in df["dense_over_deformable_ms"]],
            "dense/deformable memory": [fmt(x, 2) for x in df["dense_over_deformable_mem"]],
        }
    )
    return show.to_markdown(index=False, disable_numparse=True)
