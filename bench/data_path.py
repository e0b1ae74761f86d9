"""Main-process cost of the COCO data path and of host-side evaluation, at COCO size, on this CPU.

1. Sampling: the trainer's schedule (``iteration_batches`` with mmdet-style aspect grouping,
   ``grouped_epoch_order``) over a synthetic index of 117,266 images (COCO train2017; 2 aspect groups), 8 ranks x
   2 images: ms per iteration as the trainer calls it, and the grouped order itself (once per epoch, amortised).
2. Collation: ``collate_detection`` of one rank's 2 images at 1333x800 with 7 objects each.
   Target for 1 + 2: <= 5 ms per iteration (the paper's whole iteration is 0.36 s).
3. Host-side evaluation per image (100 detections, network input 800x1216 for a 480x640 original): the current
   path (masks pasted at network scale by torchvision, moved to the host, resized by ``detections_to_original``,
   RLE-encoded) against mmdet's paste (``paste_masks_at_original``: 28x28 RoI masks grid-sampled at the original
   scale), and the mask IoU of both against the same ground truth (synthetic ellipses): what the paste changes.

    python bench/data_path.py [--iters 20] [--out docs/figures/data_path.json] [--figure docs/figures/data_path.png]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

try:  # the engine may keep its sampling functions in their own module
    from vit_adapter.engine.sampling import grouped_epoch_order, iteration_batches  # type: ignore[import-not-found]
except ImportError:
    from vit_adapter.engine.trainer import grouped_epoch_order, iteration_batches
from vit_adapter.data import detections_to_original
from vit_adapter.data.transforms import collate_detection, paste_masks_at_original
from vit_adapter.engine.trainer import Dist
from vit_adapter.metrics import encode_mask

COCO_TRAIN = 117_266
TARGET_MS = 5.0


def _ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def sampling(iters: int, world: int = 8, per_gpu: int = 2) -> dict[str, float]:
    rng = np.random.default_rng(0)
    groups = (rng.random(COCO_TRAIN) < 0.25).astype(int).tolist()  # about a quarter of COCO is portrait
    order_fn = functools.partial(grouped_epoch_order, groups, per_gpu, 0)
    epoch_ms = _ms(lambda: order_fn(0), 3)
    per_epoch = len(order_fn(0)) // (per_gpu * world)
    d = Dist(rank=0, world=world)
    batches = iteration_batches(COCO_TRAIN, per_gpu, 0, 0, per_epoch, d, order_fn=order_fn)
    t0 = time.perf_counter()
    next(batches)  # the first iteration pays for the epoch's order once (if it is cached)
    first_ms = 1000 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(iters):
        next(batches)
    steady_ms = 1000 * (time.perf_counter() - t0) / iters
    return {
        "grouped_order_ms_per_epoch": epoch_ms,
        "iterations_per_epoch": per_epoch,
        "grouped_order_ms_amortised_per_iter": epoch_ms / per_epoch,
        "schedule_first_iter_ms": first_ms,
        "schedule_ms_per_iter": steady_ms,
    }


def collation(repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(2):
        img = torch.randn(3, 800, 1333, generator=g)
        boxes = torch.tensor([[10.0, 20.0, 300.0, 400.0]] * 7)
        target = {
            "boxes": boxes,
            "labels": torch.ones(7, dtype=torch.int64),
            "masks": torch.zeros(7, 800, 1333, dtype=torch.uint8),
        }
        target["meta"] = {
            "img_shape": (800, 1333),
            "orig_size": (480, 800),
            "scale_factor": (1.666, 1.666),
            "flip": False,
        }
        batch.append((img, target))
    return _ms(lambda: collate_detection(batch), repeats)


def _ellipses(n: int, h: int, w: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, h, w) bool ellipse masks and their (n, 4) float boxes in original coordinates."""
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    masks, boxes = [], []
    for _ in range(n):
        cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
        rx, ry = rng.uniform(8, 0.2 * w), rng.uniform(8, 0.2 * h)
        masks.append(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1)
        boxes.append([cx - rx, cy - ry, cx + rx, cy + ry])
    return torch.stack(masks), torch.tensor(boxes, dtype=torch.float32)


def host_eval(repeats: int, n_det: int = 100) -> dict[str, float]:
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    from torchvision.ops import roi_align

    oh, ow, scale = 480, 640, 800 / 480
    nh, nw = 800, int(round(ow * scale / 32) * 32)  # padded network input
    ih, iw = 800, int(round(ow * scale))
    gt, boxes = _ellipses(n_det, oh, ow, np.random.default_rng(0))
    # 28x28 RoI masks as the mask head would predict them perfectly: the ground truth RoIAligned in its box.
    rois = torch.cat([torch.arange(n_det, dtype=torch.float32)[:, None], boxes], dim=1)  # RoI k reads mask k
    m28 = roi_align(gt[:, None].float(), rois, 28, spatial_scale=1.0, sampling_ratio=2, aligned=True)[:, 0]
    net_boxes = boxes * scale
    meta = {"img_shape": (ih, iw), "orig_size": (oh, ow), "scale_factor": (iw / ow, ih / oh), "flip": False}
    pasted_net = paste_masks_in_image(m28[:, None], net_boxes, (nh, nw))  # torchvision's paste (on the device)
    out = {"boxes": net_boxes, "labels": torch.ones(n_det), "scores": torch.ones(n_det), "masks": pasted_net}

    def current() -> torch.Tensor:
        m = detections_to_original({k: v.float().cpu() for k, v in out.items()}, meta)["masks"][:, 0] >= 0.5
        for k in range(n_det):
            encode_mask(m[k].numpy().astype(np.uint8))
        return m

    def mmdet() -> torch.Tensor:
        m = paste_masks_at_original(m28, boxes, (oh, ow))
        for k in range(n_det):
            encode_mask(m[k].numpy().astype(np.uint8))
        return m

    def iou(pred: torch.Tensor) -> float:
        inter = (pred & gt).flatten(1).sum(1).float()
        union = (pred | gt).flatten(1).sum(1).float()
        return float((inter / union).mean())

    return {
        "detections_per_image": n_det,
        "current_paste_ms_per_image": _ms(current, repeats),
        "mmdet_paste_ms_per_image": _ms(mmdet, repeats),
        "current_paste_mask_iou": iou(current()),
        "mmdet_paste_mask_iou": iou(mmdet()),
    }


def figure(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["sampling"]
    bars = {
        "schedule\n(per iter, as called)": s["schedule_ms_per_iter"],
        "grouped order\n(amortised)": s["grouped_order_ms_amortised_per_iter"],
        "collation\n(2 x 1333x800)": result["collation_ms_per_iter"],
        "eval host\ncurrent paste": result["host_eval"]["current_paste_ms_per_image"],
        "eval host\nmmdet paste": result["host_eval"]["mmdet_paste_ms_per_image"],
    }
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    ax.bar(list(bars), list(bars.values()), color=["C0", "C0", "C0", "C1", "C1"])
    ax.axhline(TARGET_MS, color="k", ls="--", lw=1, label=f"{TARGET_MS:g} ms target (train data path)")
    ax.set_yscale("log")
    ax.set_ylabel("main-process ms")
    ax.set_title("COCO-size data path and host-side evaluation (per iteration / per image)")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20, help="schedule iterations timed")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each timed call (median)")
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    parser.add_argument("--figure", type=Path, default=None, help="write a bar chart here")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.repeats < 1:
        print("data_path: error: --iters and --repeats must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    result: dict[str, Any] = {"sampling": sampling(args.iters), "collation_ms_per_iter": collation(args.repeats)}
    result["host_eval"] = host_eval(args.repeats)
    per_iter = result["sampling"]["schedule_ms_per_iter"] + result["collation_ms_per_iter"]
    result |= {
        "train_main_process_ms_per_iter": per_iter,
        "target_ms": TARGET_MS,
        "meets_target": per_iter <= TARGET_MS,
    }
    result["threads"] = 1
    from vit_adapter.engine.rundir import cpu_model

    result["host"] = {"cpu_model": cpu_model(), "torch": torch.__version__}  # speed ratios move with the CPU
    print(json.dumps(result, indent=2, sort_keys=True))
    if args.out is not None:
        from vit_adapter.utils.io import atomic_write_json

        atomic_write_json(args.out, result)
    if args.figure is not None:
        figure(result, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
