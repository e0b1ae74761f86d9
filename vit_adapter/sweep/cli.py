"""The command line: `vit-adapter sweep` (vit_adapter/cli.py adds these flags) and `python -m vit_adapter.sweep`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .driver import run_sweep
from .outputs import export_study, write_outputs
from .settings import _SETTING_TYPES, SweepError, SweepSettings, read_params_file, redact, settings_from_mapping


def add_sweep_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags override the `sweep:` section of --params, which overrides the defaults; --set adds to its sets."""
    a = parser.add_argument
    a("--params", type=Path, default=None, help="YAML file with a `sweep:` section (e.g. params.yaml)")
    a("--config", dest="profile", default=None, help="profile (default cpu_default)")
    a("--overlay", "--ablation", dest="overlays", action="append", default=None, help="overlay; repeatable")
    a("--set", dest="sets", action="append", default=None, metavar="SECTION.KEY=VALUE", help="repeatable")
    a("--metric", default=None, help="objective metric (default: mIoU for seg, bbox_mAP for det)")
    a("--seeds", default=None, help="comma-separated training seeds, e.g. 0,1,2")
    a("--max-iters", type=int, default=None, help="train.max_iters of sweep trials (schedule scaled to it)")
    a("--eval-interval", type=int, default=None, help="evaluations (pruning points) every N iterations")
    a("--n-trials", type=int, default=None, help="COMPLETE + PRUNED trials to reach (default 12)")
    a("--timeout-s", "--timeout", dest="timeout_s", type=float, default=None, help="wall-clock budget, seconds")
    a("--n-workers", type=int, default=None, help="worker processes on this machine (1 thread each)")
    a("--threads", type=int, default=None, help="torch threads per worker (default 1)")
    a("--storage", default=None, help="RDB URL (e.g. postgresql://...); default: a journal file in the study dir")
    a("--out-dir", default=None, help="sweeps directory (default results/sweeps)")
    a("--study-name", default=None, help="default: derived from the settings that define the objective")
    a("--sampler-seed", type=int, default=None)
    a("--pruner", choices=["median", "hyperband", "threshold", "none"], default=None)
    a("--prune-below", type=float, default=None, help="threshold pruner's lower bound")
    a("--no-references", dest="references", action="store_false", default=None, help="skip the reference points")
    a("--no-plots", dest="plots", action="store_false", default=None, help="skip the PNG plots")
    a("--heartbeat-s", type=int, default=None, help="RDB heartbeat interval, seconds (default 60)")
    a("--heartbeat-grace-s", type=int, default=None, help="RDB: a trial this long without heartbeat is retried")
    a("--report-only", action="store_true", help="only (re)write the outputs from the storage")
    a(
        "--export",
        action="store_true",
        help="copy the finished study from --storage into <out-dir>/<study>/journal.log and report from it",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> SweepSettings:
    data = read_params_file(args.params) if args.params else {}
    for key in _SETTING_TYPES:
        value = getattr(args, key, None)
        if value is None:
            continue
        if key == "seeds":
            try:
                value = [int(x) for x in str(value).split(",") if x.strip()]
            except ValueError as err:
                raise SweepError(f"--seeds {args.seeds!r}: expected comma-separated integers") from err
        if key == "sets":
            value = [*(data.get("sets") or []), *value]  # --set adds to the params file's sets
        data[key] = value
    return settings_from_mapping(data, str(args.params or "command line"))


def run_sweep_from_args(args: argparse.Namespace) -> int:
    """Exit code: 0 done or time budget spent, 130 interrupted (rerun to resume). Bad settings, and a study
    stopped by too many diverged trials (a setting to change: the same trials would diverge again), raise
    SweepError/ConfigError: one line, exit 2 in the CLI."""
    from ..engine.hooks import StopTraining

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = settings_from_args(args)
    report_only, export = getattr(args, "report_only", False), getattr(args, "export", False)
    if report_only and export:
        raise SweepError("--report-only and --export exclude each other (--export writes the outputs too)")
    try:
        if export:
            summary = export_study(settings)
        else:
            summary = write_outputs(settings) if report_only else run_sweep(settings)
    except (StopTraining, KeyboardInterrupt):
        print("sweep interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if summary["status"] == "too_many_failures":
        raise SweepError(_failure_advice(summary))
    best = summary["best"]
    print(
        json.dumps(
            {
                "study": summary["study_name"],
                "dir": summary["study_dir"],
                "status": summary["status"],
                "counts": {k: v for k, v in summary["counts"].items() if v},
                "best": None if best is None else {"value": best["value"], "params": best["params"]},
            },
            sort_keys=True,
        )
    )
    return 0


def _failure_advice(summary: dict[str, Any]) -> str:
    """The one line of a sweep stopped by diverged trials, with advice that applies to `sweep` (its --set)."""
    n, done = summary["counts"].get("fail", 0), summary["counts"].get("complete", 0) + summary["counts"]["pruned"]
    example = summary.get("failure_example") or "see trials.csv"
    return (
        f"{n} trial(s) diverged ({done} finished; e.g. {example}), so the sweep stopped: lower the learning rate "
        "or clip gradients for every trial with --set optim.lr=... or --set optim.clip_grad=1.0 (or the `sets` of "
        "params.yaml's sweep section; that starts a new study), or raise max_failed"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_sweep_args(
        argparse.ArgumentParser(
            prog="python -m vit_adapter.sweep", description=sys.modules[__package__].__doc__.splitlines()[0]
        )
    )
    args = parser.parse_args(argv)
    try:
        return run_sweep_from_args(args)
    except (ValueError, FileNotFoundError, KeyError) as err:  # SweepError, ConfigError, DataError, no such study
        print(f"sweep: error: {redact(' '.join(str(err).split()))}", file=sys.stderr)
        return 2
