"""The steps that `dvc.yaml` runs, driven by `params.yaml`: data → weights → train+eval per {variant, seed} →
compute-matched baseline. Aggregation, plots and the report live in `vit_adapter.analysis`.

Each step is idempotent: a finished run directory whose *identity* is unchanged is kept, an interrupted one
(``<run>.partial``) resumes from its checkpoint when its identity matches, anything else is retrained. The
identity (``vit_adapter.engine.identity``) hashes the resolved config and the content of what the run reads: the
weights file's bytes, the dataset's bytes and the training code. So re-pretrained weights at the same path, other
data or changed code retrain every dependent run, and `dvc repro` after a kill -9 continues where it stopped (the
training stages declare their outputs ``persist: true``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from .engine.config import Config, load_config, save_config
from .engine.identity import code_digest, identity_of, run_identity
from .engine.rundir import reuse_or_reset
from .utils.io import atomic_path, atomic_write_json, sha256_file
from .utils.paths import project_root

REPO = project_root()
# `profile: paper` means the paper's ablation setting: ViT-Adapter-S, Mask R-CNN 1x on COCO (reference §3).
PROFILE_ALIASES = {"paper": "coco_maskrcnn_1x_s"}


def load_params(path: Path = REPO / "params.yaml") -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def profile_name(params: dict[str, Any]) -> str:
    name = str(params.get("profile", "cpu_default"))
    return PROFILE_ALIASES.get(name, name)


def base_sets(params: dict[str, Any]) -> list[str]:
    """Overrides every run gets: the profile's extra sets, the data and weights the earlier stages wrote, and
    per-worker threads. `weights.init` stays the profile's or the overlay's (baseline_scratch sets 'scratch')."""
    sets = list(params.get("sets") or [])
    # Every profile reads the dataset at `data_root` and the weights file the `weights` stage wrote (pretrained
    # offline for the embedded default, the official DeiT weights converted for the paper profiles).
    sets.append(f"data.root={params.get('data_root', 'data/generated')}")
    sets.append(f"weights.source={params['pretrain']['out']}")
    sets.append(f"train.threads={params.get('threads_per_worker', 1)}")
    return sets


def variant_config(params: dict[str, Any], variant: str, seed: int, extra: Sequence[str] = ()) -> Config:
    overlay = REPO / "ablations" / f"{variant}.yaml"
    if not overlay.is_file():
        raise FileNotFoundError(f"unknown variant {variant!r}: no {overlay.relative_to(REPO)}")
    return load_config(profile_name(params), [overlay], [*base_sets(params), f"train.seed={seed}", *extra])


# ---------------------------------------------------------------------------------------------------------
# What a real dataset root must hold (checked by the `data` step so that `dvc repro` stops with one line).
DATASET_LAYOUT = {
    "coco": ("annotations/instances_train2017.json", "annotations/instances_val2017.json", "train2017", "val2017"),
    "ade20k": (
        "ADEChallengeData2016/images/training",
        "ADEChallengeData2016/images/validation",
        "ADEChallengeData2016/annotations/training",
        "ADEChallengeData2016/annotations/validation",
    ),
}


def step_data(params: dict[str, Any]) -> int:
    cfg = load_config(profile_name(params), [], params.get("sets") or [])
    root = REPO / params.get("data_root", "data/generated")
    if cfg.data.dataset != "generated":
        need = DATASET_LAYOUT[cfg.data.dataset]
        missing = [rel for rel in need if not (root / rel).exists()]
        if missing:
            raise FileNotFoundError(
                f"profile {profile_name(params)} reads {cfg.data.dataset} from {root} (params.yaml data_root), "
                f"which lacks {', '.join(missing)}: point data_root at a folder holding {', '.join(need)} "
                "(docs/paper_profile.md)"
            )
        print(f"{cfg.data.dataset} found at {root}")
        return 0
    from .data import generate_dataset

    generate_dataset(
        root,
        n_train=cfg.data.n_train or 0,
        n_val=cfg.data.n_val or 0,
        image_size=cfg.data.image_size,
        seed=int(params.get("data_seed", 0)),
        overwrite=True,
        **dict(cfg.data.generator),
    )
    print(f"generated {cfg.data.n_train} + {cfg.data.n_val} images at {root}")
    return 0


def step_weights(params: dict[str, Any]) -> int:
    """Offline default: pretrain the plain ViT. The paper profiles convert the official DeiT weights instead
    (``weights.source`` of the profile, or a local file given through params.yaml ``sets``) into ``pretrain.out``,
    so that every profile's runs read one local file whose bytes their identity records."""
    cfg = load_config(profile_name(params), [], params.get("sets") or [])
    p = dict(params["pretrain"])
    out = REPO / p.pop("out")
    if cfg.data.dataset != "generated":
        from .engine.weights import fetch_weights

        if cfg.weights.init != "pretrained" or not cfg.weights.source:
            raise ValueError(f"profile {profile_name(params)} sets no weights.source to convert into {out}")
        bad = weights_target_error(params, REPO)
        if bad:  # checked before anything is fetched or copied: the committed CPU weights stay as they are
            raise ValueError(bad)
        print(f"weights: {fetch_weights(cfg.weights.source, out, cfg.weights.sha256)}")
        if p.get("init_from"):
            # The stage also declares the offline recipe's first-phase file; for a converted checkpoint the ViT
            # "starts from" that checkpoint itself, so the same bytes (and sidecar) stand there.
            from .engine.weights import sidecar_path

            init = REPO / p["init_from"]
            for src, dst in ((out, init), (sidecar_path(out), sidecar_path(init))):
                with atomic_path(dst) as tmp:
                    shutil.copyfile(src, tmp)
        return 0
    first = p.pop("first", None)
    if first is not None:
        # Two phases (docs/pretraining.md §7): the `first` settings pretrain the ViT that `init_from` names, and
        # the main settings continue from it. Both files are outputs of this stage.
        if not p.get("init_from"):
            raise ValueError("params.yaml pretrain.first needs pretrain.init_from: the file the first phase writes")
        init = REPO / p["init_from"]
        head = _pretrain_or_reuse(init, {"preset": p.get("preset", "vit_cpu"), **first})
        print(json.dumps({"first_phase": {k: head.get(k) for k in ("objective", "top1", "steps", "seconds")}}))
        p["init_from"] = os.path.relpath(init)  # relative (to the repo root, where DVC runs): the sidecar is committed
    result = _pretrain_or_reuse(out, p)
    print(json.dumps({k: result.get(k) for k in ("top1", "steps", "seconds")}))
    return 0


def pretraining_identity(settings: dict[str, Any]) -> str:
    """What determines a pretraining output: its settings, the code's meaning (scope "run": pretraining shares
    the models, data and engine with training) and the bytes of the ViT it starts from."""
    init = settings.get("init_from")
    inputs = {"code": code_digest("run"), "init_from": sha256_file(REPO / init) if init else None}
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return identity_of(hashlib.sha256(blob.encode("utf-8")).hexdigest(), inputs)


def _pretrain_or_reuse(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Pretrain into `out`, or keep it when its sidecar records the same identity and its bytes still match:
    a stage that DVC reruns after an edit that changes nothing pretraining computes returns in seconds."""
    from .engine.pretrain import pretrain
    from .engine.weights import sidecar_path

    identity = pretraining_identity(settings)
    side = sidecar_path(out)
    try:
        recorded = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if (
        isinstance(recorded, dict)
        and recorded.get("identity") == identity
        and out.is_file()
        and recorded.get("output_sha256") == sha256_file(out)
    ):
        print(f"reused {os.path.relpath(out, REPO)}: same settings, code and inputs")
        return recorded
    result = {**pretrain(out=out, **settings), "identity": identity}
    atomic_write_json(side, result)
    return result


def weights_target_error(params: dict[str, Any], repo: Path) -> str | None:
    """Why the weights step of a paper profile must not write where params.yaml says, or None. Converted paper
    weights go under params.yaml `paper.weights_dir` only, so they can never replace the committed CPU weights
    (`pretrain.out` / `pretrain.init_from` of the embedded default)."""
    if load_config(profile_name(params), [], params.get("sets") or []).data.dataset == "generated":
        return None
    wdir = (repo / str((params.get("paper") or {}).get("weights_dir", "weights/paper"))).resolve()
    pre = params["pretrain"]
    for key in ("out", "init_from"):
        if not pre.get(key):
            continue
        target = (repo / str(pre[key])).resolve()
        # A path outside the checkout is the user's own location; inside it, only the paper folder is safe.
        if repo.resolve() in target.parents and wdir not in target.parents:
            return (
                f"params.yaml pretrain.{key} = {pre[key]} is outside {wdir.relative_to(repo.resolve())}/: the paper "
                f"weights would replace another file; pass -S pretrain.{key}={wdir.relative_to(repo.resolve())}/"
                f"{Path(str(pre[key])).name} (`vit-adapter plan` prints the whole command)"
            )
    return None


def _run_one(cfg: Config, out: Path, launcher: str | None = None) -> tuple[str, int, bool]:
    """Train one (variant, seed) in its own process (1 thread each: two 1-thread processes beat one 2-thread
    process on this machine, docs/performance.md), or through `launcher` (params.yaml, e.g. ``torchrun
    --standalone --nproc_per_node 8``: one run on 8 GPUs). Returns (name, exit code, whether it trained)."""
    identity, _ = run_identity(cfg)
    state = reuse_or_reset(out, identity)  # stale: another config or other input bytes
    if state == "finished":
        return out.name, 0, False  # finished from the same config, code, data and weights
    resume = state == "partial"
    cfg_file = out.with_name(out.name + ".config.yaml")
    save_config(cfg, cfg_file)
    python = shlex.split(launcher) if launcher else [sys.executable]
    cmd = [*python, "-m", "vit_adapter.pipeline", "run-one", "--config", str(cfg_file), "--out", str(out)]
    if not resume:
        cmd.append("--no-resume")
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.train.threads or 1)}
    with open(out.with_name(out.name + ".stdout.log"), "w", encoding="utf-8") as log:
        code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if code == 0:
        cfg_file.unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # results stay small; weights are not results
    return out.name, code, True


def run_one(config_file: Path, out: Path, *, resume: bool) -> int:
    """The training process of one run (what `_run_one` starts): the trainer on a resolved config file."""
    from .engine.trainer import train

    cfg = load_config(None, [config_file])
    train(cfg, out, resume=resume, progress=False)
    return 0


def launcher_gpus(launcher: str | None) -> int:
    """Processes per run the launcher starts (torchrun's --nproc_per_node / --nproc-per-node); 1 without one."""
    if not launcher:
        return 1
    words = shlex.split(launcher)
    for k, w in enumerate(words):
        for flag in ("--nproc_per_node", "--nproc-per-node"):
            if w == flag and k + 1 < len(words):
                return int(words[k + 1])
            if w.startswith(flag + "="):
                return int(w.split("=", 1)[1])
    return 1


def train_runs(params: dict[str, Any], jobs: list[tuple[Config, Path]], root: Path, stage: str) -> int:
    """Train the jobs in a pool of `workers` processes; `<root>/stage.json` records the stage's wall time (the
    report's timing table: what one `dvc repro` of this stage cost, cached runs included)."""
    workers = max(1, int(params.get("workers", 2)))
    if workers > 1 and launcher_gpus(params.get("launcher")) > 1:
        # Two runs in parallel would start two multi-GPU launches on the same devices.
        print(f"{stage}: launcher spans {launcher_gpus(params.get('launcher'))} GPUs: workers forced to 1")
        workers = 1
    root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: _run_one(*job, launcher=params.get("launcher")), jobs))
    failed = [name for name, code, _ in results if code != 0]
    if failed:
        print(f"error: training failed for {', '.join(failed)} (see <run>.stdout.log)", file=sys.stderr)
        return 1
    trained = sum(1 for _, code, fresh in results if fresh)
    if trained == 0 and (root / "stage.json").is_file():
        return 0  # nothing retrained: keep the time of the run that produced these results
    atomic_write_json(
        root / "stage.json",
        {
            "stage": stage,
            "wall_s": round(time.time() - start, 1),
            "runs": len(jobs),
            "runs_trained": trained,
            "workers": workers,
        },  # fmt: skip
    )
    return 0


def step_train(params: dict[str, Any], variant: str) -> int:
    root = REPO / "results" / "runs" / variant
    jobs = [(variant_config(params, variant, s), root / f"s{s}") for s in params.get("seeds", [0])]
    code = train_runs(params, jobs, root, f"train@{variant}")
    _drop_stale(root, {out.name for _, out in jobs})
    return code


# The compute-matched baseline's cost ratio (full model's seconds per iteration over the baseline's), per profile:
# a committed measurement, so the stage's schedule never depends on the load of the machine that runs it.
COST_RATIO_FILE = REPO / "experiments" / "compute_matched.json"


def cost_ratio(params: dict[str, Any], runs: Path, ratio_file: Path = COST_RATIO_FILE) -> dict[str, Any]:
    """{"ratio", "source"}: the profile's recorded ratio from `ratio_file`; for a profile with none, the
    deterministic FLOPs ratio of the full and baseline runs' backbones (their costs.json), said in `source`."""
    profile = profile_name(params)
    recorded = json.loads(ratio_file.read_text(encoding="utf-8")) if ratio_file.is_file() else {}
    entry = recorded.get("profiles", {}).get(profile)
    if entry is not None:
        return {"ratio": float(entry["full_over_baseline"]), "source": f"{ratio_file.name}: {entry['measured']}"}
    seed = params.get("seeds", [0])[0]
    full, base = _costs(runs / "full" / f"s{seed}"), _costs(runs / "baseline" / f"s{seed}")
    ratio = full["flops_backbone_forward"] / base["flops_backbone_forward"]
    print(f"compute-matched: no measured cost ratio for profile {profile} in {ratio_file}; using the FLOPs ratio")
    return {"ratio": ratio, "source": "FLOPs ratio of the backbones' forward passes (costs.json)"}


def compute_matched_jobs(params: dict[str, Any], runs: Path, ratio: float) -> list[tuple[Config, Path]]:
    """The baseline's jobs with its schedule stretched by `ratio` (iterations, evaluations, warmup, milestones)."""
    jobs = []
    for s in params.get("seeds", [0]):
        cfg = variant_config(params, "baseline_compute_matched", s)
        iters = max(1, round(cfg.train.max_iters * ratio))
        k = iters / cfg.train.max_iters
        extra = [
            f"train.max_iters={iters}",
            f"train.eval_interval={max(1, round(cfg.train.eval_interval * k))}",
            f"train.checkpoint_interval={max(1, round(cfg.train.checkpoint_interval * k))}",
            f"optim.warmup_iters={round(cfg.optim.warmup_iters * k)}",
            f"optim.milestones={[round(m * k) for m in cfg.optim.milestones]}",
        ]
        jobs.append(
            (variant_config(params, "baseline_compute_matched", s, extra), runs / "baseline_compute_matched" / f"s{s}")
        )
    return jobs


def step_compute_matched(params: dict[str, Any]) -> int:
    """The ViT baseline trained for the full model's wall-clock time (same seeds): iterations scaled by the
    recorded cost ratio (cost_ratio), schedule stretched with it. The ratio is part of every run's config (its
    max_iters), hence of its identity, and is written to schedule.json with where it came from."""
    runs = REPO / "results" / "runs"
    opt_in = (params.get("paper") or {}).get("opt_in") or []
    if load_config(profile_name(params)).data.dataset != "generated" and "baseline_compute_matched" not in opt_in:
        # Opt-in at paper scale: one more full-length multi-GPU run (params.yaml paper.opt_in).
        (runs / "baseline_compute_matched").mkdir(parents=True, exist_ok=True)
        print("compute-matched: skipped (not in params.yaml paper.opt_in)")
        return 0
    recorded = cost_ratio(params, runs)
    root = runs / "baseline_compute_matched"
    jobs = compute_matched_jobs(params, runs, recorded["ratio"])
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        root / "schedule.json", {"time_ratio_full_over_baseline": recorded["ratio"], "source": recorded["source"]}
    )
    code = train_runs(params, jobs, root, "compute_matched")
    _drop_stale(root, {out.name for _, out in jobs})
    return code


def measure_cost_ratio(params: dict[str, Any], ratio_file: Path = COST_RATIO_FILE) -> int:
    """Record the profile's ratio from the trained full and baseline runs (mean seconds per iteration over the
    seeds) into `ratio_file`, to be committed: a deliberate measurement, never one taken inside the stage."""
    runs = REPO / "results" / "runs"
    seeds = params.get("seeds", [0])
    full = sum(_costs(runs / "full" / f"s{s}")["train_s_per_iter"] for s in seeds)
    base = sum(_costs(runs / "baseline" / f"s{s}")["train_s_per_iter"] for s in seeds)
    doc = json.loads(ratio_file.read_text(encoding="utf-8")) if ratio_file.is_file() else {}
    where = f"train_s_per_iter of results/runs/{{full,baseline}}/s{{{','.join(map(str, seeds))}}}"
    doc.setdefault("profiles", {})[profile_name(params)] = {"full_over_baseline": full / base, "measured": where}
    atomic_write_json(ratio_file, doc)
    print(f"{profile_name(params)}: full/baseline = {full / base:.4f} -> {ratio_file}")
    return 0


def _costs(run: Path) -> dict[str, Any]:
    path = run / "costs.json"
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: train the 'full' and 'baseline' variants first")
    return json.loads(path.read_text(encoding="utf-8"))


def _drop_stale(root: Path, keep: set[str]) -> None:
    """Seeds no longer in params.yaml leave the table (their run directories are removed)."""
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("s") and p.name.split(".")[0] not in keep:
            shutil.rmtree(p)


# ---------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vit_adapter.pipeline", description=__doc__.splitlines()[0])
    steps = ["data", "weights", "train", "compute-matched", "measure-cost-ratio", "run-one"]
    parser.add_argument("step", choices=steps)
    parser.add_argument("--variant", help="ablation overlay name (train step)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--config", type=Path, help="resolved config file (run-one: the process of one run)")
    parser.add_argument("--out", type=Path, help="run directory (run-one)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="run-one: start fresh")
    args = parser.parse_args(argv)
    try:
        if args.step == "run-one":
            if args.config is None or args.out is None:
                raise ValueError("run-one needs --config and --out")
            return run_one(args.config, args.out, resume=args.resume)
        params = load_params(args.params)
        if args.step == "data":
            return step_data(params)
        if args.step == "weights":
            return step_weights(params)
        if args.step == "train":
            if not args.variant:
                raise ValueError("the train step needs --variant")
            return step_train(params, args.variant)
        if args.step == "measure-cost-ratio":
            return measure_cost_ratio(params)
        return step_compute_matched(params)
    except (ValueError, FileNotFoundError) as err:
        print(f"pipeline {args.step}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
