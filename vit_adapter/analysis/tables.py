"""Paper-mirroring tables: our mean ± std (n), Δ vs the full model (or the table's reference row) with its CI,
and the paper's numbers beside.

Every table is built from ``collect_runs`` + ``summarise`` output and ``ablations/paper_numbers.yml``; nothing is
typed in here except row labels. Our metric columns are named after our metric (``mIoU_mean``, ...), the paper's
after the paper's (``paper_APb``, ``paper_APm``, ``paper_params_M``, ...): different tasks, different scales.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from vit_adapter.engine.rundir import REPO_ROOT, atomic_write_text

from .aggregate import REFERENCE, summarise, write_csv

PAPER_NUMBERS = REPO_ROOT / "ablations" / "paper_numbers.yml"
PAPER_KEYS = ("table", "label", "N", "APb", "APm", "params_M", "flops_G", "train_time_s", "memory_G", "complexity")
PAPER_METRICS = ("APb", "APm")


@dataclass(frozen=True)
class Row:
    variant: str
    label: str
    optional: bool = False  # dropped when not run (N=6 on the CPU default, whose depth 4 does not admit it)


@dataclass(frozen=True)
class TableSpec:
    name: str  # CSV stem in results/ and PNG stem in reports/figures/
    title: str
    paper_ref: str  # which paper table the rows mirror
    rows: tuple[Row, ...]
    extra: str | None = None  # "components" | "interactions": the paper's descriptive columns
    costs: tuple[str, ...] = ()  # our cost columns (summary names)
    paper_costs: tuple[str, ...] = ()  # paper cost columns (paper_numbers keys)
    reference: str = REFERENCE  # the row every Δ is paired against


TABLES: tuple[TableSpec, ...] = (
    TableSpec(
        "table6_components",
        "Components (paper Table 6, left)",
        "Table 6 (left)",
        (
            Row("baseline", "ViT baseline"),
            Row("variant1_add", "Variant 1: +SPM (add)"),
            Row("variant2_injector", "Variant 2: +injector"),
            Row("full", "ViT-Adapter: +extractor"),
        ),
        extra="components",
    ),
    TableSpec(
        "leave_one_out",
        "Leave-one-out (ours; each component removed from the full model)",
        "none (our rows; 'no extractor' = Table 6 Variant 2)",
        (
            Row("full", "ViT-Adapter (all components)"),
            Row("no_spm", "no SPM"),
            Row("no_injector", "no injector"),
            Row("variant2_injector", "no extractor (= Variant 2)"),
        ),
        extra="components",
    ),
    TableSpec(
        "table6_interactions",
        "Number of interactions N (paper Table 6, right)",
        "Table 6 (right)",
        (
            Row("baseline", "N=0 (ViT baseline)"),
            Row("n1", "N=1"),
            Row("n2", "N=2"),
            Row("full", "N=4 (ViT-Adapter)"),
            Row("n6", "N=6", optional=True),
        ),
        extra="interactions",
    ),
    TableSpec(
        "table7_attention",
        "Attention type (paper Table 7)",
        "Table 7",
        (Row("full", "Deformable"), Row("dense_attention", "Global (dense)")),
        costs=("flops_G", "s_per_iter", "peak_memory_mb"),
        paper_costs=("flops_G", "train_time_s", "memory_G", "complexity"),
    ),
    TableSpec(
        "compute_matched",
        "ViT baseline at equal schedule vs equal wall-clock (ours)",
        "none (ours; the paper compares equal schedules)",
        (
            Row("baseline", "ViT baseline, equal schedule"),
            Row("baseline_compute_matched", "ViT baseline, equal wall-clock"),
            Row("full", "ViT-Adapter"),
        ),
        costs=("n_iters", "s_per_iter", "wall_time_s"),
    ),
    TableSpec(
        "pretraining",
        "Pretrained vs randomly initialised ViT (ours; the offline stand-in for ImageNet pretraining)",
        "none (ours; the paper always starts from DeiT weights)",
        (
            Row("baseline", "ViT baseline, pretrained ViT"),
            Row("baseline_scratch", "ViT baseline, random init"),
        ),
        reference="baseline",
    ),
    TableSpec(
        "pretraining_adapter",
        "Pretrained vs randomly initialised ViT inside the full ViT-Adapter (ours)",
        "none (ours; the paper always starts from DeiT weights)",
        (
            Row("full", "ViT-Adapter, pretrained ViT"),
            Row("full_scratch", "ViT-Adapter, random-init ViT"),
        ),
        reference="full",
    ),
)
TABLE_BY_NAME = {t.name: t for t in TABLES}


def load_paper_numbers(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Variant → the paper's row (keys ``PAPER_KEYS``; None where the paper reports nothing)."""
    path = Path(path) if path is not None else PAPER_NUMBERS
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read paper numbers {path}: {err}") from err
    variants = raw.get("variants") if isinstance(raw, dict) else None
    if not isinstance(variants, dict) or REFERENCE not in variants:
        raise ValueError(f"paper numbers {path} need a 'variants' mapping that includes {REFERENCE!r}")
    out = {}
    for name, row in variants.items():
        if not isinstance(row, dict) or set(row) != set(PAPER_KEYS):
            raise ValueError(f"paper numbers {path}: row {name!r} must have exactly the keys {', '.join(PAPER_KEYS)}")
        out[name] = dict(row)
    return out


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
    """One paper-mirroring table; rows for variants not run keep n=0 and NaN (optional rows are dropped)."""
    by_variant = summary.set_index("variant")
    ref_paper = {m: _paper(paper, spec.reference, m) for m in PAPER_METRICS}
    if spec.reference != REFERENCE and spec.reference in by_variant.index:  # deltas paired with this reference
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
    runs: pd.DataFrame, summary: pd.DataFrame, paper: dict[str, dict[str, Any]], metric: str
) -> dict[str, pd.DataFrame]:
    return {spec.name: build_table(spec, runs, summary, paper, metric) for spec in TABLES}


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
    runs: pd.DataFrame, summary: pd.DataFrame, paper: dict[str, dict[str, Any]], out_dir: Path, metric: str
) -> list[Path]:
    """``<out>/<table>.csv`` for every table plus ``<out>/tables.md`` (all of them, for reading)."""
    built = build_tables(runs, summary, paper, metric)
    conf = float(summary["conf"].iloc[0]) if len(summary) else 0.95
    written, md = [], [f"# Ablation tables ({metric}; Δ = variant − reference row, paired by seed)\n"]
    for spec in TABLES:
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

