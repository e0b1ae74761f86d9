"""`vit-adapter` command line: thin wrappers that parse, call the library and map errors to exit codes.

Exit codes: 0 success, 2 bad input (config key, file, size, checksum), 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import yaml


class UsageError(ValueError):
    """Bad command-line input; reported as one line with exit code 2."""


def _parse_flag(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UsageError(f"--set expects key=value, got {item!r}")
    return key.strip(), yaml.safe_load(raw)


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

            n_cls = args.num_classes or (80 if args.task == "det" else 150)  # COCO / ADE20K (facts §3)
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
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-adapter", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts of a preset with flag overrides")
    p.add_argument("name", help="preset, e.g. vit_adapter_s, vit_s, vit_adapter_cpu")
    p.add_argument("--task", choices=["det", "seg"], default="det")
    p.add_argument("--head", choices=["mask_rcnn", "upernet", "semfpn"], default=None)
    p.add_argument("--num-classes", type=int, default=None, help="head classes (default: 80 det, 150 seg)")
    p.add_argument("--set", action="append", metavar="FLAG=VALUE", help="model flag override (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, KeyError) as err:  # bad input: one line, exit 2
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"vit-adapter {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
