"""The paper's findings checked against our runs: seed-paired Δ with its CI, the test's power, the verdict.

One frame (``findings_frame``) feeds every view: the report's verdict table and forest plot, ``findings.json``
(detail) and the flat headline metrics file that ``dvc metrics show``/``diff`` print (``headline_document``).
Besides the registry's findings it holds one comparison of ours that the paper does not make: the ViT baseline
trained for the full model's wall-clock budget (role ``compute_matched``), labelled by its measured wall ratio.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from .registry import Registry, load_registry
from .stats import DEFAULT_N_BOOT, Interval, min_detectable_effect, paired_t_power, t_interval
from .summary import paired_delta, paired_differences

POWER_ALPHA = 0.05  # two-sided level of the paired t-test whose power is reported
MDE_POWER = 0.8  # the minimum detectable effect is the effect found with this probability
OURS = "ours (no paper counterpart)"


def verdict(paper_delta: float, ci: Interval) -> tuple[str, str, str]:
    """(sign agrees, CI excludes 0, verdict) for one finding; ``paper_delta`` NaN for a comparison of ours."""
    if ci.n < 2 or math.isnan(ci.lo):
        return "–", "–", "too few paired seeds for a CI"
    excl = "yes" if ci.excludes_zero else "no"
    if math.isnan(paper_delta):
        side = "a better" if ci.estimate > 0 else "b better"
        return "–", excl, f"{side}, significant" if ci.excludes_zero else "no significant difference"
    if paper_delta == 0:
        return "–", excl, "differs" if ci.excludes_zero else "consistent (no significant change)"
    agree = (ci.estimate > 0) == (paper_delta > 0) and ci.estimate != 0
    if agree:
        return "yes", excl, "reproduced" if ci.excludes_zero else "same sign, not significant"
    return "no", excl, "opposite sign, significant" if ci.excludes_zero else "opposite sign, not significant"


def wall_ratio(runs: pd.DataFrame, variant: str, reference: str) -> float:
    """Mean wall time of ``variant``'s runs over ``reference``'s (the compute-matched baseline's label)."""
    a = runs.loc[runs["variant"] == variant, "wall_time_s"].astype(float).mean()
    b = runs.loc[runs["variant"] == reference, "wall_time_s"].astype(float).mean()
    return float(a / b) if b and np.isfinite(a) and np.isfinite(b) else math.nan


def _paper_delta(paper: dict[str, dict[str, Any]], a: str, b: str, key: str) -> float:
    pa, pb = paper.get(a, {}).get(key), paper.get(b, {}).get(key)
    return float(pa - pb) if pa is not None and pb is not None else math.nan


def _row(runs: pd.DataFrame, metric: str, a: str, b: str, paper_d: float, n_boot: int) -> dict[str, Any]:
    """Δ, CI, pairs, the differences' std, power at the paper's |Δ| and the 80 %-power detectable effect."""
    have = set(runs["variant"])
    if not {a, b} <= have:
        missing = ", ".join(sorted({a, b} - have))
        return {"delta": math.nan, "lo": math.nan, "hi": math.nan, "n_pairs": 0, "method": "none",
                "sd_diff": math.nan, "power": math.nan, "mde": math.nan, "sign_agrees": "–",
                "ci_excludes_0": "–", "verdict": f"not run ({missing})"}  # fmt: skip
    ci = paired_delta(runs, metric, a, b, n_boot=n_boot)
    diffs = paired_differences(runs, metric, a, b).to_numpy(float)
    sd = float(np.std(diffs, ddof=1)) if len(diffs) >= 2 else math.nan
    agree, excl, text = verdict(paper_d, ci)
    text = text.replace("a better", f"{a} better").replace("b better", f"{b} better")
    power = paired_t_power(paper_d, sd, ci.n, POWER_ALPHA) if paper_d != 0 else math.nan
    return {"delta": ci.estimate, "lo": ci.lo, "hi": ci.hi, "n_pairs": ci.n, "method": ci.method, "sd_diff": sd,
            "power": power, "mde": min_detectable_effect(sd, ci.n, MDE_POWER, POWER_ALPHA),
            "sign_agrees": agree, "ci_excludes_0": excl, "verdict": text}  # fmt: skip


def findings_frame(
    runs: pd.DataFrame,
    paper: dict[str, dict[str, Any]],
    metric: str,
    n_boot: int = DEFAULT_N_BOOT,
    registry: Registry | None = None,
) -> pd.DataFrame:
    """One row per registry finding (``kind`` "paper"), then the compute-matched comparison (``kind`` "ours")
    when both its variants ran. Columns: finding, source, kind, a, b, paper_dAPb, paper_dAPm, delta, lo, hi,
    n_pairs, method, sd_diff, power (at the paper's |ΔAPb| read as points of our metric), mde, sign_agrees,
    ci_excludes_0, verdict, wall_ratio (b's wall time over a's; NaN for the paper's findings)."""
    registry = registry or load_registry()
    rows = []
    for f in registry.findings:
        d_apb, d_apm = (_paper_delta(paper, f.a, f.b, k) for k in ("APb", "APm"))
        row = {"finding": f.claim, "source": f.source, "kind": "paper", "a": f.a, "b": f.b,
               "paper_dAPb": d_apb, "paper_dAPm": d_apm}  # fmt: skip
        rows.append(row | _row(runs, metric, f.a, f.b, d_apb, n_boot) | {"wall_ratio": math.nan})
    full, matched = registry.reference, registry.role("compute_matched")
    if matched is not None and {full, matched} <= set(runs["variant"]):
        ratio = wall_ratio(runs, matched, full)
        claim = f"ViT-Adapter vs the ViT baseline given {ratio:.2f}× its wall time"
        row = {"finding": claim, "source": OURS, "kind": "ours", "a": full, "b": matched,
               "paper_dAPb": math.nan, "paper_dAPm": math.nan}  # fmt: skip
        rows.append(row | _row(runs, metric, full, matched, math.nan, n_boot) | {"wall_ratio": ratio})
    return pd.DataFrame(rows)


def _num(x: Any) -> float | int | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(float(x), 4)


def findings_document(fr: pd.DataFrame, metric: str) -> dict[str, Any]:
    """The verdict table as JSON (detail output): per comparison a − b the paper's ΔAPb, our Δ, CI, pairs,
    power, minimum detectable effect and verdict."""
    doc: dict[str, Any] = {"metric": metric, "findings": {}}
    for row in fr.to_dict("records"):
        doc["findings"][f"{row['a']}-{row['b']}"] = {
            "claim": row["finding"],
            "paper_dAPb": _num(row["paper_dAPb"]),
            "delta": _num(row["delta"]),
            "lo": _num(row["lo"]),
            "hi": _num(row["hi"]),
            "n_pairs": int(row["n_pairs"]),
            "power": _num(row["power"]),
            "mde": _num(row["mde"]),
            "wall_ratio": _num(row["wall_ratio"]),
            "verdict": row["verdict"],
        }
    return doc


def variant_means(runs: pd.DataFrame, metric: str, registry: Registry) -> list[tuple[str, Interval]]:
    """Per variant (display order) the mean of ``metric`` over seeds with its 95 % t-interval."""
    out = []
    for variant in sorted(runs["variant"].unique(), key=registry.sort_key):
        vals = runs.loc[runs["variant"] == variant, metric].dropna().to_numpy(float)
        out.append((str(variant), t_interval(vals)))
    return out


def headline_document(
    runs: pd.DataFrame, fr: pd.DataFrame, metric: str, registry: Registry
) -> dict[str, dict[str, float]]:
    """The DVC metrics, one flat numeric row per variant and per comparison, each written as its own small file
    so that ``dvc metrics show`` prints one line per row with a handful of columns, and ``dvc metrics diff`` one
    line per number: ``<variant>: mean|ci_lo|ci_hi`` (95 % t-interval over seeds) and, per comparison ``<a>-<b>``
    that ran, ``delta|ci_lo|ci_hi|power|mde`` (power only where the paper states a non-zero Δ). Undefined numbers
    (one seed, a finding not run) are left out rather than written as null: every value is a number."""
    doc: dict[str, dict[str, float]] = {}

    def put(row: str, key: str, value: Any) -> None:
        v = _num(value)
        if v is not None:
            doc.setdefault(row, {})[key] = v

    for variant, ci in variant_means(runs, metric, registry):
        put(variant, "mean", ci.estimate)
        put(variant, "ci_lo", ci.lo)
        put(variant, "ci_hi", ci.hi)
    for row in fr.to_dict("records"):
        name = f"{row['a']}-{row['b']}"
        for key, col in (("delta", "delta"), ("ci_lo", "lo"), ("ci_hi", "hi"), ("power", "power"), ("mde", "mde")):
            put(name, key, row[col])
    return doc
