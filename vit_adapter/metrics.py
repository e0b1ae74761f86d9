"""Evaluation metrics with the conventions of the official codebases (reference §2: mmdet 2.22 / mmseg 0.20.2).

* Detection / instance segmentation: COCO AP through pycocotools, returned like mmdet's metric dict, i.e. as
  **fractions in [0, 1]** under ``bbox_mAP, bbox_mAP_50, bbox_mAP_75, bbox_mAP_s, bbox_mAP_m, bbox_mAP_l`` and
  the same with ``segm_``. Where pycocotools reports -1 (no ground truth in that area range) we return NaN, so a
  mean over runs cannot silently absorb a -1.
* Semantic segmentation: mIoU, mAcc, aAcc and per-class IoU/Acc from a confusion matrix, in **percent
  (0..100)** as mmseg prints them. A class absent from both ground truth and prediction has IoU NaN and is left
  out of the mean; a class predicted but absent from the ground truth has IoU 0 and counts (mmseg convention).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

COCO_METRIC_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")  # order of COCOeval.stats[0:6]
MASK_THRESHOLD = 0.5  # mmdet's mask_thr_binary


def _quiet(fn: Callable[[], Any]) -> tuple[Any, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = fn()
    return out, buf.getvalue()


def as_coco(gt: COCO | str | os.PathLike[str] | Mapping[str, Any]) -> COCO:
    """A pycocotools COCO from an object, a JSON path or a dataset dict (quietly)."""
    if isinstance(gt, COCO):
        return gt
    coco = COCO()
    if isinstance(gt, Mapping):
        coco.dataset = dict(gt)
    else:
        from .data import load_coco  # checks the file and names it in errors

        return load_coco(Path(gt))
    _quiet(coco.createIndex)
    return coco


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def detections_to_coco_results(
    image_id: int,
    output: Mapping[str, Any],
    label_to_cat: Mapping[int, int],
    with_masks: bool = True,
) -> list[dict[str, Any]]:
    """One image's torchvision-style output (boxes xyxy, scores, labels 1..K, masks (N, 1, H, W) probabilities
    or (N, H, W) binary) as COCO result dicts (bbox xywh, category_id, score, RLE segmentation)."""
    boxes = _to_numpy(output["boxes"]).astype(np.float64).reshape(-1, 4)
    scores = _to_numpy(output["scores"]).astype(np.float64).reshape(-1)
    labels = _to_numpy(output["labels"]).astype(np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
    masks = None
    rles = output.get("rles") if with_masks else None  # already encoded (CocoMetric stores masks as RLE)
    if rles is not None and len(rles) != len(boxes):
        raise ValueError(f"image {image_id}: {len(rles)} RLE masks for {len(boxes)} detections")
    if with_masks and rles is None and "masks" in output:
        m = _to_numpy(output["masks"])
        if m.ndim == 4:
            m = m[:, 0]
        if m.ndim != 3 or m.shape[0] != len(boxes):
            raise ValueError(f"image {image_id}: masks of shape {m.shape} for {len(boxes)} detections")
        masks = m >= MASK_THRESHOLD if m.dtype.kind == "f" else m.astype(bool)
    results = []
    for k in range(len(boxes)):
        lab = int(labels[k])
        if lab not in label_to_cat:
            raise ValueError(f"image {image_id}: predicted label {lab} has no category (labels are 1..K)")
        x1, y1, x2, y2 = boxes[k]
        res: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": int(label_to_cat[lab]),
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "score": float(scores[k]),
        }
        if rles is not None:
            res["segmentation"] = dict(rles[k])
        elif masks is not None:
            res["segmentation"] = encode_mask(masks[k])
        results.append(res)
    return results


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """One binary (H, W) mask as a COCO RLE with text counts (JSON- and pickle-friendly)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _empty_results(gt: COCO) -> COCO:
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "annotations": [], "categories": gt.dataset["categories"]}
    _quiet(dt.createIndex)
    return dt


def coco_evaluate(
    gt: COCO | str | os.PathLike[str] | Mapping[str, Any],
    predictions: Mapping[int, Mapping[str, Any]] | Iterable[tuple[int, Mapping[str, Any]]],
    *,
    iou_types: Sequence[str] = ("bbox", "segm"),
    label_to_cat: Mapping[int, int] | None = None,
    image_ids: Sequence[int] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """COCO AP of per-image predictions in torchvision output format, in original image coordinates.

    ``label_to_cat`` maps contiguous labels back to category ids (default: label k -> k-th smallest category id,
    the loader's mapping). ``image_ids`` are the images evaluated (default: those in ``predictions``; give an
    image an empty output to count it with no detections). pycocotools' printout goes to ``log`` if given.
    """
    coco_gt = as_coco(gt)
    preds = dict(predictions.items() if isinstance(predictions, Mapping) else predictions)
    if label_to_cat is None:
        label_to_cat = {i + 1: c for i, c in enumerate(sorted(coco_gt.getCatIds()))}
    ids = sorted(preds) if image_ids is None else [int(i) for i in image_ids]
    unknown = sorted(set(ids) - set(coco_gt.getImgIds()))
    if unknown:
        raise ValueError(f"predictions for image ids not in the ground truth: {unknown[:5]}")
    out: dict[str, float] = {}
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"unknown iou_type {iou_type!r}; expected 'bbox' or 'segm'")
        results = []
        for image_id in ids:
            if image_id in preds:
                results += detections_to_coco_results(image_id, preds[image_id], label_to_cat, iou_type == "segm")
        if iou_type == "segm" and any("segmentation" not in r for r in results):
            raise ValueError("segm evaluation needs 'masks' in every prediction")
        coco_dt = _quiet(lambda r=results: coco_gt.loadRes(r))[0] if results else _empty_results(coco_gt)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = ids
        _, text = _quiet(lambda ev=ev: (ev.evaluate(), ev.accumulate(), ev.summarize()))
        if log is not None:
            log(f"{iou_type}:\n{text}")
        for name, value in zip(COCO_METRIC_NAMES, ev.stats[:6]):
            out[f"{iou_type}_{name}"] = float(value) if value >= 0 else math.nan
    return out


class CocoMetric:
    """Accumulate per-image predictions over batches, then ``compute()`` -> ``coco_evaluate`` dict."""

    def __init__(
        self,
        gt: COCO | str | os.PathLike[str] | Mapping[str, Any],
        iou_types: Sequence[str] = ("bbox", "segm"),
        label_to_cat: Mapping[int, int] | None = None,
    ) -> None:
        self.gt, self.iou_types, self.label_to_cat = as_coco(gt), tuple(iou_types), label_to_cat
        self.reset()

    def reset(self) -> None:
        self.preds: dict[int, dict[str, Any]] = {}

    def update(self, image_ids: Sequence[int], outputs: Sequence[Mapping[str, Any]]) -> None:
        """Store outputs (moved to CPU; masks thresholded and kept as RLE, which is compact: a full-size binary
        mask per detection would not fit in memory for COCO val, nor travel cheaply between processes)."""
        if len(image_ids) != len(outputs):
            raise ValueError(f"{len(image_ids)} image ids for {len(outputs)} outputs")
        for image_id, o in zip(image_ids, outputs):
            stored = {k: _to_numpy(o[k]) for k in ("boxes", "scores", "labels")}
            if "masks" in o:
                m = _to_numpy(o["masks"])
                m = m[:, 0] if m.ndim == 4 else m
                binary = m >= MASK_THRESHOLD if m.dtype.kind == "f" else m.astype(bool)
                stored["rles"] = [encode_mask(b) for b in binary]
            self.preds[int(image_id)] = stored

    def compute(self, log: Callable[[str], None] | None = None) -> dict[str, float]:
        return coco_evaluate(self.gt, self.preds, iou_types=self.iou_types, label_to_cat=self.label_to_cat, log=log)


class SegMetric:
    """Confusion-matrix semantic segmentation metrics (mmseg's ``mean_iou``), accumulated over batches.

    ``update(pred, target)``: pred is (B, H, W) / (H, W) class indices or (B, C, H, W) / (C, H, W) logits (argmax
    over C); target has the same spatial shape, with ``ignore_index`` pixels skipped. ``compute()`` returns
    ``mIoU``, ``mAcc``, ``aAcc`` (percent) and ``IoU_per_class``, ``Acc_per_class`` (lists, percent, NaN for
    classes without ground truth / without ground truth and predictions).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64)  # rows: truth

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.dim() == target.dim() + 1:
            if pred.shape[-3] != self.num_classes:
                raise ValueError(f"logits have {pred.shape[-3]} channels, expected num_classes={self.num_classes}")
            pred = pred.argmax(dim=-3)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        k = self.num_classes
        valid = target != self.ignore_index
        t = target[valid].to(torch.int64)
        p = pred[valid].to(torch.int64)
        if t.numel() and (t.min() < 0 or t.max() >= k):
            raise ValueError(f"target holds labels outside 0..{k - 1} (and not ignore_index={self.ignore_index})")
        if p.numel() and (p.min() < 0 or p.max() >= k):
            raise ValueError(f"prediction holds labels outside 0..{k - 1}")
        counts = torch.bincount(t * k + p, minlength=k * k).reshape(k, k)
        self.confusion += counts.cpu()

    def compute(self) -> dict[str, Any]:
        cm = self.confusion.to(torch.float64).numpy()
        tp = np.diag(cm)
        gt = cm.sum(axis=1)
        union = gt + cm.sum(axis=0) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(gt > 0, tp / gt, np.nan)
            total = gt.sum()

            def nanmean(x: np.ndarray) -> float:
                return float(np.nanmean(x)) * 100.0 if np.isfinite(x).any() else math.nan

            return {
                "mIoU": nanmean(iou),
                "mAcc": nanmean(acc),
                "aAcc": float(tp.sum() / total) * 100.0 if total > 0 else math.nan,
                "IoU_per_class": (iou * 100.0).tolist(),
                "Acc_per_class": (acc * 100.0).tolist(),
            }
