"""GPU smoke test: the first command a GPU user runs, and the one the project runs whenever a GPU is available.

One JSON line per check (``check``, ``status`` ok / fail / skipped, the numbers):

1. ``train_eval_seg`` / ``train_eval_det``: the real trainer (``vit_adapter.engine.trainer.train``) on toy-size
   copies of the ADE20K UperNet and COCO Mask R-CNN profiles, a few iterations and one evaluation, on generated data
   in the official layouts: DataLoader workers, sliding-window evaluation (seg), aspect grouping (det) and, on
   CUDA, AMP fp16 with a GradScaler, TF32 and SyncBN under a world-1 NCCL process group.
2. ``nccl_world1``: a world-1 NCCL group on CUDA: DDP forward/backward of a SyncBN model and the evaluation's
   collectives (all_reduce of a confusion matrix, all_gather_object of predictions) on the group's device.
3. ``deform_cuda_vs_float64``: the multi-scale deformable attention core on CUDA (``backend="auto"``) against the
   float64 CPU reference, output and gradients, under the project's same-function rule: every error vs float64
   <= max(1e-5 relative, 1.5 x the fp32 reference's own error).
4. ``deform_backends``: bench/deform_backends.py's timing of the backends (triton, pytorch, mmcv where it
   imports) with peak memory and the float64 rule.
5. ``maskrcnn_s_1333x800``: ViT-Adapter-S + Mask R-CNN (coco_maskrcnn_1x_s, random weights) at 1333x800, batch 2
   per GPU (the paper's 8 x 2), in fp32 (TF32), bf16 and fp16 + GradScaler: s/iter and peak memory beside the
   paper's 0.36 s/iter (Table 7). `vit-adapter plan --smoke FILE` prices the paper runs from the fp32 row.

    python bench/gpu_smoke.py [--iters 5] [--out results.json]

Without CUDA it runs the checks that need none (1, on CPU in fp32) and prints ``skipped: no CUDA`` for the rest.
Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


PAPER_LEVELS = ((100, 167), (50, 84), (25, 42))  # 1/8..1/32 of 800x1333 (the injector at paper scale)


def deform_check(
    device: torch.device, levels: tuple[tuple[int, int], ...] = PAPER_LEVELS, queries: int = 50 * 84
) -> dict[str, Any]:
    from vit_adapter.models.ops import ms_deform_attn, resolve_backend

    g = torch.Generator().manual_seed(0)
    levels = [tuple(hw) for hw in levels]
    batch, heads, head_dim, points = 2, 6, 64, 4
    n_value = sum(h * w for h, w in levels)
    value = torch.randn(batch, n_value, heads, head_dim, generator=g)
    loc = torch.rand(batch, queries, heads, len(levels), points, 2, generator=g)
    attn = torch.rand(batch, queries, heads, len(levels), points, generator=g)
    attn = attn / attn.sum(dim=(-1, -2), keepdim=True)
    grad = torch.randn(batch, queries, heads * head_dim, generator=g)

    def run(backend: str, dev: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        # Each run gets its own leaves: a .to() copy of a grad-requiring tensor is a non-leaf whose .grad stays None.
        ins = [t.detach().to(dev, dtype).clone().requires_grad_(True) for t in (value, loc, attn)]
        out = ms_deform_attn(ins[0], levels, ins[1], ins[2], backend=backend)
        out.backward(grad.to(dev, dtype))
        return [out.detach().double().cpu(), *(t.grad.double().cpu() for t in ins)]

    exact = run("reference", torch.device("cpu"), torch.float64)
    ref32 = run("reference", torch.device("cpu"), torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _d: None)
    sync(device)
    t0 = time.perf_counter()
    fast = run("auto", device, torch.float32)
    sync(device)
    seconds = time.perf_counter() - t0

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    errs = [rel(f, e) for f, e in zip(fast, exact)]
    ref_errs = [rel(r, e) for r, e in zip(ref32, exact)]
    names = ("output", "grad_value", "grad_locations", "grad_weights")
    row: dict[str, Any] = {
        "check": "deform_cuda_vs_float64",
        "backend": resolve_backend(device),
        "first_call_s": seconds,
    }
    row |= {f"max_rel_err_{n}": e for n, e in zip(names, errs)}
    row |= {f"fp32_reference_rel_err_{n}": r for n, r in zip(names, ref_errs)}
    row["meets_float64_rule"] = all(e <= max(1e-5, 1.5 * r) for e, r in zip(errs, ref_errs))
    row["status"] = "ok" if row["meets_float64_rule"] else "fail"
    return row


def detector_run(device: torch.device, mode: str, iters: int) -> dict[str, Any]:
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
        "check": "maskrcnn_s_1333x800",
        "status": "ok",
        "mode": mode,
        "batch_per_gpu": 2,
        "paper_s_per_iter": 0.36,  # docs/reference.md Table 7 (ViT-Adapter-S + Mask R-CNN, 8 GPUs x 2)
        "s_per_iter": sum(steady) / len(steady),
        "first_iter_s": times[0],
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
        "final_loss": float(loss.detach()),
    }


# Toy sizes: the profiles' code paths (slide eval, aspect grouping, workers, fp16) at seconds per run.
TOY = [
    "model.embed_dim=64",
    "model.depth=4",
    "model.num_heads=2",
    "model.deform_num_heads=2",
    "model.conv_inplane=16",
    "model.pretrain_size=64",
    "model.window_size=2",
    "data.image_size=64",
    "data.img_scale=[96,64]",
    "data.n_train=4",
    "data.n_val=2",
    "data.batch_size=2",
    "data.num_workers=2",
    "train.eval_interval=1000000",  # the final evaluation only
    "train.checkpoint_interval=1000000",
    "train.log_interval=1",
    "optim.warmup_iters=1",
    "weights.init=scratch",
]
TOY_TASK = {
    "seg": ("ade20k_upernet_160k_s", ["head.channels=32", "head.fpn_channels=32", "data.slide_stride=43",
                                      "head.num_classes=10"]),
    "det": ("coco_maskrcnn_1x_s", ["head.fpn_channels=32", "head.representation_size=64", "head.mask_channels=32",
                                   "head.mask_convs=1", "head.anchor_sizes=[8,16,32,64,128]",
                                   "head.rpn_batch_size_per_image=64", "head.box_batch_size_per_image=64",
                                   "head.num_classes=10"]),
}  # fmt: skip


def skipped(check: str, why: str = "no CUDA") -> dict[str, Any]:
    return {"check": check, "status": "skipped", "reason": why}


def train_eval_check(task: str, root: Path, work: Path, cuda: bool, iters: int) -> dict[str, Any]:
    """The real trainer on a toy copy of a paper profile; on CUDA with AMP fp16 + GradScaler and SyncBN."""
    from vit_adapter.engine.config import load_config
    from vit_adapter.engine.trainer import train

    profile, task_sets = TOY_TASK[task]
    cuda_sets = ["train.amp=true", "train.amp_dtype=fp16", "train.loss_scale=512", "model.norm=syncbn"]
    sets = [f"data.root={root}", *TOY, *task_sets, f"train.max_iters={iters}", "train.threads=1"]
    sets += [*cuda_sets, "train.device=cuda"] if cuda else ["train.device=cpu", "train.deterministic=true"]
    cfg = load_config(profile, [], sets)
    out = work / f"{task}"
    t0 = time.perf_counter()
    final = train(cfg, out, progress=False)
    costs = json.loads((out / "costs.json").read_text(encoding="utf-8"))
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    key = "mIoU" if task == "seg" else "bbox_mAP"
    value = final.get("final", final).get(key) if isinstance(final, dict) else None
    return {
        "check": f"train_eval_{task}",
        "status": "ok" if value is not None else "fail",
        "profile": profile,
        "iters": iters,
        "device": run.get("device"),
        "world_size": run.get("world_size"),
        "amp": "fp16+GradScaler" if cuda else "off (CPU)",
        "num_workers": cfg.data.num_workers,
        "test_mode": cfg.data.test_mode,
        "train_s_per_iter": costs.get("train_s_per_iter"),
        "peak_memory_mb": costs.get("peak_memory_mb"),
        key: value,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def world1_nccl_group() -> None:
    """A world-1 NCCL process group, as torchrun --nproc_per_node 1 would set it up."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0")
    os.environ["WORLD_SIZE"] = "1"
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))


def nccl_check(device: torch.device) -> dict[str, Any]:
    """DDP + SyncBN step and the evaluation's collectives on CUDA tensors in the NCCL group."""
    import torch.distributed as dist
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    net = nn.SyncBatchNorm.convert_sync_batchnorm(net).to(device)
    ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device.index])
    loss = ddp(torch.randn(2, 3, 16, 16, device=device)).square().mean()
    loss.backward()
    confusion = torch.ones(11, 11, dtype=torch.int64, device=device)
    dist.all_reduce(confusion)
    gathered: list[Any] = [None]
    dist.all_gather_object(gathered, {"image_id": 1})
    dist.barrier()
    grads_ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    ok = grads_ok and int(confusion.sum()) == 121 and gathered == [{"image_id": 1}]
    return {"check": "nccl_world1", "status": "ok" if ok else "fail", "backend": dist.get_backend()}


def deform_backends_check(device: torch.device) -> dict[str, Any]:
    """Triton vs pure PyTorch vs mmcv (where it imports), forward and forward+backward at the ViT-Adapter-S
    shapes of the paper, with peak memory (bench/deform_backends.py)."""
    from bench.deform_backends import time_backends

    rows = time_backends(device)
    failed = [r for r in rows if r.get("error") or r.get("meets_float64_rule") is False]
    return {"check": "deform_backends", "status": "fail" if failed else "ok", "rows": rows}


def run_checks(iters: int, det_iters: int) -> tuple[str, list[dict[str, Any]]]:
    """(device name, one row per check); rows are printed as they finish."""
    from vit_adapter.data import generate_dataset

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row, sort_keys=True), flush=True)

    with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as tmp:
        root = Path(tmp) / "data"
        generate_dataset(root, n_train=4, n_val=2, image_size=64, seed=0, objects_per_image=(2, 3))
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True  # train.tf32 default
            torch.backends.cudnn.allow_tf32 = True
            world1_nccl_group()
            emit(nccl_check(device))
        else:
            emit(skipped("nccl_world1"))
        for task in ("seg", "det"):
            emit(train_eval_check(task, root, Path(tmp), cuda, iters))
    if cuda:
        emit(deform_check(device))
        emit(deform_backends_check(device))
        for mode in ("fp32", "bf16", "fp16"):
            emit(detector_run(device, mode, det_iters))
            torch.cuda.empty_cache()
    else:
        for check in ("deform_cuda_vs_float64", "deform_backends", "maskrcnn_s_1333x800"):
            emit(skipped(check))
    return name, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=3, help="toy training iterations per task")
    parser.add_argument("--det-iters", type=int, default=5, help="1333x800 Mask R-CNN iterations per precision")
    parser.add_argument("--out", type=Path, default=None, help="also write every row to this JSON file")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.det_iters < 1:
        print("gpu_smoke: error: --iters and --det-iters must be >= 1", file=sys.stderr)
        return 2
    name, rows = run_checks(args.iters, args.det_iters)
    if args.out is not None:
        from vit_adapter.utils.io import atomic_write_json

        atomic_write_json(args.out, {"device": name, "torch": torch.__version__, "checks": rows})
    return 1 if any(r["status"] == "fail" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
