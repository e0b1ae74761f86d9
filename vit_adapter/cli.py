"""`vit-adapter` command line: thin wrappers that parse, call the library and map errors to exit codes.

Exit codes: 0 success; 2 bad input or a fault the user can fix (config key, file, size, checksum, a diverged
loss, an OS error such as a full disk or a read-only --out, a run locked by another process), always as one line;
130 interrupted by SIGINT (143 SIGTERM); 1 anything unexpected (a bug: traceback). See docs/faults.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class UsageError(ValueError):
    """Bad command-line input; reported as one line with exit code 2."""


def _parse_flag(item: str) -> tuple[str, Any]:
    """`key=value` with the value read as the config files are (YAML 1.2 numbers: `1e-4` is a float)."""
    from .engine.config import parse_yaml

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set expects key=value, got {item!r}")
    return key.strip(), parse_yaml(raw, f"--set {key.strip()}")


# ---------------------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .models.factory import create_model, preset_kwargs

    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, value = _parse_flag(item)
        overrides[key.removeprefix("model.")] = value
    known = set(preset_kwargs(args.name, args.task)) | set(_adapter_flag_names())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"unknown model flag(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    with torch.device("meta"):  # counting parameters needs no memory
        backbone = create_model(args.name, task=args.task, **overrides)
        head_params = 0
        if args.head:
            from .models.heads import build_head_model

            n_cls = args.num_classes or (80 if args.task == "det" else 150)  # COCO / ADE20K (reference §3)
            full = build_head_model(args.task, args.head, backbone, num_classes=n_cls)
            head_params = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in backbone.parameters())
    parts = backbone.param_breakdown()
    info = {
        "name": args.name,
        "task": args.task,
        "head": args.head,
        "flags": {**preset_kwargs(args.name, args.task), **overrides},
        "params": {**parts, "head": head_params, "total": parts["vit"] + parts["adapter"] + head_params},
    }
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        p = info["params"]
        print(f"{args.name} ({args.task}{', ' + args.head if args.head else ''})")
        for key in ("vit", "adapter", "head", "total"):
            print(f"  {key:8s} {p[key] / 1e6:9.3f} M")
    return 0


def _adapter_flag_names() -> list[str]:
    import inspect

    from .models.adapter import ViTAdapter

    return [p for p in inspect.signature(ViTAdapter.__init__).parameters if p != "self"]


# ---------------------------------------------------------------------------------------------------------
def cmd_data(args: argparse.Namespace) -> int:
    from .data.synth import ensure_dataset
    from .engine.build import DEFAULT_ROOTS
    from .engine.config import config_from_args

    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    cfg = config_from_args(args)
    if cfg.data.dataset != "generated":
        raise UsageError(f"`data` generates the synthetic set; the profile's data.dataset is {cfg.data.dataset!r}")
    # Relative to the working directory, like data.root when training reads it (docs/faults.md).
    root = args.out or Path(cfg.data.root or DEFAULT_ROOTS["generated"]).expanduser()
    check_out_path(root, "--out" if args.out else "data.root")
    gen = dict(cfg.data.generator)
    manifest, reused = ensure_dataset(
        root,
        n_train=cfg.data.n_train or 0,
        n_val=cfg.data.n_val or 0,
        image_size=cfg.data.image_size,
        seed=args.data_seed,
        overwrite=args.overwrite,
        workers=args.workers,
        progress=not args.quiet,
        **gen,
    )
    n = len(manifest.get("files", {}))
    how = "reused (it already holds a dataset with these parameters; nothing generated)" if reused else "generated"
    print(f"dataset at {root}: {cfg.data.n_train} train + {cfg.data.n_val} val images, {n} files, {how}")
    return 0


def cmd_fetch_weights(args: argparse.Namespace) -> int:
    from .engine.weights import fetch_weights, weights_path_for

    out = args.out or weights_path_for(args.source, args.cache_dir)
    path = fetch_weights(args.source, out, args.sha256)
    print(path)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .engine.pretrain import run_pretrain_from_args

    result = run_pretrain_from_args(args)
    print(json.dumps({k: result[k] for k in ("top1", "steps", "seconds") if k in result}))
    return 0


def _train_config(args: argparse.Namespace):
    from .engine.config import config_from_args

    if args.seed is not None:
        args.sets = [*args.sets, f"train.seed={args.seed}"]
    return config_from_args(args)


def _missing_weights(cfg: Any) -> Path | None:
    """The configured weights file when weights.source names a local file that does not exist, else None."""
    from .engine.build import _abs
    from .engine.weights import source_kind

    src = cfg.weights.source
    if cfg.weights.init != "pretrained" or not src or source_kind(str(src)) != "file":
        return None
    path = _abs(src)
    return None if path.is_file() else path


def default_run_dir(args: argparse.Namespace, seed: int) -> Path:
    """`runs/<profile>/<variant>-s<seed>` under the working directory (mmdet's work_dirs habit): the profile's
    and overlays' file stems, `base` for the profile without an overlay."""
    profile = Path(str(args.config)).stem
    variant = "+".join(Path(str(o)).stem for o in args.overlays) or "base"
    return Path("runs") / profile / f"{variant}-s{seed}"


def cmd_train(args: argparse.Namespace) -> int:
    from .engine.trainer import train
    from .engine.weights import WeightsError

    cfg = _train_config(args)
    if args.out is None:
        args.out = default_run_dir(args, cfg.train.seed)
        check_out_path(args.out, "--out")
        print(f"vit-adapter train: no --out given; the run goes to {args.out}", file=sys.stderr)
    try:
        result = train(cfg, args.out, resume=not args.no_resume, overwrite=args.overwrite, progress=not args.quiet)
    except WeightsError as err:
        if (path := _missing_weights(cfg)) is None:
            raise
        raise UsageError(
            f"weights file not found: {path} (weights.source); `dvc repro weights` (or `make repro`) rebuilds the "
            f"default's pretrained ViT, `vit-adapter pretrain --out {path}` makes one with your settings, "
            "--set weights.init=scratch trains without it"
        ) from err
    print(json.dumps(result["final"], sort_keys=True))
    return 0


def _run_checkpoint(run_dir: Path) -> Path:
    """The checkpoint `checkpoints/latest` names, else the newest `checkpoints/iter_*.pt` of a run directory (a
    finished run keeps only its final one)."""
    from .engine.checkpoint import latest_checkpoint

    folder = run_dir / "checkpoints"
    found = latest_checkpoint(folder)
    if found is None:
        raise UsageError(
            f"{run_dir} holds no checkpoint ({folder}/iter_*.pt); the pipeline does not keep them: retrain it with "
            f"`vit-adapter train --config {run_dir / 'config.yaml'} --out <dir>`, or give --checkpoint"
        )
    return found


def _check_writable(out: Path) -> None:
    """Fail now, naming `out`, when the metrics file cannot be written (read-only, not a directory), rather
    than after the evaluation's minutes: a probe file is created and removed in its nearest existing folder."""
    import tempfile

    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a directory")
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise UsageError(f"cannot write --out {out}: {err.strerror or err}") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine.config import load_config
    from .engine.evaluation import evaluate_checkpoint
    from .engine.rundir import RunDir
    from .utils.io import atomic_write_json

    if args.seed is not None:
        args.sets = [*args.sets, f"train.seed={args.seed}"]
    if args.run_dir is not None:
        if args.config is not None:
            raise UsageError("give a run directory or --config, not both (the run's config.yaml is its config)")
        saved = args.run_dir / "config.yaml"
        if not saved.is_file():
            partial = RunDir(args.run_dir).work
            hint = f"; an unfinished run's work dir is {partial}" if (partial / "config.yaml").is_file() else ""
            raise UsageError(f"{args.run_dir} is not a run directory (no config.yaml){hint}")
        cfg = load_config(saved, args.overlays, args.sets)  # train.threads etc. as the run had them
        checkpoint = args.checkpoint or _run_checkpoint(args.run_dir)
    else:
        if args.checkpoint is None:
            raise UsageError("give a run directory (vit-adapter eval RUN_DIR) or --checkpoint with --config")
        cfg = load_config(args.config or "cpu_default", args.overlays, args.sets)
        checkpoint = args.checkpoint
    if args.out is not None and args.out.is_dir():  # found before the evaluation's minutes, not after
        raise UsageError(f"--out {args.out} is a directory; give the metrics JSON file to write")
    if args.out is not None:
        _check_writable(args.out)
    metrics = evaluate_checkpoint(cfg, checkpoint, progress=not args.quiet)
    # After the fact, so that a failure stays one line (docs/faults.md).
    print(f"vit-adapter eval: checkpoint {checkpoint}, {cfg.train.threads or 'default'} thread(s)", file=sys.stderr)
    if args.out:
        try:
            atomic_write_json(args.out, metrics)
        except OSError as err:  # e.g. the disk filled during the evaluation: name the user's path, not the temp
            raise UsageError(f"cannot write --out {args.out}: {err.strerror or err}") from None
    print(json.dumps(metrics, sort_keys=True))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep_from_args

    return run_sweep_from_args(args)


# ---------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="vit-adapter", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vit-adapter {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts of a preset with flag overrides")
    p.add_argument("name", help="preset, e.g. vit_adapter_s, vit_s, vit_adapter_cpu")
    p.add_argument("--task", choices=["det", "seg"], default="det")
    p.add_argument("--head", choices=["mask_rcnn", "upernet", "semfpn"], default=None)
    p.add_argument("--num-classes", type=int, default=None, help="head classes (default: 80 det, 150 seg)")
    p.add_argument("--set", action="append", metavar="FLAG=VALUE", help="model flag override (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    from .engine.config import add_config_args

    p = sub.add_parser("data", help="generate the synthetic dataset (COCO + ADE20K layouts) of a profile")
    add_config_args(p)
    p.add_argument("--out", type=Path, default=None, help="dataset root (default: the profile's data.root)")
    p.add_argument("--data-seed", type=int, default=0, help="scene generator seed (not the training seed)")
    p.add_argument("--workers", type=int, default=1, help="rendering processes (output bytes do not depend on it)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset generated with other parameters")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it shows only on a terminal anyway)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("fetch-weights", help="fetch ViT weights (timm name, URL + sha256, or local file)")
    p.add_argument("source", help="timm model name, http(s)/file URL, or a local .pth/.safetensors path")
    p.add_argument("--sha256", default=None, help="expected sha256 of the downloaded/local file")
    p.add_argument("--out", type=Path, default=None, help="output .safetensors (default: under --cache-dir)")
    p.add_argument("--cache-dir", type=Path, default=Path("weights"))
    p.set_defaults(func=cmd_fetch_weights)

    p = sub.add_parser("pretrain", help="pretrain the plain ViT offline on textured Fashion-MNIST")
    from .engine.pretrain import add_pretrain_args

    add_pretrain_args(p)
    p.set_defaults(func=cmd_pretrain)

    for name, func, helptext in (
        ("train", cmd_train, "train (and evaluate) one configuration into a run directory"),
        ("eval", cmd_eval, "evaluate a run directory's final checkpoint (or any checkpoint) on the validation split"),
    ):
        p = sub.add_parser(name, help=helptext)
        add_config_args(p)
        p.add_argument("--seed", type=int, default=None, help="shortcut for --set train.seed=N")
        if name == "train":
            p.add_argument(
                "--out",
                type=Path,
                default=None,
                help="run directory (work happens in <out>.partial); default runs/<profile>/<overlays or base>-s<seed>",
            )
            p.add_argument("--no-resume", action="store_true", help="discard <out>.partial instead of resuming")
            p.add_argument("--overwrite", action="store_true", help="replace a finished run directory")
            p.add_argument("--quiet", action="store_true", help="no progress bar (it shows only on a terminal anyway)")
        else:
            p.add_argument(
                "run_dir",
                nargs="?",
                type=Path,
                default=None,
                help="a run directory: its config.yaml (with its train.threads; --set overrides) and final checkpoint",
            )
            # Without RUN_DIR the profile defaults to cpu_default, as before.
            p.set_defaults(config=None)
            p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint (default: RUN_DIR's newest)")
            p.add_argument("--out", type=Path, default=None, help="write the metrics JSON here")
            p.add_argument("--quiet", action="store_true", help="no progress bar (it shows only on a terminal anyway)")
        p.set_defaults(func=func)

    from .sweep import add_sweep_args

    p = sub.add_parser("sweep", help="Optuna sweep over the injector's gamma init and the ConvFFN ratio")
    add_sweep_args(p)
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("plan", help="check and price what the DVC pipeline would run (data, weights, GPUs, GPU-hours)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("-S", action="append", metavar="KEY=VALUE", help="params.yaml override, as `dvc exp run -S`")
    p.add_argument("--smoke", type=Path, default=None, help="a `bench/gpu_smoke.py --out` record: its s/iter")
    p.set_defaults(func=cmd_plan)
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import plan

    text, ok = plan(args.params, args.S or [], smoke=args.smoke)
    print(text)
    if not ok:
        raise ValueError("a check above is BAD: fix it before starting any GPU")
    return 0


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:  # e.g. "No space left on device: results/x"
        msg: Any = f"{err.strerror or type(err).__name__}: {err.filename}"
    elif isinstance(err, KeyError) and err.args:
        msg = err.args[0]
    else:
        msg = err
    return " ".join(str(msg).split())  # chained or multi-line library messages stay on one line


def check_out_path(out: Path, flag: str, directory: bool = True) -> None:
    """Refuse, as one line, an output path that could only fail later and less clearly: one below a file, one
    that is not UTF-8 (logging and JSON cannot write it) and, for a ``directory`` (a run or dataset, built
    beside it and renamed), one that names no directory of its own (`.`)."""
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(
            f"{flag} {str(out)!r} is not valid UTF-8 (a byte of the name is not UTF-8); pick a UTF-8 name"
        ) from None
    if directory and out.name in ("", ".", ".."):
        raise UsageError(
            f"{flag} {str(out)!r} names no directory of its own (the work happens beside it, in <name>.partial "
            "or .<name>.tmp-*); give a new directory such as runs/x"
        )
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise UsageError(f"{flag} {out}: {parent} is a file, not a directory; pick a path below a directory")
            return


class Terminated(BaseException):
    """SIGTERM, raised where the process is (like KeyboardInterrupt for SIGINT), so that `finally` blocks remove
    temp directories and the CLI exits 143 with one line. A BaseException, so `except Exception` lets it pass."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


# Libraries the commands import, imported while a signal still ends the process at once (``_exit_at_once``):
# an import cut half-way by KeyboardInterrupt leaves a half-initialised module behind, and libraries that import
# optional parts under a broad ``except`` swallow the interrupt and go on broken ("cannot load module more than
# once", a missing numpy attribute, a recursion error in scikit-image's lazy loader: all seen under load).
STARTUP_IMPORTS = ("numpy", "torch", "PIL.Image", "skimage.data", "skimage.measure", "pycocotools.mask")


def _exit_at_once(signum: int, frame: Any) -> None:
    """SIGINT/SIGTERM while starting (importing, parsing): nothing is written yet, so leave at once."""
    import signal

    name = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
    os.write(2, f"vit-adapter: {name} while starting; nothing was written\n".encode())
    os._exit(128 + signum)


def _main(argv: Sequence[str] | None, in_main_thread: bool = False) -> int:
    import importlib
    import signal

    for name in STARTUP_IMPORTS:
        importlib.import_module(name)
    from .engine.hooks import StopTraining
    from .engine.rundir import RunDirError
    from .utils.locks import DirectoryInUseError

    parser = build_parser()
    args = parser.parse_args(argv)
    if in_main_thread:  # from here on a signal is an exception, so that `finally` blocks clean up
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if isinstance(getattr(args, "out", None), Path):  # eval, fetch-weights and pretrain write a file there
            check_out_path(args.out, "--out", directory=args.command in ("train", "data"))
        return int(args.func(args))
    except StopTraining as err:  # SIGINT/SIGTERM during training: the last checkpoint is kept
        print(f"vit-adapter {args.command}: {_one_line(err)}", file=sys.stderr)
        return 128 + (err.signum or signal.SIGINT)
    except KeyboardInterrupt:  # before the trainer's handlers are in place (or outside training)
        print(f"vit-adapter {args.command}: interrupted; rerun the same command", file=sys.stderr)
        return 130
    except Terminated:
        print(f"vit-adapter {args.command}: terminated (SIGTERM); rerun the same command", file=sys.stderr)
        return 143
    # Bad input and faults the user can fix (ValueError covers ConfigError, DataError, WeightsError,
    # CheckpointError and DivergedError; OSError a full disk, a read-only or non-directory --out): one line.
    except (ValueError, OSError, KeyError, RunDirError, DirectoryInUseError) as err:
        print(f"vit-adapter {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI. SIGINT and SIGTERM are handled from the first line on: while it imports (torch takes seconds) and
    parses, one ends the process at once with one line and 130 / 143 (nothing is written yet); from then on
    they are exceptions (KeyboardInterrupt, Terminated) that the command's cleanup sees."""
    import signal
    import threading

    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous = signal.signal(signal.SIGTERM, _exit_at_once)
        previous_int = signal.signal(signal.SIGINT, _exit_at_once)
    try:
        return _main(argv, in_main_thread)
    except KeyboardInterrupt:  # while parsing (in-process callers): nothing was written yet
        print("vit-adapter: interrupted while starting; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("vit-adapter: terminated (SIGTERM) while starting; nothing was written", file=sys.stderr)
        return 143
    finally:
        if in_main_thread:  # in-process callers (tests) get their handlers back; None: one not set from Python
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            signal.signal(signal.SIGINT, previous_int if previous_int is not None else signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
