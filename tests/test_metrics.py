"""COCO AP (fractions, mmdet keys) and SegMetric (percent, mmseg) against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from vit_adapter.metrics import CocoMetric, SegMetric, coco_evaluate

KEYS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


def _rect_mask(h: int, w: int, x: int, y: int, bw: int, bh: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y : y + bh, x : x + bw] = 1
    return m


def _gt(objects: list[tuple[int, tuple[int, int, int, int]]], h: int = 200, w: int = 200) -> dict:
    """One image with rectangular objects (category_id, (x, y, w, h)); categories 3 and 7 (non-contiguous)."""
    anns = []
    for k, (cat, (x, y, bw, bh)) in enumerate(objects):
        rle = mask_utils.encode(np.asfortranarray(_rect_mask(h, w, x, y, bw, bh)))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append(
            {
                "id": k + 1,
                "image_id": 1,
                "category_id": cat,
                "bbox": [x, y, bw, bh],
                "area": float(bw * bh),
                "segmentation": rle,
                "iscrowd": 0,
            }
        )
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": h, "width": w}],
        "annotations": anns,
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }


def _pred(boxes_xywh, labels, scores=None, h=200, w=200, prob_masks=False) -> dict:
    masks = np.stack([_rect_mask(h, w, *b).astype(np.float32) for b in boxes_xywh])
    if prob_masks:  # probabilities straddling the 0.5 threshold: 0.6 inside, 0.4 outside
        masks = np.where(masks > 0, 0.6, 0.4).astype(np.float32)[:, None]
    xyxy = [[x, y, x + bw, y + bh] for x, y, bw, bh in boxes_xywh]
    return {
        "boxes": torch.tensor(xyxy, dtype=torch.float32),
        "scores": torch.tensor(scores or [0.9] * len(labels)),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.tensor(masks) if prob_masks else torch.tensor(masks, dtype=torch.uint8),
    }


# small (area < 32^2), medium, large
OBJECTS = [(3, (5, 5, 10, 10)), (7, (40, 40, 40, 40)), (3, (60, 90, 120, 100))]


@pytest.mark.parametrize("prob_masks", [False, True])
def test_perfect_predictions_give_ap_one(prob_masks: bool) -> None:
    gt = _gt(OBJECTS)
    # contiguous labels: category 3 -> 1, category 7 -> 2
    pred = _pred([b for _, b in OBJECTS], [1, 2, 1], prob_masks=prob_masks)
    out = coco_evaluate(gt, {1: pred})
    assert set(out) == {f"{t}_{k}" for t in ("bbox", "segm") for k in KEYS}
    for key, value in out.items():
        assert value == pytest.approx(1.0), key


def test_shifted_box_hand_computed() -> None:
    # 20x20 box shifted by 4 px: IoU = 16*20 / (800 - 320) = 2/3, a match at IoU 0.50..0.65 (4 of 10 thresholds)
    gt = _gt([(7, (10, 10, 20, 20))])
    pred = _pred([(14, 10, 20, 20)], [2])
    out = coco_evaluate(gt, {1: pred}, iou_types=("bbox",))
    assert out["bbox_mAP"] == pytest.approx(0.4)
    assert out["bbox_mAP_50"] == pytest.approx(1.0)
    assert out["bbox_mAP_75"] == pytest.approx(0.0)
    assert out["bbox_mAP_s"] == pytest.approx(0.4)  # area 400 < 32^2
    assert math.isnan(out["bbox_mAP_m"]) and math.isnan(out["bbox_mAP_l"])  # pycocotools' -1 -> NaN


def test_labels_map_back_to_category_ids() -> None:
    gt = _gt([(7, (40, 40, 40, 40))])
    right = coco_evaluate(gt, {1: _pred([(40, 40, 40, 40)], [2])}, iou_types=("bbox",))
    wrong = coco_evaluate(gt, {1: _pred([(40, 40, 40, 40)], [1])}, iou_types=("bbox",))
    assert right["bbox_mAP"] == pytest.approx(1.0)
    assert wrong["bbox_mAP"] == pytest.approx(0.0)  # label 1 is category 3, absent from this image
    explicit = coco_evaluate(gt, {1: _pred([(40, 40, 40, 40)], [1])}, iou_types=("bbox",), label_to_cat={1: 7})
    assert explicit["bbox_mAP"] == pytest.approx(1.0)


def test_half_the_objects_missed_and_a_false_positive() -> None:
    gt = _gt([(3, (10, 10, 40, 40)), (3, (100, 100, 40, 40))])
    # one exact hit (score .9) plus a lower-scored false positive far away: recall 0.5, precision 1 up to it
    pred = _pred([(10, 10, 40, 40), (150, 10, 30, 30)], [1, 1], scores=[0.9, 0.5])
    out = coco_evaluate(gt, {1: pred}, iou_types=("bbox", "segm"))
    # 101-point interpolated AP: precision 1 for recall 0..0.5 (51 points), 0 beyond -> 51/101
    assert out["bbox_mAP"] == pytest.approx(51 / 101)
    assert out["segm_mAP"] == pytest.approx(51 / 101)


def test_empty_predictions_and_bad_ids() -> None:
    gt = _gt(OBJECTS)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    out = coco_evaluate(gt, {1: {**empty, "masks": torch.zeros(0, 1, 200, 200)}})
    assert out["bbox_mAP"] == 0.0 and out["segm_mAP"] == 0.0
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(gt, {99: empty}, iou_types=("bbox",))
    with pytest.raises(ValueError, match="label 5"):
        coco_evaluate(gt, {1: _pred([(5, 5, 10, 10)], [5])}, iou_types=("bbox",))


def test_coco_metric_accumulates_like_one_call() -> None:
    gt = _gt(OBJECTS)
    pred = _pred([b for _, b in OBJECTS], [1, 2, 2], prob_masks=True)
    metric = CocoMetric(gt)
    metric.update([1], [pred])
    logs: list[str] = []
    assert metric.compute(log=logs.append) == coco_evaluate(gt, {1: pred})
    assert "Average Precision" in logs[0]


def test_segmetric_perfect_is_100() -> None:
    target = torch.tensor([[0, 1, 2], [2, 255, 1]])
    m = SegMetric(3)
    m.update(target.clone().masked_fill(target == 255, 0), target)
    out = m.compute()
    assert out["mIoU"] == pytest.approx(100.0) and out["mAcc"] == pytest.approx(100.0)
    assert out["aAcc"] == pytest.approx(100.0)


def test_segmetric_hand_computed_with_ignore_and_absent_class() -> None:
    # classes 0..3; class 3 appears in neither -> NaN, left out of the mean; pixel (1, 1) is ignored
    target = torch.tensor([[0, 0, 1], [1, 255, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    m = SegMetric(4)
    m.update(pred, target)
    out = m.compute()
    iou = out["IoU_per_class"]
    assert iou[0] == pytest.approx(100 / 3) and iou[1] == pytest.approx(200 / 3) and iou[2] == 0.0
    assert math.isnan(iou[3])
    assert out["mIoU"] == pytest.approx(100 / 3)
    assert out["mAcc"] == pytest.approx(50.0)
    assert out["aAcc"] == pytest.approx(60.0)
    # predicting the GT-absent class 3 somewhere makes its IoU 0 (not NaN), and it then counts in the mean
    m.update(torch.tensor([[3]]), torch.tensor([[0]]))
    out2 = m.compute()
    assert out2["IoU_per_class"][3] == 0.0 and math.isnan(out2["Acc_per_class"][3])
    assert out2["mIoU"] == pytest.approx((100 / 4 + 200 / 3 + 0 + 0) / 4)


def test_segmetric_logits_batches_and_errors() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (2, 8, 8), generator=g)
    target[0, :2] = 255
    logits = torch.randn(2, 5, 8, 8, generator=g)
    whole, parts = SegMetric(5), SegMetric(5)
    whole.update(logits, target)
    for b in range(2):
        parts.update(logits[b], target[b])  # (C, H, W) logits
    assert torch.equal(whole.confusion, parts.confusion)
    assert int(whole.confusion.sum()) == 2 * 64 - 16
    with pytest.raises(ValueError, match="shape"):
        whole.update(torch.zeros(2, 8, 7, dtype=torch.long), target)
    with pytest.raises(ValueError, match="outside"):
        whole.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 7]]))
