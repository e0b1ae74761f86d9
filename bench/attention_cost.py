"""Benchmark: deformable vs dense cross-attention of the adapter (injector + extractor), cost vs input size.

For each input size s (a multiple of 32) it builds the CPU preset (``vit_adapter_cpu``) once with
``attention="deformable"`` and once with ``attention="dense"``, takes the attention modules of the first
interaction (the injector's: ViT tokens query the 3-level prior; the extractor's: the prior queries the ViT tokens),
and feeds them the shapes of ``ViTAdapter.deform_inputs(s, s)`` (reference §1.3): s²/256 ViT tokens, 21·s²/1024
prior tokens. One measured call = injector attention + extractor attention, forward and backward (gradients for
the inputs and the parameters, as in training).

- Time: median (and quartiles) of ``--repeats`` (>= 5) calls after ``--warmup`` (>= 2) untimed calls; the two
  kinds run interleaved, alternating which goes first, so that load drift hits both alike.
- Peak memory: torch.profiler's CPU memory events (``profile_memory=True``): the peak of the running sum of tensor
  allocations during one call, i.e. the extra memory the call needs; inputs and parameters allocated before the
  call are excluded. (tracemalloc does not see torch's C++ allocator, so it is not used.)
- Analytic forward GFLOPs (projections + attention/sampling, multiply-add = 2 FLOPs), also for
  ``--analytic-sizes`` too large to time here, to show where the dense attention's quadratic term takes over.

    python bench/attention_cost.py --sizes 64,128,256 --json results/attention_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

KINDS = ("deformable", "dense")
MEMORY_METHOD = (
    "torch.profiler CPU memory events (profile_memory=True): peak of the running sum of tensor allocations "
    "during one forward+backward; inputs and parameters allocated before the call are excluded"
)


class UsageError(ValueError):
    pass


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise UsageError(f"{flag} expects comma-separated integers, got {text!r}") from err
    bad = [v for v in values if v <= 0 or v % 32]
    if bad:
        raise UsageError(f"{flag}: sizes must be positive multiples of 32 (reference §5), got {bad}")
    return values


def analytic_gflops(kind: str, dim: int, inner: int, heads: int, points: int, sizes: dict[str, int]) -> float:
    """Forward FLOPs of injector + extractor attention for one image (batch 1), in GFLOP.

    sizes: lx (ViT tokens), lc (prior tokens). Deformable: value/offset/weight/output projections plus bilinear
    sampling (4 taps × channels per point) and the weighted sum; dense: q/k/v/output projections plus QKᵀ and AV.
    """
    lx, lc = sizes["lx"], sizes["lc"]
    total = 0.0
    # (queries, values, levels) of the injector (x attends to c over 3 levels) and the extractor (c attends to x).
    for lq, lv, levels in ((lx, lc, 3), (lc, lx, 1)):
        if kind == "deformable":
            samples = heads * levels * points
            proj = 2 * lv * dim * inner + 2 * lq * dim * samples * 3 + 2 * lq * inner * dim
            sample = lq * samples * (inner // heads) * (2 * 4 + 2)  # 4 bilinear taps + the attention weight
            total += proj + sample
        else:
            proj = 2 * lq * dim * inner + 2 * 2 * lv * dim * inner + 2 * lq * inner * dim
            total += proj + 2 * 2 * lq * lv * inner
    return total / 1e9


def _peak_alloc_mb(fn: Callable[[], None]) -> float | None:
    """Peak extra CPU tensor memory of one call of ``fn`` from torch.profiler memory events (None if the
    profiler does not expose them)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        return None
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if str(e.device_type()).endswith("CPU"):
            running += e.nbytes()
            peak = max(peak, running)
    return peak / 2**20


def _make_step(model: Any, t: dict[str, Any]) -> Callable[[], None]:
    """One call: injector attention (ViT tokens query the prior) + extractor attention (the prior queries the
    ViT tokens) of interaction 1, forward and backward with fixed output gradients."""
    inj = model.interactions[0].injector.attn
    ext = model.interactions[0].extractors[0].attn
    params = list(inj.parameters()) + list(ext.parameters())

    def step() -> None:
        for p in [t["x"], t["c"], *params]:
            p.grad = None
        out_x = inj(t["x"], t["ref_inj"], t["c"], t["c_shapes"])
        out_c = ext(t["c"], t["ref_ext"], t["x"], t["vit_shape"])
        ((out_x * t["g_x"]).sum() + (out_c * t["g_c"]).sum()).backward()

    return step


def measure(
    sizes: Sequence[int], batch: int, warmup: int, repeats: int, seed: int = 0
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import torch

    from vit_adapter.models.factory import create_model

    torch.manual_seed(seed)
    models = {k: create_model("vit_adapter_cpu", task="det", attention=k) for k in KINDS}
    ref_model = models["deformable"]
    block = ref_model.interactions[0]
    deform = block.injector.attn
    dim, inner = int(ref_model.embed_dim), int(deform.head_dim * deform.n_heads)
    info = {
        "preset": "vit_adapter_cpu",
        "dim": dim,
        "inner_dim": inner,
        "heads": int(deform.n_heads),
        "points": int(deform.n_points),
        "head_dim": int(deform.head_dim),
    }
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(seed)
    for s in sizes:
        ref_inj, ref_ext, c_shapes, vit_shape = ref_model.deform_inputs(s, s, torch.device("cpu"), torch.float32)
        lx = sum(h * w for h, w in vit_shape)
        lc = sum(h * w for h, w in c_shapes)
        x = torch.randn(batch, lx, dim, generator=gen).requires_grad_()
        c = torch.randn(batch, lc, dim, generator=gen).requires_grad_()
        g_x = torch.randn(batch, lx, dim, generator=gen)
        g_c = torch.randn(batch, lc, dim, generator=gen)

        inputs = dict(x=x, c=c, g_x=g_x, g_c=g_c, ref_inj=ref_inj, ref_ext=ref_ext)
        inputs |= dict(c_shapes=c_shapes, vit_shape=vit_shape)
        steps = {k: _make_step(models[k], inputs) for k in KINDS}
        times: dict[str, list[float]] = {k: [] for k in KINDS}
        for i in range(warmup + repeats):
            order = KINDS if i % 2 == 0 else KINDS[::-1]  # alternate who goes first
            for k in order:
                t0 = time.perf_counter()
                steps[k]()
                if i >= warmup:
                    times[k].append((time.perf_counter() - t0) * 1e3)
        for k in KINDS:
            q = statistics.quantiles(times[k], n=4, method="inclusive")
            rows.append(
                {
                    "size": s,
                    "attention": k,
                    "median_ms": statistics.median(times[k]),
                    "q25_ms": q[0],
                    "q75_ms": q[2],
                    "times_ms": times[k],
                    "peak_mem_mb": _peak_alloc_mb(steps[k]),
                    "gflops_fwd": analytic_gflops(k, dim, inner, deform.n_heads, deform.n_points, {"lx": lx, "lc": lc})
                    * batch,
                    "queries": {"injector": lx, "extractor": lc},
                    "values": {"injector": lc, "extractor": lx},
                }
            )
    return rows, info


def summarise(rows: list[dict[str, Any]], analytic: list[dict[str, Any]]) -> dict[str, Any]:
    """Which kind wins per measured size (time, memory), the first measured size where deformable is faster
    (None: dense wins everywhere measured) and the analytic dense/deformable FLOP ratio per size."""
    by = {(r["size"], r["attention"]): r for r in rows}
    sizes = sorted({r["size"] for r in rows})
    win_time = {str(s): min(KINDS, key=lambda k: by[(s, k)]["median_ms"]) for s in sizes}
    win_mem = {}
    for s in sizes:
        mems = {k: by[(s, k)]["peak_mem_mb"] for k in KINDS}
        win_mem[str(s)] = None if None in mems.values() else min(KINDS, key=lambda k: mems[k])
    a = {(r["size"], r["attention"]): r["gflops_fwd_per_image"] for r in analytic}
    ratio = {str(s): a[(s, "dense")] / a[(s, "deformable")] for s in sorted({r["size"] for r in analytic})}
    return {
        "faster": win_time,
        "less_memory": win_mem,
        "time_crossover_size": next((s for s in sizes if win_time[str(s)] == "deformable"), None),
        "analytic_dense_over_deformable_flops": ratio,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/attention_cost.py", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="64,128,256", help="input sides to time (multiples of 32)")
    p.add_argument("--analytic-sizes", default="512,800,1024", help="extra sides for analytic FLOPs only")
    p.add_argument("--batch", type=int, default=8, help="images per call (the CPU default's batch)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per kind (median; >= 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per kind first (>= 2)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json", type=Path, default=None, help="write the results here (atomically)")
    args = p.parse_args(argv)
    try:
        sizes = _int_list(args.sizes, "--sizes")
        extra = _int_list(args.analytic_sizes, "--analytic-sizes") if args.analytic_sizes else []
        if not sizes:
            raise UsageError("--sizes is empty")
        if args.repeats < 5 or args.warmup < 2 or args.batch < 1 or args.threads < 1:
            raise UsageError("need --repeats >= 5, --warmup >= 2, --batch >= 1, --threads >= 1")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import torch

    from vit_adapter.engine.rundir import cpu_model
    from vit_adapter.utils.io import atomic_write_json

    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows, info = measure(sizes, args.batch, args.warmup, args.repeats)
    finally:
        torch.set_num_threads(previous)  # in-process callers (tests) get their setting back
    analytic = []
    for s in sorted(set(sizes) | set(extra)):
        lx, lc = (s // 16) ** 2, 21 * s * s // 1024
        for k in KINDS:
            g = analytic_gflops(k, info["dim"], info["inner_dim"], info["heads"], info["points"], {"lx": lx, "lc": lc})
            analytic.append({"size": s, "attention": k, "gflops_fwd_per_image": g})
    meta = {
        "what": "injector + extractor cross-attention of interaction 1, forward+backward",
        **info,
        "batch": args.batch,
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "timing": "median of the timed calls after the warm-ups; kinds interleaved, order alternating",
        "memory_method": MEMORY_METHOD,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
    }
    result = {"meta": meta, "results": rows, "analytic": analytic, "summary": summarise(rows, analytic)}
    print(f"{'size':>5} {'attention':>10} {'median ms':>10} {'peak MB':>9} {'GFLOP fwd':>10}")
    for r in rows:
        mem = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.2f}"
        print(f"{r['size']:>5} {r['attention']:>10} {r['median_ms']:>10.2f} {mem:>9} {r['gflops_fwd']:>10.3f}")
    print(json.dumps(result["summary"]))
    if args.json is not None:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
