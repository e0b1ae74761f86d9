"""Seed-paired statistics per variant and the CSV writer: the pieces that ``aggregate`` (run collection, the
entry point) and ``tables`` (the paper-mirroring tables) both build on, kept apart so neither imports the other.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from vit_adapter.utils.io import atomic_write_text

from .registry import Registry, load_registry
from .stats import DEFAULT_BOOT_SEED, DEFAULT_N_BOOT, Interval, mean_interval


def variant_sort_key(variant: str, registry: Registry | None = None) -> tuple[int, str]:
    """Display order of ``ablations/index.yml``; unregistered variants follow alphabetically."""
    return (registry or load_registry()).sort_key(variant)


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    """CSV with a fixed float format (stable bytes across runs), written atomically."""
    return atomic_write_text(path, df.to_csv(index=False, float_format="%.12g", lineterminator="\n"))


def paired_differences(df: pd.DataFrame, metric: str, variant: str, reference: str) -> pd.Series:
    """metric(variant) − metric(reference) for each seed both have (NaN metrics dropped), indexed by seed."""
    a = df.loc[df["variant"] == variant, ["seed", metric]].dropna().set_index("seed")[metric]
    b = df.loc[df["variant"] == reference, ["seed", metric]].dropna().set_index("seed")[metric]
    common = a.index.intersection(b.index).sort_values()
    return (a.loc[common] - b.loc[common]).astype(float)


def paired_delta(
    df: pd.DataFrame,
    metric: str,
    variant: str,
    reference: str | None = None,
    *,
    conf: float = 0.95,
    n_boot: int = DEFAULT_N_BOOT,
    boot_seed: int = DEFAULT_BOOT_SEED,
) -> Interval:
    """Mean paired difference with its CI: t-interval for < 10 pairs, percentile bootstrap from 10 pairs.
    ``reference`` defaults to the registry's reference variant."""
    reference = reference if reference is not None else load_registry().reference
    return mean_interval(paired_differences(df, metric, variant, reference).to_numpy(), conf, n_boot, boot_seed)


def _first(values: pd.Series) -> float:
    v = values.dropna()
    return float(v.iloc[0]) if len(v) else math.nan


def summarise(
    df: pd.DataFrame,
    metric: str,
    *,
    reference: str | None = None,
    conf: float = 0.95,
    n_boot: int = DEFAULT_N_BOOT,
    boot_seed: int = DEFAULT_BOOT_SEED,
    registry: Registry | None = None,
) -> pd.DataFrame:
    """Per variant (rows in display order): n, seeds, mean, std (ddof=1), min, max of ``metric``; delta = mean
    of the seed-paired differences variant − ``reference`` (default: the registry's reference) with
    delta_lo/delta_hi (``conf`` CI), delta_n pairs and ci_method; params (M), FLOPs (G), s/iter (mean, std),
    peak memory (MB), wall time (s), n_iters."""
    if metric not in df.columns:
        raise KeyError(f"metric {metric!r} not in the runs; available: {', '.join(df.attrs.get('metrics', []))}")
    registry = registry or load_registry()
    reference = reference if reference is not None else registry.reference
    rows = []
    for variant in sorted(df["variant"].unique(), key=registry.sort_key):
        g = df[df["variant"] == variant]
        vals = g[metric].dropna().astype(float)
        n = len(vals)
        row: dict[str, Any] = {
            "variant": variant,
            "metric": metric,
            "n": n,
            "seeds": " ".join(str(s) for s in g.loc[vals.index, "seed"]),
            "mean": float(vals.mean()) if n else math.nan,
            "std": float(vals.std(ddof=1)) if n >= 2 else math.nan,
            "min": float(vals.min()) if n else math.nan,
            "max": float(vals.max()) if n else math.nan,
        }
        if variant == reference:
            row.update(delta=0.0, delta_lo=math.nan, delta_hi=math.nan, delta_n=n, ci_method="reference")
        elif (df["variant"] == reference).any():
            ci = paired_delta(df, metric, variant, reference, conf=conf, n_boot=n_boot, boot_seed=boot_seed)
            row.update(delta=ci.estimate, delta_lo=ci.lo, delta_hi=ci.hi, delta_n=ci.n, ci_method=ci.method)
        else:
            row.update(delta=math.nan, delta_lo=math.nan, delta_hi=math.nan, delta_n=0, ci_method="none")
        row.update(
            conf=conf,
            params_total_M=_first(g["params_total"]) / 1e6,
            params_backbone_M=(_first(g["params_vit"]) + _first(g["params_adapter"])) / 1e6,
            params_adapter_M=_first(g["params_adapter"]) / 1e6,
            flops_G=_first(g["flops_backbone"]) / 1e9,
            s_per_iter=float(g["s_per_iter"].mean()),
            s_per_iter_std=float(g["s_per_iter"].std(ddof=1)) if len(g) >= 2 else math.nan,
            peak_memory_mb=float(g["peak_memory_mb"].mean()),
            wall_time_s=float(g["wall_time_s"].mean()),
            n_iters=_first(g["n_iters"]),
        )
        rows.append(row)
    return pd.DataFrame(rows)
