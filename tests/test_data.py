"""Generator (determinism, valid COCO/ADE20K files), loaders on hand-made official layouts, transforms, the
pretraining set, and one clear DataError per kind of bad input."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from vit_adapter.data import (
    DataError,
    SceneConfig,
    TexturedFashionMNIST,
    build_dataset,
    collate_detection,
    collate_segmentation,
    detection_transforms,
    detections_to_original,
    generate_dataset,
    load_silhouettes,
    reduce_zero_label,
    render_scene,
    scene_rng,
    segmentation_transforms,
    verify_manifest,
)
from vit_adapter.data.synth import mask_to_polygons
from vit_adapter.data.transforms import (
    Compose,
    Pad,
    PhotoMetricDistortion,
    RandomCrop,
    RandomFlip,
    Resize,
    new_meta,
    rescale_size,
)

GEN = dict(n_train=8, n_val=4, image_size=64, crowd_prob=0.5, objects_per_image=(2, 5))


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("gen")
    generate_dataset(base / "a", seed=0, **GEN)
    generate_dataset(base / "b", seed=0, **GEN)
    generate_dataset(base / "c", seed=1, **GEN)
    return {"a": base / "a", "b": base / "b", "c": base / "c"}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _quiet_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


# ------------------------------------------------------------------------------------------------ generator
def test_same_seed_is_byte_identical_and_other_seed_differs(gen: dict[str, Path]) -> None:
    a, b, c = _files(gen["a"]), _files(gen["b"]), _files(gen["c"])
    assert a == b
    assert len(a) == 1 + 2 + 3 * (GEN["n_train"] + GEN["n_val"])  # manifest, 2 JSONs, image+image+label each
    assert a["manifest.json"] != c["manifest.json"]
    assert all(a[k] != c[k] for k in a if k.endswith(".png") and "images" in k)  # every image changes
    manifest = verify_manifest(gen["a"])
    assert set(manifest["files"]) == set(a) - {"manifest.json"}
    assert manifest["params"]["seed"] == 0 and manifest["silhouettes"] == "fashion-mnist"


def test_generate_reuses_refuses_and_overwrites(gen: dict[str, Path], tmp_path: Path) -> None:
    before = (gen["a"] / "manifest.json").stat().st_mtime_ns
    assert generate_dataset(gen["a"], seed=0, **GEN)["params"]["seed"] == 0  # same params: reused, not rewritten
    assert (gen["a"] / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(DataError, match="overwrite"):
        generate_dataset(gen["a"], seed=5, **GEN)
    root = tmp_path / "small"
    generate_dataset(root, n_train=1, n_val=1, image_size=32, seed=0)
    generate_dataset(root, n_train=2, n_val=1, image_size=32, seed=0, overwrite=True)
    assert len(list((root / "train2017").iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["small"]  # no temporary directories left behind
    (root / "val2017" / "000000000003.png").write_bytes(b"changed")
    with pytest.raises(DataError, match="000000000003.png"):
        verify_manifest(root)


def test_worker_processes_write_the_same_bytes(tmp_path: Path) -> None:
    kw = dict(n_train=16, n_val=0, image_size=32, seed=4)
    generate_dataset(tmp_path / "one", workers=1, **kw)
    generate_dataset(tmp_path / "two", workers=2, **kw)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_coco_annotations_validate_with_pycocotools(gen: dict[str, Path]) -> None:
    n_crowd = n_small = 0
    for split in ("train", "val"):
        coco = _quiet_coco(gen["a"] / "annotations" / f"instances_{split}2017.json")
        assert sorted(coco.getCatIds()) == list(range(1, 11))
        for img in coco.dataset["images"]:
            assert (gen["a"] / f"{split}2017" / img["file_name"]).is_file()
            anns = coco.imgToAnns[img["id"]]
            assert anns, "every scene has at least one object"
            union = np.zeros((img["height"], img["width"]), dtype=np.int32)
            for ann in anns:
                m = coco.annToMask(ann)
                assert m.shape == (img["height"], img["width"])
                assert ann["area"] > 0 and m.sum() == ann["area"]
                x, y, w, h = ann["bbox"]
                assert min(x, y) >= 0 and x + w <= img["width"] and y + h <= img["height"]
                ys, xs = np.nonzero(m)
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
                union += m
                n_crowd += ann["iscrowd"]
                n_small += max(w, h) < 16  # smaller than one ViT patch
                if ann["iscrowd"]:
                    assert isinstance(ann["segmentation"]["counts"], list)  # COCO: crowd = uncompressed RLE
            assert union.max() == 1  # visible masks never overlap
    assert n_crowd > 0 and n_small > 0


def test_semantic_masks_agree_with_instance_masks(gen: dict[str, Path]) -> None:
    ade = gen["a"] / "ADEChallengeData2016"
    for split, ade_split in (("train", "training"), ("val", "validation")):
        coco = _quiet_coco(gen["a"] / "annotations" / f"instances_{split}2017.json")
        for k, img in enumerate(sorted(coco.dataset["images"], key=lambda i: i["id"])):
            stem = f"ADE_{split}_{k + 1:08d}.png"
            image_bytes = (gen["a"] / f"{split}2017" / img["file_name"]).read_bytes()
            assert (ade / "images" / ade_split / stem).read_bytes() == image_bytes
            sem = np.asarray(Image.open(ade / "annotations" / ade_split / stem))
            painted = np.zeros_like(sem)
            for ann in coco.imgToAnns[img["id"]]:
                painted[coco.annToMask(ann) > 0] = ann["category_id"]
            assert np.array_equal(sem, painted)


def test_scene_properties_and_polygons() -> None:
    sil = load_silhouettes("val")
    cfg = SceneConfig.from_difficulty(0.5, image_size=96, thin_prob=1.0, objects_per_image=(3, 3))
    scene = render_scene(scene_rng(3, "val", 0), cfg, sil)
    again = render_scene(scene_rng(3, "val", 0), cfg, sil)
    assert np.array_equal(scene.image, again.image) and scene.image.shape == (96, 96, 3)
    assert len(scene.instances) >= 1
    for inst in scene.instances:
        polys = mask_to_polygons(inst.mask)
        if inst.mask.sum() < 60 or not polys:
            continue
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, 96, 96))
        decoded = mask_utils.decode(rle).astype(bool)
        iou = (decoded & inst.mask).sum() / (decoded | inst.mask).sum()
        assert iou > 0.75
    with pytest.raises(TypeError, match="bogus"):
        SceneConfig.from_difficulty(0.5, bogus=1)
    with pytest.raises(ValueError, match="objects_per_image"):
        SceneConfig.from_difficulty(0.5, objects_per_image=(4, 2))


def test_procedural_fallback_warns(tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match="procedural"):
        manifest = generate_dataset(
            tmp_path / "p", n_train=2, n_val=1, image_size=48, seed=0, fmnist_dir=tmp_path / "absent"
        )
    assert manifest["silhouettes"] == "procedural"
    assert manifest["categories"][0]["name"] == "disc"
    ds = build_dataset("ade20k", tmp_path / "p", "train")
    assert ds.classes[0] == "background" and ds.num_classes == 11


# ---------------------------------------------------------------------------------- loaders on generated data
def test_coco_loader_targets_and_exact_resume(gen: dict[str, Path]) -> None:
    ds = build_dataset("coco", gen["a"], "train", detection_transforms(True, scale=(80, 80)), seed=7)
    assert len(ds) == GEN["n_train"] and ds.num_classes == 10
    flips = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            img, t = ds[i]
            assert img.dtype == torch.float32 and img.shape == (3, 96, 96)  # 64 -> 80, padded to 96
            assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
            assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (len(t["labels"]), 96, 96)
            assert int(t["labels"].min()) >= 1 and int(t["labels"].max()) <= 10
            flips.add(t["meta"]["flip"])
            for box, m in zip(t["boxes"], t["masks"]):  # boxes follow the masks through resize and flip
                ys, xs = torch.nonzero(m, as_tuple=True)
                assert xs.min() >= box[0] - 1.5 and xs.max() + 1 <= box[2] + 1.5
                assert ys.min() >= box[1] - 1.5 and ys.max() + 1 <= box[3] + 1.5
    assert flips == {True, False}
    ds.set_epoch(2)
    a_img, a_t = ds[3]
    b_img, b_t = ds[3]
    assert torch.equal(a_img, b_img) and torch.equal(a_t["boxes"], b_t["boxes"])
    cached = build_dataset("coco", gen["a"], "train", detection_transforms(True, scale=(80, 80)), seed=7, cache=True)
    cached.set_epoch(2)
    for _ in range(2):  # second pass comes from the cache
        c_img, c_t = cached[3]
        assert torch.equal(c_img, a_img) and torch.equal(c_t["masks"], a_t["masks"])
    images, targets = collate_detection([ds[0], ds[1]])
    assert len(images) == len(targets) == 2


def test_ade_loader_on_generated_data(gen: dict[str, Path]) -> None:
    tf = segmentation_transforms(True, scale=(64, 64), ratio_range=(0.75, 1.5), crop_size=(48, 48))
    ds = build_dataset("ade20k", gen["a"], "train", tf, seed=1)
    assert not ds.reduce_zero_label and ds.num_classes == 11 and ds.classes[1] == "t-shirt/top"
    img, target = ds[0]
    assert img.shape == (3, 64, 64) and target.shape == (64, 64) and target.dtype == torch.int64
    assert set(target.unique().tolist()) <= set(range(11)) | {255}
    assert (target[48:] == 255).all() and (target[:, 48:] == 255).all()  # crop 48, padded to 64 with ignore
    raw = build_dataset("ade20k", gen["a"], "val")
    reduced = build_dataset("ade20k", gen["a"], "val", reduce_zero_label=True)
    _, t0 = raw[0]
    _, t1 = reduced[0]
    assert reduced.num_classes == 10
    assert torch.equal(t1[t0 == 0], torch.full_like(t1[t0 == 0], 255))
    assert torch.equal(t1[t0 > 0], t0[t0 > 0] - 1)
    x, y = collate_segmentation([ds[0], ds[1]])
    assert x.shape == (2, 3, 64, 64) and y.shape == (2, 64, 64)
    # object vs background (the CPU default's label mode): every class -> 1, background and ignore kept
    fg = build_dataset("ade20k", gen["a"], "val", foreground_only=True)
    assert fg.num_classes == 2 and fg.classes == ["background", "foreground"]
    _, t2 = fg[0]
    assert torch.equal(t2 == 0, t0 == 0) and torch.equal(t2 == 1, (t0 > 0) & (t0 != 255)) and (t0 > 1).any()
    assert torch.equal(fg.original_target(0), (raw.original_target(0) > 0).long())
    with pytest.raises(DataError, match="background class 0"):
        build_dataset("ade20k", gen["a"], "val", foreground_only=True, reduce_zero_label=True)


# ------------------------------------------------------------------------------ hand-made official layouts
def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _coco_fixture(root: Path) -> Path:
    """Two 40x48 images; categories 3 and 7; a polygon, a compressed RLE, a crowd RLE and a degenerate box."""
    h, w = 40, 48
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        _png(root / "val2017" / name, rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    m = np.zeros((h, w), dtype=np.uint8)
    m[10:20, 5:25] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    crowd = np.zeros((h, w), dtype=np.uint8)
    crowd[30:38, 30:46] = 1
    runs = [30 * h + 30] + [8, h - 8] * 15 + [8]  # column-major runs, zeros first: 16 columns of 8 ones
    crowd_rle = {"size": [h, w], "counts": [*runs, h * w - sum(runs)]}
    assert mask_utils.decode(mask_utils.frPyObjects(crowd_rle, h, w)).sum() == crowd.sum()
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 8], "area": 80.0, "iscrowd": 0,
         "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [5, 10, 20, 10], "area": 200.0, "iscrowd": 0,
         "segmentation": rle},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [30, 30, 16, 8], "area": 128.0, "iscrowd": 1,
         "segmentation": crowd_rle},
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 5], "area": 0.0, "iscrowd": 0,
         "segmentation": [[1, 1, 1, 6, 1, 1]]},
    ]  # fmt: skip
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": h, "width": w},
            {"id": 2, "file_name": "b.png", "height": h, "width": w},
        ],
        "annotations": anns,
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    ann_file = root / "annotations" / "instances_val2017.json"
    ann_file.parent.mkdir(parents=True)
    ann_file.write_text(json.dumps(data))
    return ann_file


def test_coco_loader_on_handmade_fixture(tmp_path: Path) -> None:
    _coco_fixture(tmp_path)
    ds = build_dataset("coco", tmp_path, "val")
    assert ds.ids == [1, 2] and ds.classes == ["cat", "dog"] and ds.label_to_cat == {1: 3, 2: 7}
    img, t = ds[0]
    assert img.shape == (3, 40, 48) and t["image_id"] == 1
    assert t["labels"].tolist() == [2, 1]  # dog (7) -> 2, cat (3) -> 1; crowd and degenerate box dropped
    assert t["boxes"].tolist() == [[2, 3, 12, 11], [5, 10, 25, 20]]
    assert t["masks"][1].sum() == 200 and t["masks"][1][10:20, 5:25].all()
    assert 60 <= int(t["masks"][0].sum()) <= 120  # the 10x8 polygon rasterised
    _, t2 = ds[1]
    assert t2["boxes"].shape == (0, 4) and t2["masks"].shape == (0, 40, 48)
    # the normalisation is ImageNet's
    raw = np.asarray(Image.open(tmp_path / "val2017" / "a.png"), dtype=np.float32)
    assert torch.allclose(img[0], torch.tensor((raw[:, :, 0] - 123.675) / 58.395), atol=1e-5)


def test_ade_loader_on_handmade_fixture(tmp_path: Path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    _png(base / "images" / "training" / "ADE_train_00000001.png", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    label = np.zeros((20, 30), dtype=np.uint8)
    label[:, 10:20] = 1
    label[:, 20:] = 150
    _png(base / "annotations" / "training" / "ADE_train_00000001.png", label)
    ds = build_dataset("ade20k", tmp_path, "train")
    assert ds.reduce_zero_label and ds.num_classes == 150
    _, target = ds[0]
    assert (target[:, :10] == 255).all() and (target[:, 10:20] == 0).all() and (target[:, 20:] == 149).all()
    assert build_dataset("ade20k", base, "train").pairs == ds.pairs  # root may also be ADEChallengeData2016
    assert reduce_zero_label(np.array([0, 1, 255], dtype=np.uint8)).tolist() == [255, 0, 255]


# -------------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing_root"):
        build_dataset("coco", tmp_path / "missing_root", "val")
    with pytest.raises(DataError, match="ADE20K"):
        build_dataset("ade20k", tmp_path, "val")

    ann_file = _coco_fixture(tmp_path / "c1")  # annotation pointing at a missing image
    (tmp_path / "c1" / "val2017" / "b.png").unlink()
    with pytest.raises(DataError, match="b.png"):
        build_dataset("coco", tmp_path / "c1", "val")

    _coco_fixture(tmp_path / "c2")  # corrupt image: found when decoded
    (tmp_path / "c2" / "val2017" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="a.png"):
        build_dataset("coco", tmp_path / "c2", "val")[0]

    ann_file = _coco_fixture(tmp_path / "c3")  # RLE of the wrong size
    data = json.loads(ann_file.read_text())
    data["annotations"][1]["segmentation"]["size"] = [41, 48]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotation 2 .*a\.png"):
        build_dataset("coco", tmp_path / "c3", "val")

    ann_file.write_text("{not json")  # broken JSON
    with pytest.raises(DataError, match="instances_val2017.json"):
        build_dataset("coco", tmp_path / "c3", "val")

    base = tmp_path / "a1" / "ADEChallengeData2016"  # label map of the wrong size
    _png(base / "images" / "validation" / "x.png", np.zeros((20, 30, 3), dtype=np.uint8))
    _png(base / "annotations" / "validation" / "x.png", np.zeros((20, 31), dtype=np.uint8))
    with pytest.raises(DataError, match=r"x\.png is 20x31 but image .*x\.png is 20x30"):
        build_dataset("ade20k", tmp_path / "a1", "val")[0]
    _png(base / "images" / "validation" / "y.png", np.zeros((20, 30, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="has no annotation"):
        build_dataset("ade20k", tmp_path / "a1", "val")


# ------------------------------------------------------------------------------------------------ transforms
def _det_sample() -> dict:
    masks = np.zeros((1, 40, 60), dtype=np.uint8)
    masks[0, 10:20, 5:25] = 1
    return {
        "image": np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8),
        "boxes": np.array([[5, 10, 25, 20]], dtype=np.float32),
        "labels": np.array([1]),
        "masks": masks,
        "meta": new_meta(40, 60),
    }


def test_resize_flip_pad_and_back_to_original() -> None:
    assert rescale_size(640, 480, (1333, 800)) == (1067, 800)
    assert rescale_size(1000, 500, (1333, 800)) == (1333, 667)
    tf = Compose([Resize((120, 120)), RandomFlip(1.0), Pad(32)])
    out = tf(_det_sample(), np.random.default_rng(0))
    assert out["image"].shape == (96, 128, 3) and out["masks"].shape == (1, 96, 128)  # 40x60 -> 80x120 -> pad
    assert out["boxes"].tolist() == [[70, 20, 110, 40]]  # x2 then mirrored at width 120
    ys, xs = np.nonzero(out["masks"][0])
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (70, 110, 20, 40)
    back = detections_to_original(
        {"boxes": torch.tensor(out["boxes"]), "masks": torch.tensor(out["masks"][:, None], dtype=torch.float32)},
        out["meta"],
    )
    assert back["boxes"].tolist() == [[5, 10, 25, 20]] and back["masks"].shape == (1, 1, 40, 60)
    assert torch.equal(back["masks"][0, 0] > 0.5, torch.tensor(_det_sample()["masks"][0] > 0))


def test_crop_photometric_and_seg_pad() -> None:
    seg = np.zeros((64, 64), dtype=np.uint8)
    seg[:, 40:] = 3
    sample = {"image": np.full((64, 64, 3), 100, np.uint8), "seg": seg, "meta": new_meta(64, 64)}
    crop = RandomCrop((32, 32), cat_max_ratio=0.75)
    for s in range(5):
        out = crop(dict(sample, meta=new_meta(64, 64)), np.random.default_rng(s))
        _, cnt = np.unique(out["seg"], return_counts=True)
        assert out["seg"].shape == (32, 32) and len(cnt) == 2 and cnt.max() / cnt.sum() < 0.75
    pmd = PhotoMetricDistortion()
    a = pmd(dict(sample), np.random.default_rng(3))
    b = pmd(dict(sample), np.random.default_rng(3))
    assert np.array_equal(a["image"], b["image"]) and a["seg"] is seg  # labels untouched
    changed = [
        not np.array_equal(pmd(dict(sample), np.random.default_rng(s))["image"], sample["image"]) for s in range(8)
    ]
    assert any(changed)
    padded = Pad(32)(
        {"image": np.zeros((33, 40, 3), np.uint8), "seg": np.zeros((33, 40), np.uint8), "meta": new_meta(33, 40)}, None
    )
    assert (
        padded["image"].shape == (64, 64, 3)
        and (padded["seg"][33:] == 255).all()
        and (padded["seg"][:33, :40] == 0).all()
    )


# ------------------------------------------------------------------------------------------- pretraining set
def test_pretraining_set(tmp_path: Path) -> None:
    def flip_half(img: torch.Tensor) -> torch.Tensor:  # draws from torch's global RNG, like torchvision's
        return img.flip(-1) if float(torch.rand(())) < 0.5 else img

    train = TexturedFashionMNIST("train", image_size=32, n=12, seed=0)
    val = TexturedFashionMNIST("val", image_size=32, n=12, seed=0)
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int) and 0 <= y < 10
    assert train.labels.tolist() == load_silhouettes("train").labels[:12].tolist()
    assert val.labels.tolist() == load_silhouettes("val").labels[:12].tolist()
    assert torch.equal(TexturedFashionMNIST("train", image_size=32, n=12, seed=0)[5][0], train[5][0])
    assert not torch.equal(TexturedFashionMNIST("train", image_size=32, n=12, seed=1)[5][0], train[5][0])
    raw = TexturedFashionMNIST("train", image_size=32, n=12, normalize=False)[0][0]
    assert float(raw.min()) >= 0.0 and float(raw.max()) <= 1.0
    assert torch.allclose(x[0], (raw[0] - 123.675 / 255) / (58.395 / 255), atol=1e-5)

    aug = TexturedFashionMNIST("train", image_size=32, n=12, augment=flip_half)
    per_epoch = []
    for epoch in range(4):
        aug.set_epoch(epoch)
        per_epoch.append(torch.stack([aug[i][0] for i in range(12)]))
        assert torch.equal(per_epoch[-1][2], aug[2][0])  # same (seed, epoch, index) -> same augmentation
    assert any(not torch.equal(per_epoch[0], p) for p in per_epoch[1:])

    path = train.save_npz(tmp_path / "cls.npz")
    loaded = TexturedFashionMNIST.from_npz(path)
    assert len(loaded) == 12 and torch.equal(loaded[7][0], train[7][0]) and loaded[7][1] == train[7][1]
    assert np.array_equal(loaded.images(), train.images()) and loaded.source == "fashion-mnist"
    with pytest.raises(DataError, match="missing.npz"):
        TexturedFashionMNIST.from_npz(tmp_path / "missing.npz")
    with np.load(path) as z:  # a cache rendered by an older version of the code is refused, not reused
        params = json.loads(str(z["params"]))
        np.savez(tmp_path / "old.npz", images=z["images"], labels=z["labels"],
                 params=np.array(json.dumps({**params, "render_version": 1})))  # fmt: skip
    with pytest.raises(DataError, match="old.npz was rendered by version 1"):
        TexturedFashionMNIST.from_npz(tmp_path / "old.npz")


def test_pretraining_placement_anywhere_spreads_small_items(tmp_path: Path) -> None:
    """'anywhere' draws the item position uniformly; 'centre' keeps the items near the middle. The item is the
    brightest region (background dimmed to 15-35 %), so its brightest pixels show where it is."""

    def centres(placement: str) -> np.ndarray:
        ds = TexturedFashionMNIST("train", image_size=64, n=40, item_scale=(0.2, 0.3), placement=placement)
        out = []
        for i in range(len(ds)):
            v = ds.render(i).astype(np.float32).max(axis=2)
            ys, xs = np.nonzero(v >= np.quantile(v, 0.99))
            out.append((np.median(ys), np.median(xs)))
        return np.array(out)

    centre, anywhere = centres("centre"), centres("anywhere")
    assert np.abs(centre - 31.5).max() < 16  # shift <= 1/8 of the margin, plus half an item
    assert np.abs(anywhere - 31.5).max() > 20 and anywhere.std(axis=0).min() > 2 * centre.std(axis=0).max()
    loaded = TexturedFashionMNIST.from_npz(
        TexturedFashionMNIST("train", image_size=32, n=4, placement="anywhere").save_npz(tmp_path / "a.npz")
    )
    assert loaded.placement == "anywhere"
    with pytest.raises(ValueError, match="placement must be one of centre, anywhere"):
        TexturedFashionMNIST("train", image_size=32, n=4, placement="left")
