"""The ablation report (Markdown), generated only from result files.

    python -m vit_adapter.analysis.report --results results --figures reports/figures \
        --out reports/ablation_report.md [--profile-info params.yaml] [--timings timings.json] [--sweep-dir DIR]

Three jobs, three places: reading the inputs (``report_inputs``), computing the findings (``findings``) and
rendering (the sections in ``report_sections``/``report_appendix``, the document's layout in the Jinja2
template ``templates/report.md.j2``). The first screen is the answer: the verdict table, the forest plot and one
paragraph on what this run can and cannot say, with its power. Every number comes from ``results/``, the run
directories, ``ablations/paper_numbers.yml`` or an optional input file. No timestamps: the same inputs give the
same bytes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from vit_adapter.utils.io import atomic_write_json, atomic_write_text
from vit_adapter.utils.paths import project_root

from . import report_appendix as appendix
from . import report_sections as sections
from .cli_common import analysis_parser, run_step
from .findings import MDE_POWER, findings_document, findings_frame
from .registry import Registry, load_registry
from .report_inputs import distinct, load_mapping, rel, run_files, shared_inputs, show
from .stats import BOOTSTRAP_MIN_N, DEFAULT_N_BOOT
from .tables import fmt, fmt_delta, metric_digits, paper_by_variant

__all__ = ["findings_document", "findings_frame", "main", "shared_inputs", "write_report"]

TEMPLATE = Path(__file__).with_name("templates") / "report.md.j2"

# Paper rows that no variant of ours trains, with the reason. The paper's N=6 row is a registry finding (its
# reason is given when its variant did not run); Table 7's CSwin and Pale rows swap in other papers' attention.
NOT_RUN_REASON = {
    "n6": "not in this profile's `variants` (params.yaml): the embedded CPU default's depth-4 ViT has no room "
    "for 6 interaction blocks; the paper profile trains it",
}
OTHER_PAPER_ROWS = (
    ("Table 7 'CSwin' (linear attention)", "43.5 / 39.2",
     "not implemented: CSwin's cross-shaped window attention is another paper's module; the adapter here has "
     "deformable and dense (global) attention"),
    ("Table 7 'Pale' (linear attention)", "44.2 / 39.8",
     "not implemented: Pale's pale-shaped attention is another paper's module (as CSwin)"),
)  # fmt: skip


def __getattr__(name: str) -> Any:
    """``FINDINGS``: the registry's findings (``findings`` in ablations/index.yml)."""
    if name == "FINDINGS":
        return load_registry().findings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _range(values: pd.Series, digits: int) -> str:
    v = values.dropna()
    if not len(v):
        return "–"
    lo, hi = fmt(float(v.min()), digits), fmt(float(v.max()), digits)
    return lo if lo == hi else f"{lo}–{hi}"


def answer_paragraph(fr: pd.DataFrame, metric: str, task: str, dataset: str) -> str:
    """What this run can and cannot say, computed from the findings frame (counts, CIs, power, MDE)."""
    dg = metric_digits(metric)
    paper_rows = fr[fr["kind"] == "paper"]
    tested = paper_rows[(paper_rows["n_pairs"] >= 2) & paper_rows["lo"].notna()]
    directional = tested[tested["paper_dAPb"] != 0]
    same = int((directional["sign_agrees"] == "yes").sum())
    repro = int((directional["verdict"] == "reproduced").sum())
    opposite = int((directional["verdict"] == "opposite sign, significant").sum())
    powered = int((directional["power"] >= MDE_POWER).sum())
    pairs = _range(tested["n_pairs"].astype(float), 0)
    text = (
        f"This run checks {len(directional)} of the paper's directional findings on **{task}** (**{metric}**, "
        f"{dataset}) with {pairs} seed pairs each: {same} have the paper's sign, **{repro} reproduced** (same sign "
        f"and a 95% CI that excludes 0)"
        + (f", {opposite} significantly opposite" if opposite else "")
        + ". **What it can say:** a true difference of "
        f"{_range(tested['mde'], dg)} {metric} or more (the minimum detectable effect at {MDE_POWER:.0%} power, "
        "paired t-test, α = 0.05) would very likely have shown; read as points of our metric, the paper's ΔAPb "
        f"would have been detected with power {_range(directional['power'], 2)} ({powered} of "
        f"{len(directional)} findings at ≥ {MDE_POWER:.0%}). **What it cannot say:** whether smaller effects exist "
        "(a 'not significant' verdict is an absence of evidence, not evidence against the paper), nor anything "
        "about the paper's absolute COCO numbers: the task, data and scale differ, so only signs and paired "
        f"differences are compared (Δ = a − b; t-interval below {BOOTSTRAP_MIN_N} pairs, bootstrap from there)."
    )
    ours = fr[(fr["kind"] == "ours") & (fr["n_pairs"] >= 2)]
    for row in ours.to_dict("records"):
        sig = "its CI excludes 0" if row["ci_excludes_0"] == "yes" else "its CI includes 0"
        text += (
            f" Beyond the paper: the ViT baseline given {fmt(row['wall_ratio'], 2)}× the full model's measured wall "
            f"time scores {fmt_delta(-row['delta'], -row['hi'], -row['lo'], 'paired', dg)} {metric} against "
            f"it ({sig})."
        )
    return text


def not_run_rows(fr: pd.DataFrame, paper: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """The paper's rows this run has no number for, each with the reason."""
    rows = []
    for r in fr[fr["verdict"].str.startswith("not run")].to_dict("records"):
        for variant in sorted({r["a"], r["b"]} - set(fr.loc[fr["n_pairs"] > 0, ["a", "b"]].to_numpy().ravel())):
            p = paper.get(variant, {})
            ap = f"{show(p.get('APb'))} / {show(p.get('APm'))}"
            label = f"{p.get('table', variant)} ({variant})"
            why = NOT_RUN_REASON.get(variant, "not in this profile's `variants` (params.yaml)")
            rows.append({"row": label, "ap": ap, "why": why})
    rows += [{"row": a, "ap": b, "why": c} for a, b, c in OTHER_PAPER_ROWS]
    return rows


def _join(*parts: list[str]) -> str:
    return "\n".join(line for part in parts for line in part).strip("\n")


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
    registry: Registry = load_registry(registry_path)
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
    configs = run_files(runs, runs_dir, "config.yaml")
    metas = run_files(runs, runs_dir, "run.json")
    task = str(runs["task"].iloc[0])
    datasets = ", ".join(map(show, distinct([(c.get("data") or {}).get("dataset") for c in configs.values()])))
    fr = findings_frame(runs, paper, metric, n_boot, registry)
    inputs = shared_inputs(runs, pretrain_json, sweep_dir)

    out_dir = out_md.parent
    forest = figures_dir / "findings_forest.png"
    results = _join(
        sections.section_tables(results_dir, figures_dir, out_dir, metric, conf, registry),
        sections.section_attention(results_dir, figures_dir, out_dir, results_dir / "attention_cost.json"),
        sections.section_discussion(runs, summary, fr, paper, metric, n_boot, registry),
        sections.section_pretrain(pretrain_json, figures_dir, out_dir, results_dir, registry),
        appendix.section_overhead(overhead_json),
        sections.section_sweeps(sweep_dir, out_dir),
    )
    tail = _join(
        appendix.section_method(runs, configs, metas, profile_info, registry),
        appendix.section_inputs(inputs),
        appendix.section_environment(metas, dvc_lock),
        appendix.section_timings(results_dir, pretrain_json, sweep_dir, timings),
        appendix.section_pretrain_meta(pretrain_json),
        appendix.section_regenerate(),
    )
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent),
        undefined=jinja2.StrictUndefined,  # a context key the template needs and the code forgot: an error
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML
    )
    text = env.get_template(TEMPLATE.name).render(
        answer=answer_paragraph(fr, metric, task, datasets or "unknown data"),
        verdict_table=sections.findings_markdown(fr, metric),
        forest=rel(forest, out_dir) if forest.is_file() else None,
        method_note=(
            "Power and MDE₈₀ per row: the paired t-test's power to detect the paper's |ΔAPb| read as points of "
            f"our {metric}, and the smallest effect it detects with {MDE_POWER:.0%} probability, both from the "
            "spread of the per-seed differences. Details, settings and digests: the appendix."
        ),
        not_run=not_run_rows(fr, paper),
        results=results,
        appendix=tail,
    )
    text = text.rstrip("\n") + "\n"
    if findings_json is not None:
        atomic_write_json(findings_json, findings_document(fr, metric))
    return atomic_write_text(out_md, text)


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
                "profile_info": load_mapping(args.profile_info, "profile info"),
                "timings": load_mapping(args.timings, "timings") or None,
            }
        )

    return run_step(write)


if __name__ == "__main__":
    sys.exit(main())
