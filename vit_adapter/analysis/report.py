"""The ablation report (Markdown), generated only from result files.

    python -m vit_adapter.analysis.report --results results --figures reports/figures \
        --out reports/ablation_report.md [--profile-info params.yaml] [--timings timings.json] [--sweep-dir DIR]

Every number comes from ``results/`` (runs.csv, summary.csv, the table CSVs, attention_cost.csv), the run
directories (config.yaml, run.json), ``ablations/paper_numbers.yml`` or an optional input file; sentences in the
summary and discussion are computed from those numbers. The tables, the findings checked and the variants each
sentence is about (by role: reference, baseline, ...) come from the registry ``ablations/index.yml``. No
timestamps: the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from vit_adapter.utils.io import atomic_write_json, atomic_write_text
from vit_adapter.utils.paths import project_root

from .cli_common import analysis_parser, run_step
from .registry import Registry, load_registry
from .stats import BOOTSTRAP_MIN_N, DEFAULT_N_BOOT, Interval
from .summary import paired_delta
from .tables import (
    attention_markdown,
    fmt,
    fmt_delta,
    fmt_signed,
    metric_digits,
    paper_by_variant,
    read_table,
    render_markdown,
)

_signed = fmt_signed


def _ci_text(ci: Interval, digits: int) -> str:
    return f"95% CI [{fmt(ci.lo, digits)}, {fmt(ci.hi, digits)}]"


TARGET_RATIO = 3.0  # a margin counts as resolved when it exceeds 3x the larger seed std


def __getattr__(name: str) -> Any:
    """``FINDINGS`` as before; the findings are data now (``findings`` in ablations/index.yml)."""
    if name == "FINDINGS":
        return load_registry().findings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _paper_value(paper: dict[str, dict[str, Any]], variant: str, key: str) -> float:
    """A paper number of a variant's row; NaN when the variant has no row or the paper no number."""
    value = paper.get(variant, {}).get(key)
    return math.nan if value is None else value


# ---------------------------------------------------------------------------------------------------------
# Reading


def _read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _run_files(runs: pd.DataFrame, runs_dir: Path, name: str) -> dict[str, Any]:
    """run name → parsed config.yaml / run.json (missing files are skipped)."""
    out = {}
    for run in runs["run"]:
        path = runs_dir / run / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            out[run] = yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat |= _flatten(v, key + ".")
        else:
            flat[key] = v
    return flat


def _distinct(values: Sequence[Any]) -> list[Any]:
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def _show(v: Any) -> str:
    """A config/metadata value as written (floats in shortest form, e.g. 0.0002)."""
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:g}"
    return "–" if v is None else str(v)


# ---------------------------------------------------------------------------------------------------------
# Findings


def _verdict(paper_delta: float, ci: Interval) -> tuple[str, str, str]:
    """(sign agrees, CI excludes 0, verdict) for one finding."""
    if ci.n < 2 or math.isnan(ci.lo):
        return "–", "–", "too few paired seeds for a CI"
    excl = ci.excludes_zero
    if paper_delta == 0:
        return "–", "yes" if excl else "no", "consistent (no significant change)" if not excl else "differs"
    agree = (ci.estimate > 0) == (paper_delta > 0) and ci.estimate != 0
    if agree:
        return "yes", "yes" if excl else "no", "reproduced" if excl else "same sign, not significant"
    return "no", "yes" if excl else "no", "opposite sign, significant" if excl else "opposite sign, not significant"


def findings_frame(
    runs: pd.DataFrame,
    paper: dict[str, dict[str, Any]],
    metric: str,
    n_boot: int,
    registry: Registry | None = None,
) -> pd.DataFrame:
    """The registry's findings checked against the runs (``paper`` keyed by variant)."""
    have = set(runs["variant"])
    rows = []
    for f in (registry or load_registry()).findings:
        pa, pb = paper.get(f.a, {}), paper.get(f.b, {})
        d_apb = pa["APb"] - pb["APb"] if pa.get("APb") is not None and pb.get("APb") is not None else math.nan
        d_apm = pa["APm"] - pb["APm"] if pa.get("APm") is not None and pb.get("APm") is not None else math.nan
        row = {"finding": f.claim, "source": f.source, "a": f.a, "b": f.b, "paper_dAPb": d_apb, "paper_dAPm": d_apm}
        if not {f.a, f.b} <= have:
            missing = ", ".join(sorted({f.a, f.b} - have))
            row |= {"delta": math.nan, "lo": math.nan, "hi": math.nan, "n_pairs": 0, "method": "none"}
            row |= {"sign_agrees": "–", "ci_excludes_0": "–", "verdict": f"not run ({missing})"}
        else:
            ci = paired_delta(runs, metric, f.a, f.b, n_boot=n_boot)
            agree, excl, verdict = _verdict(d_apb, ci)
            row |= {"delta": ci.estimate, "lo": ci.lo, "hi": ci.hi, "n_pairs": ci.n, "method": ci.method}
            row |= {"sign_agrees": agree, "ci_excludes_0": excl, "verdict": verdict}
        rows.append(row)
    return pd.DataFrame(rows)


def findings_markdown(fr: pd.DataFrame, metric: str) -> str:
    dg = metric_digits(metric)
    show = pd.DataFrame(
        {
            "paper finding": fr["finding"],
            "source": fr["source"],
            "comparison (a − b)": [f"{a} − {b}" for a, b in zip(fr["a"], fr["b"])],
            "paper ΔAPb / ΔAPm": [
                f"{_signed(x, 1)} / {_signed(y, 1)}" for x, y in zip(fr["paper_dAPb"], fr["paper_dAPm"])
            ],
            f"our Δ{metric} [95% CI]": [
                fmt_delta(d, lo, hi, "paired", dg) for d, lo, hi in zip(fr["delta"], fr["lo"], fr["hi"])
            ],
            "pairs": fr["n_pairs"].astype(str),
            "sign agrees": fr["sign_agrees"],
            "CI excludes 0": fr["ci_excludes_0"],
            "verdict": fr["verdict"],
        }
    )
    return show.to_markdown(index=False, disable_numparse=True)


# ---------------------------------------------------------------------------------------------------------
# Sections


def _section_summary(fr: pd.DataFrame, metric: str, task: str, dataset: str) -> list[str]:
    tested = fr[~fr["verdict"].str.startswith("not run") & (fr["n_pairs"] >= 2)]
    directional = tested[tested["paper_dAPb"] != 0]
    reproduced = int((directional["verdict"] == "reproduced").sum())
    same_sign = int((directional["sign_agrees"] == "yes").sum())
    nulls = tested[tested["paper_dAPb"] == 0]
    null_ok = int((nulls["verdict"] == "consistent (no significant change)").sum())
    untested = fr[~fr.index.isin(tested.index)]
    lines = [
        "## Summary",
        "",
        f"Our runs measure **{metric}** on the **{task}** task ({dataset}); the paper reports COCO box/mask AP of "
        "ViT-S + Mask R-CNN 1×. The absolute numbers are not comparable, so each paper finding is checked by the "
        "sign of our seed-paired difference and whether its 95% CI excludes 0 (Δ = a − b; t-interval below "
        f"{BOOTSTRAP_MIN_N} pairs, percentile bootstrap from {BOOTSTRAP_MIN_N}).",
        "",
        f"- Directional findings tested: {len(directional)}; same sign as the paper: {same_sign}; "
        f"reproduced (same sign and CI excludes 0): {reproduced}.",
    ]
    if len(nulls):
        lines.append(f"- 'No change' findings tested: {len(nulls)}; consistent (CI includes 0): {null_ok}.")
    if len(untested):
        lines.append(f"- Not tested (variant not run or < 2 paired seeds): {', '.join(untested['finding'])}.")
    lines += ["", findings_markdown(fr, metric), ""]
    return lines


def _section_tables(
    results_dir: Path, figures_dir: Path, out_dir: Path, metric: str, conf: float, registry: Registry
) -> list[str]:
    lines = [
        "## Tables",
        "",
        f"Each row: our {metric} mean ± sample std (ddof=1) over seeds (n), Δ vs the full model paired by seed with "
        f"its {conf:.0%} CI, our parameter count (backbone + our head), and the paper's numbers (COCO APb/APm, "
        "#Param of ViT-S + Mask R-CNN) beside them. 'not run' rows have no result files.",
        "",
    ]
    for spec in registry.tables:
        table = read_table(results_dir, spec.name)
        lines += [f"### {spec.title}", "", f"Mirrors: {spec.paper_ref}. CSV: `{spec.name}.csv`.", ""]
        lines += [render_markdown(table, spec, metric, conf), ""]
        fig = figures_dir / f"{spec.name}.png"
        if fig.is_file():
            lines += [f"![{spec.title}]({_rel(fig, out_dir)})", ""]
        if spec.extra == "interactions" and (figures_dir / "metric_vs_n.png").is_file():
            lines += [f"![metric vs N]({_rel(figures_dir / 'metric_vs_n.png', out_dir)})", ""]
    for name, title in (("train_curves", "Training curves"), ("cost_vs_metric", "Cost vs accuracy")):
        fig = figures_dir / f"{name}.png"
        if fig.is_file():
            lines += [f"### {title}", "", f"![{title}]({_rel(fig, out_dir)})", ""]
    return lines


def _section_attention(results_dir: Path, figures_dir: Path, out_dir: Path, bench_json: Path | None) -> list[str]:
    path = results_dir / "attention_cost.csv"
    if not path.is_file():
        return []
    df = pd.read_csv(path)
    lines = ["### Attention cost vs input size (bench)", ""]
    meta: dict[str, Any] = {}
    if bench_json is not None and bench_json.is_file():
        meta = _read_json(bench_json).get("meta", {})
        parts = [
            f"{label} {_show(meta[key])}"
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
        lines += ["", f"![attention cost]({_rel(fig, out_dir)})"]
    return lines + [""]


def _section_method(
    runs: pd.DataFrame,
    configs: dict[str, Any],
    metas: dict[str, Any],
    profile_info: dict[str, Any],
    registry: Registry,
) -> list[str]:
    lines = [
        "## Method",
        "",
        "The embedded CPU default's task, data, size and schedule were chosen by pilot runs on a separate data "
        "set (data seed 1000) and seeds (100+) that the runs below never use: docs/pilots.md.",
        "",
    ]
    if not configs:
        return lines + ["No config.yaml found in the run directories.", ""]
    flat = {run: _flatten(cfg) for run, cfg in configs.items()}
    reference = runs.loc[runs["variant"] == registry.reference, "run"]
    ref_run = next((r for r in reference if r in flat), next(iter(flat)))
    ref = flat[ref_run]
    keys = [
        ("task", "model.task"),
        ("head", "head.type"),
        ("classes", "head.num_classes"),
        ("labels", "data.label_mode"),
        ("dataset", "data.dataset"),
        ("image size", "data.image_size"),
        ("train / val images", None),
        ("batch size", "data.batch_size"),
        ("model preset", "model.preset"),
        ("weights init", "weights.init"),
        ("optimiser lr / weight decay", None),
        ("schedule", "optim.schedule"),
        ("milestones", "optim.milestones"),
        ("warmup iterations", "optim.warmup_iters"),
        ("iterations", "train.max_iters"),
        ("eval interval", "train.eval_interval"),
    ]
    rows = []
    for label, key in keys:
        if key is None and label.startswith("train"):
            value = f"{_show(ref.get('data.n_train'))} / {_show(ref.get('data.n_val'))}"
        elif key is None:
            value = f"{_show(ref.get('optim.lr'))} / {_show(ref.get('optim.weight_decay'))}"
        else:
            value = _show(ref.get(key))
        rows.append({"setting": label, f"value (run {ref_run})": value})
    lines += [pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    # Settings that differ between runs other than the seed and the ablation switches (e.g. the schedule of
    # the compute-matched baseline) are listed, so no run's deviation goes unreported.
    ignore = {"train.seed"} | {f"model.{k}" for k in ("use_spm", "injector", "use_extractor", "extra_extractors")}
    ignore |= {f"model.{k}" for k in ("output_neck", "attention", "n_interactions")}
    diffs = []
    for key in sorted({k for f in flat.values() for k in f} - ignore):
        vals = {run: f.get(key) for run, f in flat.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in vals.values()}) > 1:
            by_value: dict[str, set[str]] = {}  # value -> variants (seeds collapsed)
            for run, v in vals.items():
                variant = run.split("/")[0] if "/" in run else run.rsplit("-s", 1)[0]
                by_value.setdefault(_show(v), set()).add(variant)
            text = "; ".join(
                f"{value} ({', '.join(sorted(vs, key=registry.sort_key))})"
                for value, vs in sorted(by_value.items(), key=lambda kv: -len(kv[1]))
            )
            diffs.append(f"- `{key}`: {text}")
    if diffs:
        lines += ["Settings that differ between runs (besides the seed and the ablation switches):", "", *diffs, ""]
    seeds = sorted(runs["seed"].unique())
    lines.append(
        f"Runs: {len(runs)} ({runs['variant'].nunique()} variants; seeds {', '.join(str(int(s)) for s in seeds)})."
        " Variant definitions: `ablations/*.yaml` and docs/ablations.md ('no SPM' is ours to define)."
    )
    lines.append("")
    cpus = _distinct([m.get("cpu_model") for m in metas.values()])
    gpus = _distinct([m.get("cuda_device") for m in metas.values()])
    threads = _distinct([int(t) for t in runs["threads"].dropna()])
    devices = _distinct(list(runs["device"].dropna()))
    lines += [
        f"Hardware: CPU {', '.join(map(_show, cpus)) or '–'}; GPU {', '.join(map(_show, gpus)) or '–'}; "
        f"device {', '.join(map(str, devices)) or '–'}; torch threads per run {', '.join(map(str, threads)) or '–'}.",
        "",
        "Statistics: mean ± sample std (ddof=1) over seeds; Δ = mean of the per-seed differences (same seed = same "
        "data order and initialisation stream); 95% CI: Student-t with n−1 degrees of freedom for "
        f"n < {BOOTSTRAP_MIN_N} pairs, percentile bootstrap ({DEFAULT_N_BOOT} resamples, seeded) otherwise. FLOPs: "
        "torch.utils.flop_counter on the backbone forward at data.image_size, batch 1 (grid_sample — the deformable "
        "sampling — is not counted). Peak memory: the training process's peak RSS on CPU (CUDA max allocated on GPU).",
        "",
    ]
    if profile_info:
        lines += ["Profile:", "", _kv_table(profile_info), ""]
    return lines


def _kv_table(d: dict[str, Any]) -> str:
    rows = [
        {"key": k, "value": _show(v) if not isinstance(v, list | dict) else json.dumps(v)}
        for k, v in sorted(_flatten(d).items())
    ]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _section_environment(metas: dict[str, Any], dvc_lock: Path | None) -> list[str]:
    lines = ["## Environment", ""]
    if not metas:
        lines.append("No run.json found in the run directories.")
    else:
        versions: dict[str, list[Any]] = {}
        for m in metas.values():
            for k, v in sorted((m.get("versions") or {}).items()):
                versions.setdefault(k, [])
                if v not in versions[k]:
                    versions[k].append(v)
        rows = [
            {"package": k, "version(s) over all runs": ", ".join(map(_show, v))} for k, v in sorted(versions.items())
        ]
        for key in ("python", "platform"):
            vals = _distinct([m.get(key) for m in metas.values()])
            rows.append({"package": key, "version(s) over all runs": ", ".join(map(_show, vals))})
        lines += [pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
        commits = _distinct([(m.get("git") or {}).get("commit") for m in metas.values()])
        dirty = _distinct([(m.get("git") or {}).get("dirty") for m in metas.values()])
        lines.append(
            f"Git commit(s) of the runs: {', '.join(_show(c) for c in commits)}; uncommitted changes at run time: "
            f"{', '.join(_show(d) for d in dirty)}."
        )
    if dvc_lock is not None and dvc_lock.is_file():
        lines.append(f"dvc.lock sha256 (as read when this report was generated): `{_sha256(dvc_lock)}`.")
    else:
        lines.append("dvc.lock: not present.")
    return lines + [""]


def shared_inputs(runs: pd.DataFrame, pretrain_json: Path | None, sweep_dir: Path | None) -> dict[str, Any]:
    """The input digests the runs share (runs.csv), checked against the weights file and the sweep.

    ValueError (one line) when the runs' weights digest is not the sha256 of the weights file the report
    describes, or when the sweep's study read other inputs: the report never pairs one file with another's numbers.
    """
    out: dict[str, Any] = {}
    for key in ("code", "data", "weights"):
        col = f"{key}_digest"
        vals = runs[col].dropna().unique() if col in runs else []
        if len(vals) > 1:
            raise ValueError(f"runs.csv mixes {key} digests {sorted(map(str, vals))}; rerun aggregate")
        out[key] = str(vals[0]) if len(vals) else None
    if pretrain_json is not None and Path(pretrain_json).is_file() and out["weights"] is not None:
        file_sha = _read_json(Path(pretrain_json)).get("output_sha256")
        if file_sha is not None and file_sha != out["weights"]:
            raise ValueError(
                f"the runs loaded weights {out['weights'][:12]} but {pretrain_json} describes {file_sha[:12]}: "
                "the runs are stale, rerun the pipeline"
            )
    summary = Path(sweep_dir) / "summary.json" if sweep_dir is not None else None
    if summary is not None and summary.is_file():
        sweep_inputs = _read_json(summary).get("inputs")  # sweep.write_outputs records the study's digests
        if isinstance(sweep_inputs, dict):
            out["sweep"] = {k: sweep_inputs.get(k) for k in ("code", "data", "weights")}
            for key in ("data", "weights"):
                if out[key] is not None and sweep_inputs.get(key) not in (None, out[key]):
                    raise ValueError(
                        f"the sweep's study read other {key} ({str(sweep_inputs.get(key))[:12]}) than the runs "
                        f"({out[key][:12]}): rerun the sweep stage"
                    )
    return out


def _section_inputs(inputs: dict[str, Any]) -> list[str]:
    lines = [
        "## Inputs every number here was computed from",
        "",
        "Each run directory's `run.json` records these digests (`vit_adapter/engine/identity.py`); the aggregation "
        "refuses to tabulate runs whose digests differ, and a run is reused only when its config and these digests "
        "are unchanged.",
        "",
    ]
    what = {
        "code": "training code (sha256 over `vit_adapter/` sources outside analysis/, sweep, cli)",
        "data": "dataset (sha256 over every file's bytes, `content:`; or annotation bytes + file sizes, `listing:`)",
        "weights": "pretrained ViT weights file (sha256 of its bytes; random-init variants read none)",
    }
    rows = [{"input": k, "digest": f"`{_show(inputs.get(k))}`", "what": what[k]} for k in ("code", "data", "weights")]
    lines += [pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    if "sweep" in inputs:
        sw = inputs["sweep"]
        lines.append(
            f"The sweep's study read data `{_show(sw.get('data'))}` and weights `{_show(sw.get('weights'))}` "
            f"(code `{_show(sw.get('code'))}`, which includes the sweep driver)."
        )
        lines.append("")
    return lines


def _ratio(a: float, b: float) -> float:
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def _section_discussion(
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
        ratio = ci.estimate / big_std if big_std > 0 else math.nan
        verdict = "meets" if ratio > TARGET_RATIO else "does not meet"
        paper_margin = _paper_value(paper, full, "APb") - _paper_value(paper, base, "APb")
        lines.append(
            f"- The full model's margin over the ViT baseline is {_signed(ci.estimate, dg)} ± "
            f"{fmt(ci.half_width, dg)} {metric} ({_ci_text(ci, dg)}, {ci.n} paired seeds), i.e. {fmt(ratio, 1)}× the "
            f"larger seed std ({fmt(big_std, dg)}); this {verdict} the > {TARGET_RATIO:g}× target. The paper's "
            f"margin is {_signed(paper_margin, 1)} APb."
        )
    if matched is not None and {full, matched} <= have:
        ci = paired_delta(runs, metric, full, matched, n_boot=n_boot)
        wall = _ratio(float(s.loc[matched, "wall_time_s"]), float(s.loc[full, "wall_time_s"]))
        iters = _ratio(float(s.loc[matched, "n_iters"]), float(s.loc[full, "n_iters"]))
        sig = "significant" if ci.excludes_zero else "not significant"
        lines.append(
            f"- At equal wall-clock (the baseline ran {fmt(iters, 2)}× the iterations and {fmt(wall, 2)}× the wall "
            f"time of the full model) the full model's margin is {_signed(ci.estimate, dg)} {metric} "
            f"({_ci_text(ci, dg)}; {sig}). The paper compares equal schedules only."
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
        ours = [_ratio(d[c], f[c]) for c in ("s_per_iter", "peak_memory_mb", "flops_G")]
        theirs = [_ratio(_paper_value(paper, dense, c), _paper_value(paper, full, c))
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
        p_base = _paper_value(paper, base, "params_M")
        p_added = _paper_value(paper, full, "params_M") - p_base
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


def _section_timings(
    results_dir: Path, pretrain_json: Path | None, sweep_dir: Path | None, extra: dict[str, Any] | None
) -> list[str]:
    """Wall time of each stage as recorded by the stage itself in its outputs (the last run that did work)."""
    rows: list[dict[str, Any]] = []
    if pretrain_json is not None and pretrain_json.is_file():
        meta = _read_json(pretrain_json)
        # A two-phase pretraining (params.yaml pretrain.first) records its first phase in the sidecar of the file
        # it continued from (config.init_from, relative to the repo root where the stage runs).
        init = (meta.get("config") or {}).get("init_from")
        first = Path(f"{init}.json") if init else None
        if first is not None and first.is_file():
            first_meta = _read_json(first)
            if first_meta.get("output_sha256") == meta.get("init_sha256"):
                label = f"weights, phase 1 ({first_meta.get('objective', 'classify')})"
                rows.append({"stage": label, "group": "setup", "wall_s": first_meta.get("seconds")})
        label = f"weights, phase 2 ({meta['objective']})" if first is not None else "weights (offline pretraining)"
        rows.append({"stage": label, "group": "setup", "wall_s": meta.get("seconds")})
    path = results_dir / "stage_timings.csv"
    if path.is_file():
        for r in pd.read_csv(path).itertuples():
            label = f"{r.stage} ({r.runs_trained}/{r.runs} runs trained)"
            rows.append({"stage": label, "group": "ablations", "wall_s": r.wall_s})
    summary = Path(sweep_dir) / "summary.json" if sweep_dir is not None else None
    if summary is not None and summary.is_file():
        rows.append({"stage": "sweep", "group": "sweep", "wall_s": _read_json(summary).get("wall_s")})
    for name, seconds in (extra or {}).items():
        rows.append({"stage": str(name), "group": "other", "wall_s": seconds})
    lines = ["## Stage timings", ""]
    if not rows:
        return lines + ["_No stage recorded its wall time._", ""]
    df = pd.DataFrame(rows)
    df["wall_s"] = pd.to_numeric(df["wall_s"], errors="coerce")
    show = pd.DataFrame({"stage": df["stage"], "wall (min)": [fmt(x / 60, 1) for x in df["wall_s"]]})
    totals = df.groupby("group", sort=False)["wall_s"].sum(min_count=1) / 60
    lines += [
        "Each stage records its own wall time in its outputs; a stage that `dvc repro` skipped keeps the time of "
        "the run that produced its outputs. Aggregation, plots, the benchmarks and this report add about a minute.",
        "",
        show.to_markdown(index=False, disable_numparse=True),
        "",
        "Totals: " + ", ".join(f"{g} {fmt(t, 1)} min" for g, t in totals.items()) + ".",
        "",
    ]
    return lines


def _section_pretrain(
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
    meta = _read_json(pretrain_json)
    keys = ("preset", "objective", "image_size", "top1", "top1_split", "steps", "planned_steps", "epochs_seen",
            "time_limited", "seconds", "n_params_vit", "silhouettes", "init_sha256", "output_sha256")  # fmt: skip
    lines += [f"From `{pretrain_json.name}`:", "", _kv_table({k: meta.get(k) for k in keys if k in meta}), ""]
    fig = figures_dir / "pretrain_curve.png"
    if fig.is_file():
        lines += [f"![pretraining]({_rel(fig, out_dir)})", ""]
    return lines


def _section_overhead(overhead_json: Path | None) -> list[str]:
    lines = ["## Performance: adapter overhead over the ViT baseline (bench/overhead.py)", ""]
    if overhead_json is None or not overhead_json.is_file():
        return lines + ["_Not available: no `bench/overhead.py --json` output was given._", ""]
    data = _read_json(overhead_json)
    rows = []
    for key in sorted(k for k, v in data.items() if isinstance(v, dict)):
        model, _, res = key.partition("@")
        v = data[key]
        rows.append(
            {
                "model": model,
                "resolution": res,
                "adapter ms": fmt(v.get("adapter_ms"), 2),
                "baseline ms": fmt(v.get("baseline_ms"), 2),
                "adapter / baseline": fmt(v.get("ratio"), 2),
                "timm ViT ms": fmt(v.get("timm_ms"), 2),
                "baseline / timm": fmt(_ratio(*(float(v.get(k) or "nan") for k in ("baseline_ms", "timm_ms"))), 3),
            }
        )
    lines += [
        f"From `{overhead_json.name}` (backbone only, train mode, batch 2, forward+backward, median; adapter and its "
        "N=0 baseline timed interleaved in one process), measured on "
        f"{data.get('host', 'an unrecorded host')}. The official implementation gives 3.0× (T) and 2.1× (S) at "
        "256² on a 2-core host of the project's machine kind (docs/performance.md); ratios move with "
        "the CPU, because the ViT's matrix products gain more from a faster core than the adapter's memory-bound "
        "parts do (docs/performance.md). The speed issue's targets are ≤ 2.3× (T) and ≤ 1.75× (S), with the "
        "baseline within 1.05× of a plain timm ViT + the same neck.",
        "",
    ]
    lines.append(pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) if rows else "_(empty)_")
    return lines + [""]


def _section_sweeps(sweep_dir: Path | None, out_dir: Path) -> list[str]:
    """The latest sweep (``<sweep_dir>/summary.json``): the best trial against the paper's default and "no
    ConvFFN" on the same seeds, the leading trials and the Optuna plots."""
    lines = ["## Sweeps: γ init × ConvFFN ratio (Optuna)", ""]
    summary_path = Path(sweep_dir) / "summary.json" if sweep_dir is not None else None
    if summary_path is None or not summary_path.is_file():
        return lines + ["_Not available: no sweep summary (`vit-adapter sweep` writes `summary.json`)._", ""]
    sm = _read_json(summary_path)
    metric, seeds = sm.get("metric", "metric"), sm.get("seeds", [])
    counts = sm.get("counts", {})
    space = ", ".join(
        f"{k} ∈ [{_show(v.get('low'))}, {_show(v.get('high'))}]{' (log)' if v.get('log') else ''}"
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
                "γ init": [fmt(r[1], 6) if isinstance(r[1], float) and 0 < r[1] < 1e-2 else _show(r[1]) for r in rows],
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
        lines += [f"All trials (`{_rel(trials_csv, out_dir)}`), best first:", "",
                  df[keep].to_markdown(index=False), ""]  # fmt: skip
    for png in sorted((study / "plots").glob("*.png")):
        lines += [f"![{png.stem}]({_rel(png, out_dir)})", ""]
    return lines


def _section_regenerate() -> list[str]:
    return [
        "## How to regenerate and scale up",
        "",
        "- Regenerate everything from scratch on the CPU default: `make repro` (= `dvc repro`); the stages train "
        "every variant × seed into `results/runs/`, then run `python -m vit_adapter.analysis.aggregate --runs "
        "results/runs --out results`, `python -m vit_adapter.analysis.plots --results results --out reports/figures` "
        "and `python -m vit_adapter.analysis.report --results results --figures reports/figures --out "
        "reports/ablation_report.md`.",
        "- The paper's setting: `dvc exp run -S profile=paper -S data_root=<COCO root> -S "
        "'launcher=torchrun --standalone --nproc_per_node 8'` (ViT-S + Mask R-CNN 1× on COCO; docs/paper_profile.md). "
        "One run by hand: `vit-adapter train --config coco_maskrcnn_1x_s --overlay <variant> --seed <k> "
        "--out results/runs/<variant>/s<k>`.",
        "- Multi-GPU: `torchrun --nproc_per_node=8 -m vit_adapter.cli train --config coco_maskrcnn_1x_s "
        "--overlay full --seed 0 --out results/runs/full/s0` (data.batch_size is the global batch, 16 as in the "
        "paper, split over the processes; SyncBN is the default with more than one process; docs/reference.md §2).",
        "- More seeds narrow the CIs (from 10 paired seeds the CI switches to a percentile bootstrap).",
        "",
    ]


# ---------------------------------------------------------------------------------------------------------


def write_report(
    results_dir: str | Path,
    figures_dir: str | Path,
    out_md: str | Path,
    *,
    profile_info: dict[str, Any],
    timings: dict[str, Any] | None,
    sweep_dir: Path | None,
    runs_dir: Path | None = None,
    paper_path: Path | None = None,
    pretrain_json: Path | None = None,
    overhead_json: Path | None = None,
    dvc_lock: Path | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    findings_json: Path | None = None,
    registry_path: Path | None = None,
) -> Path:
    """Write the report (and, with `findings_json`, the verdict table as JSON); returns its path.

    Raises FileNotFoundError if aggregate's outputs are missing, RegistryError (a ValueError) for a bad registry."""
    registry = load_registry(registry_path)
    results_dir, figures_dir, out_md = Path(results_dir), Path(figures_dir), Path(out_md)
    runs_dir = Path(runs_dir) if runs_dir is not None else results_dir / "runs"
    needed = ["runs.csv", "summary.csv"] + [f"{t.name}.csv" for t in registry.tables]
    missing = [n for n in needed if not (results_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{results_dir} lacks {', '.join(missing)}; run vit_adapter.analysis.aggregate first")
    runs = pd.read_csv(results_dir / "runs.csv")
    summary = pd.read_csv(results_dir / "summary.csv")
    paper = paper_by_variant(registry, paper_path)
    metric = str(summary["metric"].iloc[0])
    conf = float(summary["conf"].iloc[0])
    overhead_json = overhead_json if overhead_json is not None else results_dir / "overhead.json"
    dvc_lock = dvc_lock if dvc_lock is not None else project_root() / "dvc.lock"
    configs = _run_files(runs, runs_dir, "config.yaml")
    metas = _run_files(runs, runs_dir, "run.json")
    task = str(runs["task"].iloc[0])
    datasets = _distinct([(c.get("data") or {}).get("dataset") for c in configs.values()])
    fr = findings_frame(runs, paper, metric, n_boot, registry)

    out_dir = out_md.parent
    lines = [
        "# ViT-Adapter ablations: reproduction report",
        "",
        "_Generated by `python -m vit_adapter.analysis.report` from the result files; do not edit by hand. Paper: "
        "Chen et al., ICLR 2023 (arXiv 2205.08534); paper numbers from `ablations/paper_numbers.yml` "
        "(docs/reference.md §3)._",
        "",
    ]
    lines += _section_summary(fr, metric, task, ", ".join(map(_show, datasets)) or "unknown data")
    lines += _section_tables(results_dir, figures_dir, out_dir, metric, conf, registry)
    lines += _section_attention(results_dir, figures_dir, out_dir, results_dir / "attention_cost.json")
    lines += _section_method(runs, configs, metas, profile_info, registry)
    lines += _section_timings(results_dir, pretrain_json, sweep_dir, timings)
    lines += _section_inputs(shared_inputs(runs, pretrain_json, sweep_dir))
    lines += _section_environment(metas, dvc_lock)
    lines += _section_discussion(runs, summary, fr, paper, metric, n_boot, registry)
    lines += _section_pretrain(pretrain_json, figures_dir, out_dir, results_dir, registry)
    lines += _section_overhead(overhead_json)
    lines += _section_sweeps(sweep_dir, out_dir)
    lines += _section_regenerate()
    text = "\n".join(lines).rstrip("\n") + "\n"
    if findings_json is not None:
        atomic_write_json(findings_json, findings_document(fr, metric))
    return atomic_write_text(out_md, text)


def findings_document(fr: pd.DataFrame, metric: str) -> dict[str, Any]:
    """The verdict table as JSON (DVC metrics): per finding (a − b) the paper's ΔAPb, our Δ and CI, the verdict."""

    def num(x: Any) -> float | int | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)

    doc: dict[str, Any] = {"metric": metric, "findings": {}}
    for row in fr.to_dict("records"):
        doc["findings"][f"{row['a']}-{row['b']}"] = {
            "paper_dAPb": num(row["paper_dAPb"]),
            "delta": num(row["delta"]),
            "lo": num(row["lo"]),
            "hi": num(row["hi"]),
            "n_pairs": int(row["n_pairs"]),
            "verdict": row["verdict"],
        }
    return doc


def _load_mapping(path: Path | None, what: str) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))  # JSON is YAML too
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} is not a mapping")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    p = analysis_parser("report", __doc__)
    p.add_argument("--results", dest="results_dir", type=Path, default=Path("results"))
    p.add_argument("--figures", dest="figures_dir", type=Path, default=Path("reports/figures"))
    p.add_argument("--out", dest="out_md", type=Path, default=Path("reports/ablation_report.md"))
    p.add_argument("--runs", dest="runs_dir", type=Path, default=None, help="run directories (default <results>/runs)")
    p.add_argument("--profile-info", type=Path, default=None, help="YAML/JSON mapping shown under Method")
    p.add_argument("--timings", type=Path, default=None, help="YAML/JSON mapping of stage → seconds")
    p.add_argument("--sweep-dir", type=Path, default=None, help="sweep outputs (CSV, JSON, PNG) for the Sweeps section")
    p.add_argument("--pretrain-json", type=Path, default=None, help="pretraining sidecar JSON")
    p.add_argument("--overhead-json", type=Path, default=None, help="bench/overhead.py --json output")
    p.add_argument("--dvc-lock", type=Path, default=None, help="dvc.lock to fingerprint (default: repo root)")
    p.add_argument("--findings-json", type=Path, default=None, help="also write the verdict table as JSON here")
    args = p.parse_args(argv)

    def write() -> Path:
        return write_report(
            **{
                **vars(args),
                "profile_info": _load_mapping(args.profile_info, "profile info"),
                "timings": _load_mapping(args.timings, "timings") or None,
            }
        )

    return run_step(write)


if __name__ == "__main__":
    sys.exit(main())
