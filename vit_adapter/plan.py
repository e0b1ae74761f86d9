"""`vit-adapter plan`: what the DVC pipeline would run for a params.yaml (with `-S key=value` overrides, as
`dvc exp run -S` takes them), checked and priced before any GPU starts.

It checks the data root's layout, the weights (source and output paths: paper weights never go to a committed
file), the visible GPUs against the launcher, and prints every (variant, seed) run with its GPU count, schedule
and a GPU-hours estimate, then the one complete `dvc exp run` command that runs exactly that matrix.

The estimate starts from one measurement: the paper's 0.36 s/iter of ViT-Adapter-S + Mask R-CNN 1x at 1333x800,
2 images per GPU (docs/reference.md, Table 7), or from a recorded `bench/gpu_smoke.py --out` file (the same
model and size measured on this machine's GPU). Other profiles scale it by images per GPU, pixels per image and
backbone width (embed_dim x depth); the dense-attention row by Table 7's 1.61 / 0.36. Evaluation time is not
included. It is an order-of-magnitude figure for deciding what to run, not a benchmark.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine.config import Config, parse_yaml
from .pipeline import launcher_gpus

PAPER_S_PER_ITER = 0.36  # docs/reference.md Table 7: Deformable, ViT-Adapter-S + Mask R-CNN 1x, 8 GPUs x 2
PAPER_DENSE_S_PER_ITER = 1.61  # the same table's Global (dense) attention row
PAPER_PIXELS = 1333 * 800
PAPER_IMAGES_PER_GPU = 2
S_WIDTH = 384 * 12  # ViT-S embed_dim x depth: the width the measurement was taken at
SMOKE_CHECK = "maskrcnn_s_1333x800"  # the bench/gpu_smoke.py row the estimate can start from


@dataclass
class PlannedRun:
    variant: str
    seed: int
    gpus: int
    iters: int
    s_per_iter: float

    @property
    def gpu_hours(self) -> float:
        return self.iters * self.s_per_iter * self.gpus / 3600


def apply_overrides(params: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """`key.sub=value` overrides (values read as YAML, like `dvc exp run -S`) on a copy of ``params``."""
    out = json.loads(json.dumps(params))
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"-S expects key=value, got {item!r}")
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"-S {key}: {p} is not a section of params.yaml")
        node[leaf] = parse_yaml(raw, f"-S {key}")
    return out


def load_smoke(path: Path) -> tuple[float, str]:
    """(s/iter, description) of the fp32 ViT-Adapter-S + Mask R-CNN row of a `gpu_smoke.py --out` file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the gpu_smoke record {path}: {err}") from None
    for row in doc.get("checks", []):
        if row.get("check") == SMOKE_CHECK and row.get("status") == "ok" and row.get("mode") == "fp32":
            return float(row["s_per_iter"]), f"gpu_smoke record {path} ({doc.get('device', '?')}, fp32)"
    raise ValueError(f"{path} holds no measured '{SMOKE_CHECK}' fp32 row (run bench/gpu_smoke.py --out on a GPU)")


def s_per_iter_estimate(cfg: Config, gpus: int, base: float = PAPER_S_PER_ITER) -> float:
    """Seconds per iteration of ``cfg`` on ``gpus`` GPUs, scaled from ``base`` (module docstring)."""
    from .models.factory import preset_kwargs

    kw = preset_kwargs(cfg.model.preset, cfg.model.task)
    width = (cfg.model.embed_dim or kw["embed_dim"]) * (cfg.model.depth or kw["depth"]) / S_WIDTH
    if cfg.model.task == "det":
        long, short = cfg.data.img_scale or (cfg.data.image_size, cfg.data.image_size)
        pixels = long * short
    else:
        pixels = cfg.data.image_size**2  # the training crop
    per_gpu = cfg.data.batch_size / gpus
    s = base * (per_gpu / PAPER_IMAGES_PER_GPU) * (pixels / PAPER_PIXELS) * width
    if cfg.model.attention == "dense":
        s *= PAPER_DENSE_S_PER_ITER / PAPER_S_PER_ITER
    return s


def paper_rows(params: dict[str, Any]) -> list[str]:
    """The variants a paper profile runs: params.yaml `paper.variants` plus the opted-in `paper.opt_in` rows."""
    p = params.get("paper") or {}
    return [*p.get("variants", []), *[v for v in p.get("opt_in", []) if v != "baseline_compute_matched"]]


def is_paper_profile(params: dict[str, Any]) -> bool:
    from .engine.config import load_config
    from .pipeline import profile_name

    return load_config(profile_name(params)).data.dataset != "generated"


def dvc_command(params: dict[str, Any]) -> str:
    """The `dvc exp run` line that runs the planned matrix, every value the safe route needs spelled out."""
    sets = {
        "profile": params["profile"],
        "data_root": params.get("data_root"),
        "pretrain.out": params["pretrain"]["out"],
        "pretrain.init_from": params["pretrain"].get("init_from"),
        "workers": params.get("workers"),
        "seeds": "[" + ",".join(str(s) for s in params.get("seeds", [0])) + "]",
        "variants": "[" + ",".join(params.get("variants", [])) + "]",
        "paper.opt_in": "[" + ",".join((params.get("paper") or {}).get("opt_in", [])) + "]",
    }
    if params.get("launcher"):
        sets["launcher"] = params["launcher"]
    if params.get("sets"):
        sets["sets"] = json.dumps(list(params["sets"]))
    parts = ["dvc exp run"] + [f"-S {shlex.quote(f'{k}={v}')}" for k, v in sets.items() if v is not None]
    return " \\\n    ".join(parts)


def resolve(params: dict[str, Any]) -> dict[str, Any]:
    """The params a run of the pipeline would use: for a paper profile the `paper` section's rows, seeds, one
    worker and weights under its own folder; one worker whenever the launcher spans several GPUs."""
    out = json.loads(json.dumps(params))
    if is_paper_profile(out):
        paper = out.get("paper") or {}
        out["variants"] = paper_rows(out)
        out["seeds"] = list(paper.get("seeds", [0]))
        out["workers"] = 1  # one run at a time: every run uses all the GPUs the launcher gives it
        wdir = paper.get("weights_dir", "weights/paper")
        pre = out["pretrain"]
        if not str(pre["out"]).startswith(wdir.rstrip("/") + "/"):
            pre["out"] = f"{wdir}/{Path(str(_source(out))).stem.split('-')[0]}.safetensors"
        if pre.get("init_from") and not str(pre["init_from"]).startswith(wdir.rstrip("/") + "/"):
            pre["init_from"] = f"{Path(pre['out']).with_suffix('')}_init.safetensors"
    if launcher_gpus(out.get("launcher")) > 1:
        out["workers"] = 1  # two runs of one launcher would start two torchrun jobs on the same GPUs
    return out


def _source(params: dict[str, Any]) -> str:
    from .engine.config import load_config
    from .pipeline import profile_name

    return str(load_config(profile_name(params), [], params.get("sets") or []).weights.source)


def checks(params: dict[str, Any], repo: Path, visible_gpus: int) -> list[tuple[str, bool, str]]:
    """(what, ok, detail) for the data root, the weights and the GPUs."""
    from .engine.config import load_config
    from .pipeline import DATASET_LAYOUT, profile_name, weights_target_error

    cfg = load_config(profile_name(params), [], params.get("sets") or [])
    rows: list[tuple[str, bool, str]] = []
    root = repo / str(params.get("data_root", "data/generated"))
    if cfg.data.dataset == "generated":
        rows.append(("data", True, f"generated by the data step into {root}"))
    else:
        need = DATASET_LAYOUT[cfg.data.dataset]
        missing = [rel for rel in need if not (root / rel).exists()]
        detail = f"{cfg.data.dataset} at {root}" + (f" lacks {', '.join(missing)}" if missing else ": complete")
        rows.append(("data", not missing, detail))
    bad = weights_target_error(params, repo)
    rows.append(("weights path", bad is None, bad or f"written to {params['pretrain']['out']} (own path)"))
    src = str(cfg.weights.source or "")
    if cfg.weights.init != "pretrained":
        rows.append(("weights source", True, "none (random init)"))
    elif "://" in src:
        rows.append(("weights source", True, f"{src} (downloaded and verified by the weights step; needs network)"))
    else:
        rows.append(("weights source", (repo / src).is_file() or Path(src).is_file(), src))
    want = launcher_gpus(params.get("launcher"))
    if cfg.data.dataset == "generated" and not params.get("launcher"):
        rows.append(("GPUs", True, f"none needed ({visible_gpus} visible)"))
    else:
        rows.append(("GPUs", visible_gpus >= want, f"{visible_gpus} visible, {want} per run"))
    return rows


def plan_runs(params: dict[str, Any], base: float = PAPER_S_PER_ITER) -> list[PlannedRun]:
    from .pipeline import variant_config

    gpus = launcher_gpus(params.get("launcher"))
    runs = []
    for variant in params.get("variants", []):
        for seed in params.get("seeds", [0]):
            cfg = variant_config(params, variant, int(seed))
            runs.append(PlannedRun(variant, int(seed), gpus, cfg.train.max_iters, s_per_iter_estimate(cfg, gpus, base)))
    if "baseline_compute_matched" in (params.get("paper") or {}).get("opt_in", []) or not is_paper_profile(params):
        for seed in params.get("seeds", [0]):
            # Trained for the full model's wall-clock time: its GPU-hours are the full row's.
            full = variant_config(params, "full", int(seed))
            s_full = s_per_iter_estimate(full, gpus, base)
            runs.append(PlannedRun("baseline_compute_matched", int(seed), gpus, full.train.max_iters, s_full))
    return runs


def format_plan(params: dict[str, Any], runs: list[PlannedRun], rows: list[tuple[str, bool, str]], source: str) -> str:
    from .pipeline import profile_name

    lines = [f"profile {profile_name(params)}: {len(runs)} run(s), {params.get('workers', 1)} at a time"]
    lines += [f"  check {what:14s} {'ok ' if ok else 'BAD'} {detail}" for what, ok, detail in rows]
    lines.append(f"  {'variant':26s} {'seed':>4s} {'GPUs':>4s} {'iters':>8s} {'s/iter':>7s} {'GPU-h':>8s}")
    for r in runs:
        lines.append(f"  {r.variant:26s} {r.seed:4d} {r.gpus:4d} {r.iters:8d} {r.s_per_iter:7.3f} {r.gpu_hours:8.1f}")
    total = sum(r.gpu_hours for r in runs)
    gpus = max((r.gpus for r in runs), default=1)
    wall = total / gpus / max(1, int(params.get("workers", 1)))
    seeds = max(1, len(params.get("seeds", [0])))
    lines.append(
        f"  total {total:.1f} GPU-hours (training only, evaluation not included), about {wall:.1f} h wall clock on "
        f"{gpus} GPU(s), {wall / seeds:.1f} h per seed; s/iter from {source}"
    )
    lines.append("command:")
    lines.append(dvc_command(params))
    return "\n".join(lines)


def plan(
    params_file: Path, sets: Sequence[str], *, smoke: Path | None = None, visible_gpus: int | None = None
) -> tuple[str, bool]:
    """(the printed plan, whether every check passed)."""
    import torch

    from .pipeline import load_params
    from .utils.paths import project_root

    params = resolve(apply_overrides(load_params(params_file), sets))
    base, source = (PAPER_S_PER_ITER, "the paper's 0.36 s/iter (Table 7)") if smoke is None else load_smoke(smoke)
    gpus = torch.cuda.device_count() if visible_gpus is None else visible_gpus
    rows = checks(params, project_root(), gpus)
    runs = plan_runs(params, base)
    return format_plan(params, runs, rows, source), all(ok for _, ok, _ in rows)
