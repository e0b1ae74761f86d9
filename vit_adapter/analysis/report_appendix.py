"""The report's appendix: what the runs were (settings, hardware, statistics), the input digests, the
environment, the stage timings, the adapter-overhead bench and how to regenerate. Each section is a list of
Markdown lines computed from the run directories and result files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from .registry import Registry
from .report_inputs import distinct, flatten, ratio, read_json, sha256_file, show
from .stats import BOOTSTRAP_MIN_N, DEFAULT_N_BOOT
from .tables import fmt


def section_method(
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
    flat = {run: flatten(cfg) for run, cfg in configs.items()}
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
            value = f"{show(ref.get('data.n_train'))} / {show(ref.get('data.n_val'))}"
        elif key is None:
            value = f"{show(ref.get('optim.lr'))} / {show(ref.get('optim.weight_decay'))}"
        else:
            value = show(ref.get(key))
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
                by_value.setdefault(show(v), set()).add(variant)
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
    cpus = distinct([m.get("cpu_model") for m in metas.values()])
    gpus = distinct([m.get("cuda_device") for m in metas.values()])
    threads = distinct([int(t) for t in runs["threads"].dropna()])
    devices = distinct(list(runs["device"].dropna()))
    lines += [
        f"Hardware: CPU {', '.join(map(show, cpus)) or '–'}; GPU {', '.join(map(show, gpus)) or '–'}; "
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
        lines += ["Profile:", "", kv_table(profile_info), ""]
    return lines


def kv_table(d: dict[str, Any]) -> str:
    rows = [
        {"key": k, "value": show(v) if not isinstance(v, list | dict) else json.dumps(v)}
        for k, v in sorted(flatten(d).items())
    ]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def section_environment(metas: dict[str, Any], dvc_lock: Path | None) -> list[str]:
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
            {"package": k, "version(s) over all runs": ", ".join(map(show, v))} for k, v in sorted(versions.items())
        ]
        for key in ("python", "platform"):
            vals = distinct([m.get(key) for m in metas.values()])
            rows.append({"package": key, "version(s) over all runs": ", ".join(map(show, vals))})
        lines += [pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
        commits = distinct([(m.get("git") or {}).get("commit") for m in metas.values()])
        dirty = distinct([(m.get("git") or {}).get("dirty") for m in metas.values()])
        lines.append(
            f"Git commit(s) of the runs: {', '.join(show(c) for c in commits)}; uncommitted changes at run time: "
            f"{', '.join(show(d) for d in dirty)}."
        )
    if dvc_lock is not None and dvc_lock.is_file():
        lines.append(f"dvc.lock sha256 (as read when this report was generated): `{sha256_file(dvc_lock)}`.")
    else:
        lines.append("dvc.lock: not present.")
    return lines + [""]


def section_inputs(inputs: dict[str, Any]) -> list[str]:
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
    rows = [{"input": k, "digest": f"`{show(inputs.get(k))}`", "what": what[k]} for k in ("code", "data", "weights")]
    lines += [pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    if "sweep" in inputs:
        sw = inputs["sweep"]
        lines.append(
            f"The sweep's study read data `{show(sw.get('data'))}` and weights `{show(sw.get('weights'))}` "
            f"(code `{show(sw.get('code'))}`, which includes the sweep driver)."
        )
        lines.append("")
    return lines


def section_timings(
    results_dir: Path, pretrain_json: Path | None, sweep_dir: Path | None, extra: dict[str, Any] | None
) -> list[str]:
    """Wall time of each stage as recorded by the stage itself in its outputs (the last run that did work)."""
    rows: list[dict[str, Any]] = []
    if pretrain_json is not None and pretrain_json.is_file():
        meta = read_json(pretrain_json)
        # A two-phase pretraining (params.yaml pretrain.first) records its first phase in the sidecar of the file
        # it continued from (config.init_from, relative to the repo root where the stage runs).
        init = (meta.get("config") or {}).get("init_from")
        first = Path(f"{init}.json") if init else None
        if first is not None and first.is_file():
            first_meta = read_json(first)
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
        rows.append({"stage": "sweep", "group": "sweep", "wall_s": read_json(summary).get("wall_s")})
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


def section_overhead(overhead_json: Path | None) -> list[str]:
    lines = ["## Performance: adapter overhead over the ViT baseline (bench/overhead.py)", ""]
    if overhead_json is None or not overhead_json.is_file():
        return lines + ["_Not available: no `bench/overhead.py --json` output was given._", ""]
    data = read_json(overhead_json)
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
                "baseline / timm": fmt(ratio(*(float(v.get(k) or "nan") for k in ("baseline_ms", "timm_ms"))), 3),
            }
        )
    lines += [
        f"From `{overhead_json.name}` (backbone only, train mode, batch 2, forward+backward, median; adapter and its "
        "N=0 baseline timed interleaved in one process), measured on "
        f"{data.get('host', 'an unrecorded host')}. The official implementation gives 3.0× (T) and 2.1× (S) at "
        "256² on a 2-core host of the project's machine kind (docs/performance.md); ratios move with "
        "the CPU, because the ViT's matrix products gain more from a faster core than the adapter's memory-bound "
        "parts do (docs/performance.md). The project's speed targets are ≤ 2.3× (T) and ≤ 1.75× (S), with the "
        "baseline within 1.05× of a plain timm ViT + the same neck.",
        "",
    ]
    lines.append(pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) if rows else "_(empty)_")
    return lines + [""]


def section_regenerate() -> list[str]:
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


def section_pretrain_meta(pretrain_json: Path | None) -> list[str]:
    """The stand-in pretraining run's sidecar: settings, accuracy, duration and the digests of its files."""
    if pretrain_json is None or not pretrain_json.is_file():
        return []
    meta = read_json(pretrain_json)
    keys = ("preset", "objective", "image_size", "top1", "top1_split", "steps", "planned_steps", "epochs_seen",
            "time_limited", "seconds", "n_params_vit", "silhouettes", "init_sha256", "output_sha256")  # fmt: skip
    table = kv_table({k: meta.get(k) for k in keys if k in meta})
    return ["## Stand-in pretraining run", "", f"From `{pretrain_json.name}`:", "", table, ""]
