"""Collect finished run directories into one table and summarise each variant with seed-paired statistics.

A run directory is ``<runs>/<variant>/s<seed>/`` as written by ``vit_adapter.engine.trainer.train``:
``config.yaml``, ``metrics.json``, ``costs.json`` (required here), ``log.jsonl`` and ``run.json`` (used by the
plots and the report). Unfinished runs live in ``<name>.partial/`` and are skipped (they are not results).

    python -m vit_adapter.analysis.aggregate --runs results/runs --out results [--metric mIoU]

writes ``runs.csv`` (one row per run), ``summary.csv`` (one row per variant), ``headline/`` (the DVC
metrics: per variant mean and CI, per finding Δ, CI, power), ``metrics.json`` (detail), the paper-mirroring tables
(``vit_adapter.analysis.tables``) with their Markdown, and ``attention_cost.csv`` when the bench JSON exists.
Variant names, their order and the reference come from the registry ``ablations/index.yml`` (``registry``); the
statistics live in ``summary`` and are re-exported here.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from vit_adapter.utils.io import atomic_write_json, replace_dir
from vit_adapter.utils.paths import project_root

from . import tables
from .cli_common import analysis_parser, run_step
from .findings import findings_frame, headline_document
from .registry import Registry, load_registry
from .stats import DEFAULT_N_BOOT
from .summary import paired_delta, paired_differences, summarise, variant_sort_key, write_csv

__all__ = [
    "RunFormatError",
    "check_shared_inputs",
    "collect_runs",
    "collect_stage_timings",
    "default_metric",
    "load_overlays",
    "main",
    "metrics_document",
    "paired_delta",
    "paired_differences",
    "read_run",
    "run_aggregate",
    "summarise",
    "variant_sort_key",
    "write_csv",
]

SEED_DIR_RE = re.compile(r"^s(?P<seed>\d+)$")
VARIANT_RE = re.compile(r"^[A-Za-z0-9_]+$")
REQUIRED_FILES = ("config.yaml", "metrics.json", "costs.json")
# The structural switches recorded per run (reference §7): checked against the overlays when asked.
MODEL_FLAGS = ("use_spm", "injector", "use_extractor", "extra_extractors", "output_neck", "attention", "n_interactions")
DEFAULT_METRIC = {"seg": "mIoU", "det": "bbox_mAP"}
INPUT_KEYS = ("code", "data", "weights")  # the input digests run.json records (engine/identity.py)
DEFAULT_ABLATIONS = project_root() / "ablations"
HEADLINE = "headline"  # the DVC metrics: one flat numeric file per row (findings.headline_document)


class RunFormatError(ValueError):
    """A run directory that cannot be read; the message names the directory and what is wrong."""


def __getattr__(name: str) -> Any:
    """``REFERENCE`` and ``VARIANT_ORDER`` as before, now read from the registry when first asked for."""
    if name == "REFERENCE":
        return load_registry().reference
    if name == "VARIANT_ORDER":
        return load_registry().names
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _read_json(path: Path, run: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RunFormatError(f"malformed run directory {run}: cannot read {path.name} ({err})") from err


def _read_yaml(path: Path, run: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise RunFormatError(f"malformed run directory {run}: cannot read {path.name} ({err})") from err


def _number(value: Any) -> float:
    """JSON number or null → float (NaN for null: the engine writes NaN metrics as null)."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


def read_run(run: Path, *, overlays: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One run directory → a flat record (see ``collect_runs`` for the columns)."""
    m = SEED_DIR_RE.match(run.name)
    if m is None or not VARIANT_RE.match(run.parent.name):
        raise RunFormatError(f"malformed run directory {run}: path is not '<variant>/s<seed>'")
    variant, seed = run.parent.name, int(m.group("seed"))
    missing = [f for f in REQUIRED_FILES if not (run / f).is_file()]
    if missing:
        raise RunFormatError(f"malformed run directory {run}: missing {', '.join(missing)}")
    cfg = _read_yaml(run / "config.yaml", run)
    metrics = _read_json(run / "metrics.json", run)
    costs = _read_json(run / "costs.json", run)

    def bad(why: str) -> RunFormatError:
        return RunFormatError(f"malformed run directory {run}: {why}")

    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(s), dict) for s in ("model", "train", "data")):
        raise bad("config.yaml lacks the model/train/data sections of a resolved config")
    if cfg["train"].get("seed") != seed:
        raise bad(f"directory says seed {seed} but config.yaml has train.seed={cfg['train'].get('seed')!r}")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("final"), dict) or not metrics["final"]:
        raise bad("metrics.json has no non-empty 'final' mapping")
    if not isinstance(metrics.get("history", []), list):
        raise bad("metrics.json 'history' is not a list")
    params = costs.get("params") if isinstance(costs, dict) else None
    if not isinstance(params, dict) or not all(k in params for k in ("vit", "adapter", "head", "total")):
        raise bad("costs.json lacks params.{vit,adapter,head,total}")
    if overlays is not None and variant in overlays:
        for key, want in overlays[variant].items():
            if cfg["model"].get(key) != want:
                raise bad(f"model.{key}={cfg['model'].get(key)!r} but ablations/{variant}.yaml sets {want!r}")

    rec: dict[str, Any] = {"variant": variant, "seed": seed, "run": f"{variant}/{run.name}"}
    model = cfg["model"]
    rec["task"] = model.get("task")
    rec["preset"] = model.get("preset")
    for key in MODEL_FLAGS:
        rec[key] = model.get(key)
    rec["max_iters"] = cfg["train"].get("max_iters")
    rec["n_iters"] = metrics.get("iterations", rec["max_iters"])
    rec["image_size"] = cfg["data"].get("image_size")
    rec["batch_size"] = cfg["data"].get("batch_size")
    try:
        for key in ("vit", "adapter", "head", "total"):
            rec[f"params_{key}"] = int(params[key])
        rec["flops_backbone"] = _number(costs.get("flops_backbone_forward"))
        rec["s_per_iter"] = _number(costs.get("train_s_per_iter"))
        rec["images_per_s"] = _number(costs.get("train_images_per_s"))
        rec["peak_memory_mb"] = _number(costs.get("peak_memory_mb"))
        rec["wall_time_s"] = _number(costs.get("wall_time_s"))
        # Scalar final metrics only (per-class lists such as IoU_per_class stay in metrics.json).
        final = {k: v for k, v in metrics["final"].items() if not isinstance(v, list | dict | str)}
        for key, value in final.items():
            rec[key] = _number(value)
    except (TypeError, ValueError) as err:
        raise bad(f"non-numeric value in metrics.json/costs.json ({err})") from err
    rec["threads"] = costs.get("threads")
    rec["device"] = costs.get("device")
    rec["weights_init"] = (cfg.get("weights") or {}).get("init")
    inputs = _run_inputs(run)
    for key in INPUT_KEYS:
        rec[f"{key}_digest"] = inputs.get(key) if inputs is not None else None
    rec["_inputs_recorded"] = inputs is not None
    rec["_metrics"] = sorted(final)
    return rec


def _run_inputs(run: Path) -> dict[str, Any] | None:
    """The input digests ``run.json`` recorded (engine/identity.py), or None for a run that recorded none."""
    path = run / "run.json"
    if not path.is_file():
        return None
    meta = _read_json(path, run)
    inputs = meta.get("inputs") if isinstance(meta, dict) else None
    return inputs if isinstance(inputs, dict) else None


def check_shared_inputs(df: pd.DataFrame) -> dict[str, str | None]:
    """The input digests every run of one table shares; ValueError naming the runs when they differ.

    Runs differ only in their ablation's settings and seed: code and data digests must be equal across all runs,
    the weights digest across all runs that load pretrained weights (a random-init run, e.g. baseline_scratch,
    reads none). A run that recorded no digests (written before identities existed) cannot join recorded ones.
    """
    recorded = df["_inputs_recorded"].astype(bool)
    if recorded.any() and not recorded.all():
        raise ValueError(
            "runs without recorded input digests (written before content identities) cannot share a table with "
            f"recorded ones: {', '.join(df.loc[~recorded, 'run'])}; retrain them"
        )
    shared: dict[str, str | None] = {}
    if not recorded.any():
        return shared
    for key in INPUT_KEYS:
        col = f"{key}_digest"
        rows = df[df["weights_init"] == "pretrained"] if key == "weights" else df
        values = rows[col].dropna().unique() if key == "weights" else rows[col].unique()
        if len(values) > 1:
            groups = "; ".join(f"{str(v)[:12]}: {', '.join(rows.loc[rows[col] == v, 'run'])}" for v in values)
            raise ValueError(
                f"runs read different {key} (digests differ), refusing to tabulate them together: {groups}"
            )
        shared[key] = str(values[0]) if len(values) else None
    return shared


def load_overlays(ablations_dir: Path) -> dict[str, dict[str, Any]]:
    """The structural flags each overlay sets, for checking that a run directory's name matches its config."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(ablations_dir).glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        model = raw.get("model") if isinstance(raw, dict) else None
        if isinstance(model, dict):
            out[path.stem] = {k: v for k, v in model.items() if k in MODEL_FLAGS}
    return out


def collect_runs(
    runs_dir: str | Path, *, ablations_dir: str | Path | None = None, registry: Registry | None = None
) -> pd.DataFrame:
    """One row per finished run: variant, seed, run, task, preset, the structural flags, max_iters, n_iters,
    image_size, batch_size, params_{vit,adapter,head,total}, flops_backbone, s_per_iter, images_per_s,
    peak_memory_mb, wall_time_s, threads, device and every scalar final metric (same names as metrics.json).

    ``df.attrs`` holds ``metrics`` (metric columns), ``task`` and ``skipped`` (unfinished ``.partial`` dirs).
    Raises RunFormatError (naming the directory) for a malformed run and FileNotFoundError/ValueError when
    ``runs_dir`` is missing, holds no finished run, or mixes tasks. With ``ablations_dir``, each run's model flags
    must equal its overlay's (a mislabelled run would silently land in the wrong table row). Rows follow the
    registry's display order.
    """
    registry = registry or load_registry()
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory {root} does not exist")
    overlays = load_overlays(Path(ablations_dir)) if ablations_dir is not None else None
    records, skipped = [], []
    for variant_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for child in sorted(variant_dir.iterdir()):
            if not child.is_dir() or child.name.startswith("."):
                continue
            if "." in child.name:  # <seed>.partial (unfinished) or <seed>.replaced-<pid> (being overwritten)
                skipped.append(f"{variant_dir.name}/{child.name}")
                continue
            records.append(read_run(child, overlays=overlays))
    if not records:
        raise ValueError(f"no finished run directories ('<variant>/s<seed>/') in {root}")
    tasks = sorted({str(r["task"]) for r in records})
    if len(tasks) != 1:
        raise ValueError(f"runs in {root} mix tasks {tasks}; aggregate one task at a time")
    metric_names = sorted({m for r in records for m in r.pop("_metrics")})
    records.sort(key=lambda r: (registry.sort_key(r["variant"]), r["seed"]))
    df = pd.DataFrame.from_records(records)
    dup = df[df.duplicated(["variant", "seed"], keep=False)]
    if len(dup):
        raise ValueError(f"duplicate (variant, seed) runs in {root}: {sorted(dup['run'])}")
    inputs = check_shared_inputs(df)
    df = df.drop(columns=["_inputs_recorded"])
    df.attrs.update(metrics=metric_names, task=tasks[0], skipped=skipped, inputs=inputs)
    return df


def metrics_document(
    summary: pd.DataFrame, inputs: dict[str, str | None], reference: str | None = None
) -> dict[str, Any]:
    """``results/metrics.json`` (DVC metrics): per variant its mean, std and seed count of the primary metric and
    the paired Δ against the reference (default: the registry's) with its CI; plus the input digests the runs
    share."""
    reference = reference if reference is not None else load_registry().reference

    def num(x: Any) -> float | int | None:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return None
        return round(float(x), 4) if isinstance(x, float) else int(x)

    variants = {}
    for row in summary.to_dict("records"):
        variants[row["variant"]] = {
            "mean": num(row["mean"]),
            "std": num(row["std"]),
            "n": num(row["n"]),
            f"delta_vs_{reference}": num(row["delta"]),
            "delta_lo": num(row["delta_lo"]),
            "delta_hi": num(row["delta_hi"]),
        }
    metric = str(summary["metric"].iloc[0]) if len(summary) else None
    return {"metric": metric, "variants": variants, "inputs": dict(inputs)}


def default_metric(df: pd.DataFrame) -> str:
    task = df.attrs.get("task") or str(df["task"].iloc[0])
    return DEFAULT_METRIC.get(task, "mIoU")


def collect_stage_timings(runs_dir: Path, registry: Registry | None = None) -> pd.DataFrame:
    """``<runs>/<variant>/stage.json`` (written by the pipeline's train steps) as rows stage, wall_s, runs,
    runs_trained, in display order; empty when no stage recorded its time (runs trained by hand)."""
    registry = registry or load_registry()
    rows = []
    for path in sorted(Path(runs_dir).glob("*/stage.json"), key=lambda p: registry.sort_key(p.parent.name)):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            rows.append({k: rec[k] for k in ("stage", "wall_s", "runs", "runs_trained")})
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise RunFormatError(f"{path}: unreadable stage timing ({err})") from err
    return pd.DataFrame(rows, columns=["stage", "wall_s", "runs", "runs_trained"])


def run_aggregate(
    runs_dir: Path,
    out_dir: Path,
    *,
    metric: str | None = None,
    paper_path: Path | None = None,
    attention_json: Path | None = None,
    ablations_dir: Path | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    registry_path: Path | None = None,
) -> list[Path]:
    """runs.csv, summary.csv, metrics.json, headline/, the tables (+ tables.md), stage_timings.csv and
    attention_cost.csv (if the bench JSON exists)."""
    registry = load_registry(registry_path)
    df = collect_runs(runs_dir, ablations_dir=ablations_dir, registry=registry)
    metric = metric or default_metric(df)
    summary = summarise(df, metric, n_boot=n_boot, registry=registry)
    paper = tables.paper_by_variant(registry, paper_path)
    written = [write_csv(df, out_dir / "runs.csv"), write_csv(summary, out_dir / "summary.csv")]
    document = metrics_document(summary, df.attrs.get("inputs", {}), registry.reference)
    written.append(atomic_write_json(out_dir / "metrics.json", document))
    fr = findings_frame(df, paper, metric, n_boot, registry)
    headline = headline_document(df, fr, metric, registry)
    files = {
        f"{row}.json": json.dumps(v, indent=2, sort_keys=True, allow_nan=False) + "\n" for row, v in headline.items()
    }
    written.append(replace_dir(out_dir / HEADLINE, files))
    written += tables.write_tables(df, summary, paper, out_dir, metric, registry=registry)
    written.append(write_csv(collect_stage_timings(runs_dir, registry), out_dir / "stage_timings.csv"))
    attention_json = attention_json if attention_json is not None else out_dir / "attention_cost.json"
    if attention_json.is_file():
        written.append(tables.write_attention_cost(attention_json, out_dir / "attention_cost.csv"))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = analysis_parser("aggregate", __doc__)
    p.add_argument(
        "--runs", dest="runs_dir", type=Path, default=Path("results/runs"), help="directory of <variant>/s<seed>/ runs"
    )
    p.add_argument("--out", dest="out_dir", type=Path, default=Path("results"), help="where the CSV/Markdown tables go")
    p.add_argument("--metric", default=None, help="primary metric (default: mIoU for seg, bbox_mAP for det)")
    p.add_argument("--attention-json", type=Path, default=None, help="bench/attention_cost.py output (optional)")
    p.add_argument(
        "--ablations",
        dest="ablations_dir",
        type=Path,
        default=DEFAULT_ABLATIONS if DEFAULT_ABLATIONS.is_dir() else None,
        help="check each run's model flags against the overlay its name claims (default: the repo's ablations/)",
    )
    p.add_argument("--no-check", dest="ablations_dir", action="store_const", const=None, help="skip that check")
    p.add_argument("--n-boot", type=int, default=DEFAULT_N_BOOT, help="bootstrap resamples (n >= 10 pairs)")
    args = p.parse_args(argv)
    return run_step(lambda: run_aggregate(**vars(args)))


if __name__ == "__main__":
    sys.exit(main())
