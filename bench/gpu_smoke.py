"""GPU smoke test: the paper path on a CUDA device, in one command.

1. The multi-scale deformable attention core on CUDA (``backend="auto"``: mmcv when it imports, else the
   pure-PyTorch path) against the float64 CPU reference, output and gradients: max relative error and the
   project's same-function rule (max(1e-5 relative, 1.5 x the fp32 reference's own error)).
2. ViT-Adapter-S + Mask R-CNN (the coco_maskrcnn_1x_s model, random weights, 80 classes) on 2 random images of
   1333x800 (batch 2 per GPU, as the paper's 8 x 2), a few training iterations in fp32 (TF32 on), bf16 autocast
   and fp16 autocast with a GradScaler: seconds per iteration and peak GPU memory.

    python bench/gpu_smoke.py [--iters 5] [--json]

On a machine without CUDA it prints one line saying so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def deform_check(device: torch.device) -> dict[str, float | bool | str]:
    from vit_adapter.models.ops import ms_deform_attn, resolve_backend

    g = torch.Generator().manual_seed(0)
    levels = [(100, 167), (50, 84), (25, 42)]  # 1/8..1/32 of 800x1333 (the injector at paper scale)
    batch, heads, head_dim, points, queries = 2, 6, 64, 4, 50 * 84
    n_value = sum(h * w for h, w in levels)
    value = torch.randn(batch, n_value, heads, head_dim, generator=g)
    loc = torch.rand(batch, queries, heads, len(levels), points, 2, generator=g)
    attn = torch.rand(batch, queries, heads, len(levels), points, generator=g)
    attn = attn / attn.sum(dim=(-1, -2), keepdim=True)
    grad = torch.randn(batch, queries, heads * head_dim, generator=g)

    def run(backend: str, dev: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        ins = [t.to(dev, dtype).requires_grad_(True) for t in (value, loc, attn)]
        out = ms_deform_attn(ins[0], levels, ins[1], ins[2], backend=backend)
        out.backward(grad.to(dev, dtype))
        return [out.detach().double().cpu(), *(t.grad.double().cpu() for t in ins)]

    exact = run("reference", torch.device("cpu"), torch.float64)
    ref32 = run("reference", torch.device("cpu"), torch.float32)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fast = run("auto", device, torch.float32)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    errs = [rel(f, e) for f, e in zip(fast, exact)]
    ref_errs = [rel(r, e) for r, e in zip(ref32, exact)]
    names = ("output", "grad_value", "grad_locations", "grad_weights")
    row: dict[str, float | bool | str] = {"backend": resolve_backend(device), "first_call_s": seconds}
    row |= {f"max_rel_err_{n}": e for n, e in zip(names, errs)}
    row["meets_float64_rule"] = all(e <= max(1e-5, 1.5 * r) for e, r in zip(errs, ref_errs))
    return row


def detector_run(device: torch.device, mode: str, iters: int) -> dict[str, float | str]:
    from vit_adapter.engine.build import build_model
    from vit_adapter.engine.config import load_config
    from vit_adapter.engine.trainer import LossModule

    cfg = load_config("coco_maskrcnn_1x_s", [], ["weights.init=scratch"])
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    net = LossModule(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", init_scale=512.0) if mode == "fp16" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 800, 1344, generator=g).to(device) for _ in range(2)]
    targets = []
    for _ in images:
        boxes = torch.tensor([[100.0, 120.0, 500.0, 600.0], [700.0, 50.0, 1200.0, 400.0]], device=device)
        masks = torch.zeros(2, 800, 1344, dtype=torch.uint8, device=device)
        masks[0, 120:600, 100:500] = 1
        masks[1, 50:400, 700:1200] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 5], device=device), "masks": masks})
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = net(images, targets)["loss"]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    steady = times[1:] or times  # the first iteration includes CUDA/cuDNN warm-up
    return {
        "mode": mode,
        "s_per_iter": sum(steady) / len(steady),
        "first_iter_s": times[0],
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
        "final_loss": float(loss.detach()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5, help="training iterations per precision mode")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: skipped, no CUDA device (nothing to check on CPU)")
        return 0
    device = torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = True  # train.tf32 default
    torch.backends.cudnn.allow_tf32 = True
    report = {"device": torch.cuda.get_device_name(device), "deform": deform_check(device), "detector": []}
    for mode in ("fp32", "bf16", "fp16"):
        report["detector"].append(detector_run(device, mode, args.iters))
        torch.cuda.empty_cache()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        d = report["deform"]
        print(f"device: {report['device']}")
        errs = ", ".join(f"{k[12:]} {v:.2e}" for k, v in d.items() if k.startswith("max_rel_err_"))
        verdict = "meets" if d["meets_float64_rule"] else "FAILS"
        print(f"ms_deform_attn [{d['backend']}] vs float64 CPU reference: {errs} ({verdict} the float64 rule)")
        for r in report["detector"]:
            print(
                f"ViT-Adapter-S + Mask R-CNN 1333x800, batch 2, {r['mode']}: {r['s_per_iter']:.3f} s/iter, "
                f"peak {r['peak_memory_mb']:.0f} MiB, loss {r['final_loss']:.4f}"
            )
    return 0 if report["deform"]["meets_float64_rule"] else 1


if __name__ == "__main__":
    sys.exit(main())
