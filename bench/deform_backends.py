"""Benchmark: the deformable-attention core's backends (Triton, pure PyTorch, mmcv, grid_sample reference) on CUDA.

Forward and forward+backward time (value, sampling_locations and attention_weights all require grad), peak GPU
memory above the inputs, and each backend's accuracy by the project's same-function rule (its error against a
float64 evaluation of the reference <= max(1e-5 relative, 1.5 x the fp32 reference's own error), per output and
gradient), at the ViT-Adapter-S shapes of the paper's two settings (reference §1.3, §1.7; 6 heads x 64 channels,
4 points, batch 2 per GPU; inputs padded to a multiple of 32, level shapes h/8, h/16, h/32 of the padded size):
- COCO 1333x800 (padded 1344x800): injector, 3 levels (100x168, 50x84, 25x42), 50*84 = 4200 queries;
  extractor, 1 level (50x84), 100*168 + 50*84 + 25*42 = 22050 queries.
- ADE20K 512x512: injector, 3 levels (64x64, 32x32, 16x16), 1024 queries; extractor, 1 level (32x32),
  4096 + 1024 + 256 = 5376 queries.
mmcv is timed only where its op imports. One JSON line per (shape, backend) measurement.

    python bench/deform_backends.py [--repeats 10] [--warmup 3] [--shapes coco_injector,ade_extractor]
    python bench/deform_backends.py --smoke     # tiny shapes on CPU through Triton's interpreter (a test runs it)

Without CUDA (and without --smoke) it prints one line saying so and exits 0. From another script:
``time_backends(torch.device("cuda"))`` returns the rows as dicts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vit_adapter.models import ops  # noqa: E402

HEADS, HEAD_DIM, POINTS, BATCH = 6, 64, 4, 2  # ViT-Adapter-S (deform_num_heads 6, ratio 1.0), 2 images per GPU
PAPER_SHAPES: dict[str, dict[str, Any]] = {
    "coco_injector": {"levels": [(100, 168), (50, 84), (25, 42)], "queries": 50 * 84},
    "coco_extractor": {"levels": [(50, 84)], "queries": 100 * 168 + 50 * 84 + 25 * 42},
    "ade_injector": {"levels": [(64, 64), (32, 32), (16, 16)], "queries": 32 * 32},
    "ade_extractor": {"levels": [(32, 32)], "queries": 64 * 64 + 32 * 32 + 16 * 16},
}
# Interpreter-sized: odd level sizes, a masked channel tile (head_dim 6 of 8); the interpreter runs each program in
# Python, so one launch per pass.
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    "smoke_injector": {"levels": [(5, 7), (3, 4), (1, 3)], "queries": 6, "batch": 1, "heads": 1, "head_dim": 6},
}
NAMES = ("output", "grad_value", "grad_locations", "grad_attention")


def make_inputs(spec: dict[str, Any], device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """fp32 (value, locations, attention, grad_out); locations over [-0.1, 1.1], so some points cross the border."""
    gen = torch.Generator().manual_seed(seed)
    batch, heads, head_dim = spec.get("batch", BATCH), spec.get("heads", HEADS), spec.get("head_dim", HEAD_DIM)
    points, levels, queries = spec.get("points", POINTS), spec["levels"], spec["queries"]
    value = torch.randn(batch, sum(h * w for h, w in levels), heads, head_dim, generator=gen)
    loc = torch.rand(batch, queries, heads, len(levels), points, 2, generator=gen) * 1.2 - 0.1
    logits = torch.randn(batch, queries, heads, len(levels) * points, generator=gen)
    attn = logits.softmax(-1).view(batch, queries, heads, len(levels), points)
    grad_out = torch.randn(batch, queries, heads * head_dim, generator=gen)
    return tuple(t.to(device) for t in (value, loc, attn, grad_out))


def _run(backend: str, levels: list, inputs: Sequence[torch.Tensor], backward: bool = True) -> list[torch.Tensor]:
    value, loc, attn, grad_out = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = ops.ms_deform_attn(leaves[0], levels, leaves[1], leaves[2], backend=backend)
    if not backward:
        return [out]
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def _rel(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.double() - exact).norm() / exact.norm().clamp_min(1e-300))


def _timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time in ms (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def backends_for(device: torch.device) -> list[str]:
    """The backends timed on ``device``: Triton (CUDA, or CPU under the interpreter), mmcv where it imports."""
    names = []
    if ops.triton_available():
        names.append("triton")
    names += ["pytorch", "reference"]
    if device.type == "cuda" and ops.mmcv_available():
        names.append("mmcv")
    return names


def measure(name: str, spec: dict[str, Any], backend: str, device: torch.device, repeats: int, warmup: int) -> dict:
    """One JSON-able row: times, peak memory (CUDA) and the float64 rule of one backend at one shape."""
    levels = spec["levels"]
    value, loc, attn, grad_out = inputs = make_inputs(spec, device)
    row: dict[str, Any] = {
        "bench": "deform_backends",
        "shape": name,
        "backend": backend,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": value.shape[0],
        "queries": loc.shape[1],
        "levels": [list(hw) for hw in levels],
        "heads": value.shape[2],
        "head_dim": value.shape[3],
        "points": loc.shape[4],
        "dtype": "float32",
    }
    try:
        row["ms_forward"] = _timed(lambda: _run(backend, levels, inputs, backward=False), device, repeats, warmup)
        row["ms_forward_backward"] = _timed(lambda: _run(backend, levels, inputs), device, repeats, warmup)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            _run(backend, levels, inputs)
            torch.cuda.synchronize(device)
            row["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            row["peak_mem_mib"] = None  # CPU: not measured
        got = _run(backend, levels, inputs)
        exact = _run("reference", levels, tuple(t.double() for t in inputs))
        ref32 = _run("reference", levels, inputs)
        errors = {n: _rel(g, e) for n, g, e in zip(NAMES, got, exact)}
        bounds = {n: max(1e-5, 1.5 * _rel(r, e)) for n, r, e in zip(NAMES, ref32, exact)}
        row["rel_err_vs_f64"] = errors
        row["meets_float64_rule"] = all(errors[n] <= bounds[n] for n in NAMES)
    except Exception as err:  # noqa: BLE001  one failing backend (OOM, a compile error) must not hide the others
        first = str(err).strip().splitlines()
        row["error"] = f"{type(err).__name__}: {first[0] if first else ''}"
        row["meets_float64_rule"] = False
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def time_backends(
    device: torch.device,
    shapes: dict[str, dict[str, Any]] | None = None,
    repeats: int = 10,
    warmup: int = 3,
    emit: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Rows of every (shape, backend) on ``device`` (default shapes: the paper's ``PAPER_SHAPES``); ``emit`` is
    called with each row as soon as it is measured."""
    rows = []
    for name, spec in (shapes or PAPER_SHAPES).items():
        for backend in backends_for(device):
            row = measure(name, spec, backend, device, repeats, warmup)
            if emit is not None:
                emit(row)
            rows.append(row)
    return rows


def _print_row(row: dict) -> None:
    print(json.dumps(row), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(PAPER_SHAPES), help="comma-separated names of PAPER_SHAPES")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    args = parser.parse_args(argv)
    if args.smoke:
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"  # read per call by the kernel module (deform_triton)
        try:
            time_backends(torch.device("cpu"), SMOKE_SHAPES, repeats=1, warmup=0, emit=_print_row)
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
        return 0
    unknown = [s for s in args.shapes.split(",") if s not in PAPER_SHAPES]
    if unknown:
        print(f"error: unknown shape {unknown[0]!r}; expected some of {', '.join(PAPER_SHAPES)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("deform_backends: no CUDA device; nothing to time (use --smoke for the CPU interpreter check)")
        return 0
    shapes = {s: PAPER_SHAPES[s] for s in args.shapes.split(",")}
    time_backends(torch.device("cuda"), shapes, args.repeats, args.warmup, emit=_print_row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
