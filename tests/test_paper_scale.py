"""Paper scale from one code path (issue #15), shown on CPU: the global batch, distributed evaluation equal to
one process's, sliding-window inference, DataLoader workers with exact resume, aspect-ratio grouping, fp32 box
math under autocast, mmdet-compatible box losses / RoIAlign, the layer-decay no-decay rule, FLOPs with
attention, the COCO class-count check and the ViT-L normalisation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit_adapter.cli import main
from vit_adapter.data import generate_dataset
from vit_adapter.engine.build import build_datasets, build_model
from vit_adapter.engine.config import ConfigError, load_config
from vit_adapter.engine.costs import count_flops
from vit_adapter.engine.distributed import Dist, per_process_batch
from vit_adapter.engine.evaluation import evaluate, slide_logits
from vit_adapter.engine.hooks import Callbacks, StopTraining
from vit_adapter.engine.sampling import aspect_groups, grouped_epoch_order, iteration_batches
from vit_adapter.engine.trainer import train

from .helpers.dist_eval import seeded_model
from .test_engine import tiny_sets

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("paper_scale") / "gen"
    generate_dataset(root, n_train=8, n_val=5, image_size=64, seed=0, objects_per_image=(2, 3))
    return root


# ---------------------------------------------------------------------------------------------------------
# Global batch


def test_batch_size_is_global_and_must_divide() -> None:
    cfg = load_config("cpu_default", [], ["data.batch_size=16", "train.grad_accum=2"])
    assert per_process_batch(cfg, 8) == 1 and per_process_batch(cfg, 1) == 8 and per_process_batch(cfg, 2) == 4
    with pytest.raises(ValueError, match=r"data.batch_size = 16 \(the global batch\) does not divide into 3"):
        per_process_batch(cfg, 3)
    with pytest.raises(ConfigError, match="train.grad_accum = 3"):
        load_config("cpu_default", [], ["data.batch_size=16", "train.grad_accum=3"])
    # The paper profiles: 16 images per step on 8 GPUs (2 each) or 1 GPU (16), never 16 per GPU.
    s = load_config("coco_maskrcnn_1x_s")
    assert s.data.batch_size == 16 and per_process_batch(s, 8) == 2


def test_indivisible_global_batch_is_one_line_exit_2(tmp_path, data_root, capsys) -> None:
    out = tmp_path / "run"
    sets = tiny_sets(data_root, "seg", iters=2, extra=["data.batch_size=3", "train.grad_accum=2"])
    code = main(
        ["train", "--config", "cpu_default", "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "data.batch_size" in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not out.with_name("run.partial").exists()


def test_grad_accum_splits_the_global_batch(data_root) -> None:
    # 4 images per step with grad_accum 2: the step still sees the 4 images of iteration 0.
    one = list(iteration_batches(8, 4, 0, 0, 2, Dist()))
    cfg = load_config("cpu_default", [], ["data.batch_size=4", "train.grad_accum=2"])
    assert per_process_batch(cfg, 1) == 2 and [len(b[2]) for b in one] == [4, 4]


# ---------------------------------------------------------------------------------------------------------
# Distributed evaluation


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("task", ["seg", "det"])
def test_sharded_evaluation_equals_single_process(tmp_path, data_root, task: str) -> None:
    # 5 val images in batches of 2: rank 0 evaluates batches 0 and 2, rank 1 batch 1 (uneven shards).
    cfg = load_config("cpu_default", [], tiny_sets(data_root, task, extra=["data.n_val=5", "data.eval_batch_size=2"]))
    out = tmp_path / "metrics.json"
    proc = _torchrun(str(HERE / "helpers" / "dist_eval.py"), json.dumps(cfg.to_dict()), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, val_set, collate = build_datasets(cfg, cfg.train.seed)
    single = evaluate(seeded_model(cfg), val_set, collate, cfg, torch.device("cpu"))
    sharded = json.loads(out.read_text())
    assert sharded == json.loads(json.dumps(single, sort_keys=True))  # exactly, every metric
    if task == "det":
        assert single["bbox_mAP_50"] is not None  # a real COCO evaluation ran (5 images, random detections)


def test_process_group_timeout_is_a_config_key() -> None:
    cfg = load_config("coco_maskrcnn_1x_s")
    assert cfg.train.dist_timeout_s >= 1800  # NCCL's 10-minute default is too short for a COCO evaluation
    with pytest.raises(ConfigError, match="train.dist_timeout_s"):
        load_config("cpu_default", [], ["train.dist_timeout_s=0"])


# ---------------------------------------------------------------------------------------------------------
# Sliding-window inference


def test_slide_logits_on_a_hand_made_case() -> None:
    # Image 1x1x4x6, windows 4x4 every 2 px: columns [0, 4) and [2, 6) (h fits one window). The "model" returns
    # its window's mean everywhere, so the result is the per-pixel average of the covering windows' means.
    img = torch.arange(24, dtype=torch.float32).view(1, 1, 4, 6)
    calls = []

    def model(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape[-2:]))
        return x.mean().expand(1, 2, *x.shape[-2:]) * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)

    out = slide_logits(model, img, crop=4, stride=2)
    left, right = img[..., 0:4].mean().item(), img[..., 2:6].mean().item()  # 9.5 and 11.5
    expected_row = [left, left, (left + right) / 2, (left + right) / 2, right, right]
    assert calls == [(4, 4), (4, 4)]
    assert out.shape == (1, 2, 4, 6)
    torch.testing.assert_close(out[0, 0], torch.tensor([expected_row] * 4), rtol=0, atol=0)
    torch.testing.assert_close(out[0, 1], -out[0, 0], rtol=0, atol=0)
    # ADE20K numbers: 512 windows, stride 341 on a 512x683 image = 2 windows; last one shifted to end at 683.
    calls.clear()
    slide_logits(model, torch.zeros(1, 1, 512, 683), crop=512, stride=341)
    assert calls == [(512, 512), (512, 512)]


def test_slide_mode_is_used_by_evaluation(data_root, monkeypatch) -> None:
    import vit_adapter.engine.evaluation as evaluation

    seen = []
    real = evaluation.slide_logits

    def spy(model, images, *, crop, stride):
        seen.append((tuple(images.shape[-2:]), crop, stride))
        return real(model, images, crop=crop, stride=stride)

    monkeypatch.setattr(evaluation, "slide_logits", spy)
    sets = tiny_sets(data_root, "seg", extra=["data.test_mode=slide", "data.slide_stride=32", "data.image_size=32"])
    cfg = load_config("cpu_default", [], sets)
    _, val_set, collate = build_datasets(cfg, 0)
    m = evaluate(seeded_model(cfg), val_set, collate, cfg, torch.device("cpu"))
    assert seen and all(c == 32 and s == 32 for _, c, s in seen) and 0 <= m["mIoU"] <= 100


def test_ade20k_profiles_slide_512_341() -> None:
    for name in ("ade20k_upernet_160k_s", "ade20k_upernet_160k_l"):
        cfg = load_config(name)
        assert (cfg.data.test_mode, cfg.data.image_size, cfg.data.slide_stride) == ("slide", 512, 341)


# ---------------------------------------------------------------------------------------------------------
# DataLoader path and aspect-ratio grouping


def test_resume_with_two_workers_is_exact(tmp_path, data_root) -> None:
    sets = tiny_sets(
        data_root,
        "seg",
        iters=4,
        # drop-path draws from the global RNG: the DataLoader must not consume it (its own generator), or the
        # resumed run and the in-process run would differ.
        extra=[
            "data.flip=true",
            "data.n_train=8",
            "train.checkpoint_interval=2",
            "train.eval_interval=2",
            "model.drop_path_rate=0.1",
        ],
    )
    workers = load_config("cpu_default", [], [*sets, "data.num_workers=2"])
    straight = tmp_path / "straight"
    train(workers, straight, progress=False)

    def stop(it: int) -> None:
        if it == 2:
            raise StopTraining("test interruption")

    resumed = tmp_path / "resumed"
    with pytest.raises(StopTraining):
        train(workers, resumed, progress=False, hooks=[Callbacks(after_iteration=stop)])
    train(workers, resumed, progress=False)
    assert (resumed / "metrics.json").read_bytes() == (straight / "metrics.json").read_bytes()
    # The workers load exactly the in-process batches: same metrics as num_workers 0.
    inproc = tmp_path / "inproc"
    train(load_config("cpu_default", [], sets), inproc, progress=False)
    assert (inproc / "metrics.json").read_bytes() == (straight / "metrics.json").read_bytes()
    assert (inproc / "log.jsonl").read_bytes() == (straight / "log.jsonl").read_bytes()


def test_aspect_grouping_is_a_pure_function_of_seed_and_epoch() -> None:
    groups = [0, 1, 0, 0, 1, 1, 0, 1, 0, 1, 1]
    a = grouped_epoch_order(groups, 2, seed=3, epoch=5)
    assert a == grouped_epoch_order(groups, 2, seed=3, epoch=5)
    assert a != grouped_epoch_order(groups, 2, seed=3, epoch=6)
    assert len(a) == 10 and len(set(a)) == 10  # 5 of each group, tails of 1 dropped
    for k in range(0, len(a), 2):
        assert groups[a[k]] == groups[a[k + 1]]  # each per-process micro-batch is one orientation
    for epoch in range(3):
        assert len(grouped_epoch_order(groups, 2, 0, epoch)) == 10


def test_aspect_groups_read_the_annotation_sizes(data_root) -> None:
    cfg = load_config("cpu_default", [], tiny_sets(data_root, "det", extra=["data.group_by_aspect=true"]))
    train_set, _, _ = build_datasets(cfg, 0)
    groups = aspect_groups(train_set)
    assert len(groups) == len(train_set) and set(groups) <= {0, 1}
    assert load_config("coco_maskrcnn_1x_s").data.group_by_aspect


# ---------------------------------------------------------------------------------------------------------
# Mixed precision, losses, RoIAlign


def _tiny_detector(data_root, *extra: str):
    cfg = load_config("cpu_default", [], tiny_sets(data_root, "det", extra=list(extra)))
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def test_proposals_and_box_regression_stay_fp32_underautocast(data_root) -> None:
    _, model = _tiny_detector(data_root)
    seen: dict[str, torch.dtype] = {}

    def on_roi_heads(mod, args, kwargs):  # (features, proposals, image_shapes, targets)
        seen["proposals"] = args[1][0].dtype
        seen["features"] = next(iter(args[0].values())).dtype

    def on_predictor(mod, args, out):
        seen["scores"], seen["deltas"] = out[0].dtype, out[1].dtype

    def on_rpn_head(mod, args, out):
        seen["rpn_deltas"] = out[1][0].dtype

    model.roi_heads.register_forward_pre_hook(on_roi_heads, with_kwargs=True)
    model.roi_heads.box_predictor.register_forward_hook(on_predictor)
    model.rpn.head.register_forward_hook(on_rpn_head)
    images = [torch.randn(3, 64, 64), torch.randn(3, 64, 96)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([1]), "masks": torch.ones(1, 64, 64)},
        {"boxes": torch.tensor([[10.0, 8.0, 90.0, 60.0]]), "labels": torch.tensor([2]), "masks": torch.ones(1, 64, 96)},
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.losses(images, targets)
        assert seen["features"] == torch.bfloat16  # autocast is on: the convs ran in bf16
        assert seen["proposals"] == seen["rpn_deltas"] == seen["deltas"] == seen["scores"] == torch.float32
        assert all(v.dtype == torch.float32 for v in losses.values())
        model.eval()
        dets = model(images)
    assert all(d["boxes"].dtype == torch.float32 for d in dets)


def test_mmdet_l1_box_losses(data_root) -> None:
    from vit_adapter.models.heads.rcnn_parts import rcnn_box_losses

    _, model = _tiny_detector(data_root, "head.box_loss=l1")
    assert model.rpn.box_loss == "l1" and model.roi_heads.box_loss == "l1"
    # RPN on hand-made anchors: 2 positives, 1 negative, 1 ignored; every candidate is sampled (256 per image).
    obj = torch.tensor([0.5, -1.0, 2.0, 0.0])
    pred = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0], [-0.5, 0.0, 0.5, 0.0], [9.0, 9.0, 9.0, 9.0]])
    target = torch.zeros(4, 4)
    labels = [torch.tensor([1.0, 0.0, 1.0, -1.0])]
    _, box = model.rpn.compute_loss(obj, pred, labels, [target])
    assert box.item() == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 0.5 + 0.5) / 3)
    # RoI head: L1 of the true class's deltas over all sampled RoIs, while the smooth-L1 default is unchanged.
    logits = torch.zeros(3, 3)
    deltas = torch.zeros(3, 12)
    deltas[0, 4:8] = torch.tensor([0.5, -0.5, 0.05, 0.0])
    roi_labels = [torch.tensor([1, 0, 2])]
    roi_targets = [torch.zeros(3, 4)]
    _, l1 = rcnn_box_losses(logits, deltas, roi_labels, roi_targets, "l1")
    cls, smooth = rcnn_box_losses(logits, deltas, roi_labels, roi_targets, "smooth_l1")
    assert l1.item() == pytest.approx(1.05 / 3)
    assert smooth.item() == pytest.approx((0.5 - 0.5 / 9 + 0.5 - 0.5 / 9 + 0.5 * 0.05**2 * 9) / 3)
    # The smooth-L1 kind is torchvision's own RoI loss, bit for bit.
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    tv_cls, tv_box = fastrcnn_loss(logits, deltas, roi_labels, roi_targets)
    assert torch.equal(cls, tv_cls) and torch.equal(smooth, tv_box)
    _, default = _tiny_detector(data_root)
    assert default.rpn.box_loss == "smooth_l1" and default.roi_heads.box_loss == "smooth_l1"
    # The RoI heads' forward uses its own kind: the same sampled RoIs give an L1 loss for one, smooth-L1 for the other.
    default.load_state_dict(model.state_dict())
    images = [torch.randn(3, 64, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([1]), "masks": torch.ones(1, 64, 64)}
    ]
    torch.manual_seed(1)
    got_l1 = model.losses(images, targets)
    torch.manual_seed(1)
    got_smooth = default.losses(images, targets)
    assert got_l1["loss_classifier"] == got_smooth["loss_classifier"]
    assert got_l1["loss_box_reg"] > got_smooth["loss_box_reg"] > 0  # |d| > smooth-L1(d) for every delta


def test_aligned_roi_align_is_selectable(data_root) -> None:
    from torchvision.ops import MultiScaleRoIAlign, roi_align

    _, aligned = _tiny_detector(data_root, "head.roi_align_aligned=true")
    _, plain = _tiny_detector(data_root)
    assert type(plain.roi_heads.box_roi_pool) is MultiScaleRoIAlign
    pool = aligned.roi_heads.box_roi_pool
    feats = {str(i): torch.randn(1, 4, 64 // 2 ** (i + 2), 64 // 2 ** (i + 2)) for i in range(4)}
    boxes = [torch.tensor([[3.0, 5.0, 30.0, 40.0]])]  # sqrt(area) < 112: level 0 (stride 4)
    out = pool(feats, boxes, [(64, 64)])
    ref = roi_align(feats["0"], [boxes[0]], 7, spatial_scale=0.25, sampling_ratio=0, aligned=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.equal(plain.roi_heads.box_roi_pool(feats, boxes, [(64, 64)]), ref)


def test_coco_profiles_use_mmdet_box_math_and_group_by_aspect() -> None:
    for size in "tsbl":
        cfg = load_config(f"coco_maskrcnn_1x_{size}")
        assert cfg.head.box_loss == "l1" and cfg.head.roi_align_aligned and cfg.data.group_by_aspect


# ---------------------------------------------------------------------------------------------------------
# Optimiser, normalisation, classes, FLOPs


def test_layer_decay_profiles_use_the_official_no_decay_rule() -> None:
    from vit_adapter.engine.optim import param_groups

    toy = ["model.depth=4", "model.embed_dim=64", "model.num_heads=2", "model.deform_num_heads=2"]
    cfg = load_config("ade20k_upernet_160k_s", [], toy)
    assert cfg.optim.no_decay_rule == "ndim_or_bias" and cfg.optim.layer_decay is not None
    with torch.device("meta"):
        model = build_model(cfg)
    groups = param_groups(
        model,
        lr=1.0,
        weight_decay=0.05,
        no_decay=cfg.optim.no_decay,
        layer_decay=0.9,
        num_layers=4,
        no_decay_rule="ndim_or_bias",
    )
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    params = dict(model.named_parameters())
    # The official name check ("pos_embed") never matches the prefixed names: pos_embed and level_embed decay.
    assert any(n.endswith("pos_embed") for n in decayed) and any(n.endswith("level_embed") for n in decayed)
    for name in params:
        if params[name].ndim == 1 or name.endswith(".bias"):
            assert name not in decayed, name
        else:
            assert name in decayed, name
    assert load_config("coco_maskrcnn_1x_l").optim.no_decay_rule == "ndim_or_bias"
    assert load_config("coco_maskrcnn_1x_s").optim.no_decay_rule == "names"  # no layer decay: the name list


def test_vit_l_profiles_normalise_with_127_5() -> None:
    for name in ("coco_maskrcnn_1x_l", "ade20k_upernet_160k_l"):
        cfg = load_config(name)
        assert cfg.data.norm_mean == [127.5] * 3 and cfg.data.norm_std == [127.5] * 3
    assert load_config("coco_maskrcnn_1x_s").data.norm_mean is None  # DeiT: ImageNet statistics


def test_normalisation_reaches_the_transforms(data_root) -> None:
    base = tiny_sets(data_root, "seg")
    ref, _, _ = build_datasets(load_config("cpu_default", [], base), 0)
    l_like, _, _ = build_datasets(
        load_config(
            "cpu_default", [], [*base, "data.norm_mean=[127.5,127.5,127.5]", "data.norm_std=[127.5,127.5,127.5]"]
        ),
        0,
    )
    img = l_like[0][0]
    assert img.min() >= -1.0 - 1e-6 and img.max() <= 1.0 + 1e-6 and not torch.equal(img, ref[0][0])


def test_coco_class_count_is_checked(tmp_path, data_root, capsys) -> None:
    out = tmp_path / "run"
    sets = tiny_sets(data_root, "det", iters=1, extra=["head.num_classes=80"])
    code = main(
        ["train", "--config", "cpu_default", "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "head.num_classes is 80" in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not out.with_name("run.partial").exists()


def test_flops_count_attention(data_root) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    # Plain ViT (no adapter), no windows: attention adds 2 matmuls of 2*N^2*D FLOPs per block.
    sets = tiny_sets(data_root, "seg", extra=["model.preset=vit_cpu", "model.window_attn=false"])
    cfg = load_config("cpu_default", [], sets)
    model = build_model(cfg)
    counted = count_flops(model, cfg, torch.device("cpu"))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.backbone_module(torch.zeros(1, 3, 64, 64))
    n, dim, depth = (64 // 16) ** 2, cfg.model.embed_dim, model.backbone_module.depth
    assert counted - fc.get_total_flops() == depth * 2 * 2 * n * n * dim


def test_amp_settings_reach_autocast_and_the_grad_scaler() -> None:
    import warnings

    from vit_adapter.engine.amp import autocast, make_grad_scaler

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fp16 = load_config("ade20k_upernet_160k_s")  # DeiT UperNet: fp16 with loss scale 512 (reference §2)
    assert (fp16.train.amp, fp16.train.amp_dtype, fp16.train.loss_scale, fp16.train.tf32) == (True, "fp16", 512, True)
    assert make_grad_scaler(fp16, cpu) is None  # CPU: no autocast, nothing to scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constructing CUDA objects on a CPU-only machine warns
        scaler = make_grad_scaler(fp16, cuda)
        assert isinstance(scaler, torch.amp.GradScaler)  # enabled on a CUDA machine (disabled here: no CUDA)
        assert autocast(fp16, cuda).fast_dtype == torch.float16
        bf16 = load_config("cpu_default", [], ["train.amp=true", "train.amp_dtype=bf16"])
        assert make_grad_scaler(bf16, cuda) is None and autocast(bf16, cuda).fast_dtype == torch.bfloat16


def test_syncbn_is_the_default_under_ddp_on_cuda() -> None:
    from vit_adapter.engine.distributed import use_syncbn

    paper = load_config("coco_maskrcnn_1x_s")  # model.norm null
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert paper.model.norm is None
    assert use_syncbn(paper, 8, cuda) and not use_syncbn(paper, 1, cuda) and not use_syncbn(paper, 2, cpu)
    bn = load_config("coco_maskrcnn_1x_s", [], ["model.norm=bn"])
    assert not use_syncbn(bn, 8, cuda)
    assert not use_syncbn(load_config("cpu_default"), 2, cuda)  # the CPU default says bn explicitly
