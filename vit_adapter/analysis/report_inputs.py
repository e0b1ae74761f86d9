"""The report's inputs: result files, run directories and optional side files, read and cross-checked.

Small readers shared by the report's sections (``report_sections``, ``report_appendix``): JSON/YAML files, the
run directories' config.yaml/run.json, relative links, and ``shared_inputs``, which refuses to pair the runs with
a weights file or a sweep that read other inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_files(runs: pd.DataFrame, runs_dir: Path, name: str) -> dict[str, Any]:
    """run name → parsed config.yaml / run.json (missing files are skipped)."""
    out = {}
    for run in runs["run"]:
        path = runs_dir / run / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            out[run] = yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat |= flatten(v, key + ".")
        else:
            flat[key] = v
    return flat


def distinct(values: Sequence[Any]) -> list[Any]:
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def show(v: Any) -> str:
    """A config/metadata value as written (floats in shortest form, e.g. 0.0002)."""
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:g}"
    return "–" if v is None else str(v)


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
        file_sha = read_json(Path(pretrain_json)).get("output_sha256")
        if file_sha is not None and file_sha != out["weights"]:
            raise ValueError(
                f"the runs loaded weights {out['weights'][:12]} but {pretrain_json} describes {file_sha[:12]}: "
                "the runs are stale, rerun the pipeline"
            )
    summary = Path(sweep_dir) / "summary.json" if sweep_dir is not None else None
    if summary is not None and summary.is_file():
        sweep_inputs = read_json(summary).get("inputs")  # sweep.write_outputs records the study's digests
        if isinstance(sweep_inputs, dict):
            out["sweep"] = {k: sweep_inputs.get(k) for k in ("code", "data", "weights")}
            for key in ("data", "weights"):
                if out[key] is not None and sweep_inputs.get(key) not in (None, out[key]):
                    raise ValueError(
                        f"the sweep's study read other {key} ({str(sweep_inputs.get(key))[:12]}) than the runs "
                        f"({out[key][:12]}): rerun the sweep stage"
                    )
    return out


def load_mapping(path: Path | None, what: str) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))  # JSON is YAML too
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} is not a mapping")
    return data


def ratio(a: float, b: float) -> float:
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan
