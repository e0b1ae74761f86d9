"""Every paper profile in experiments/ trains 2 iterations and evaluates on CPU, at toy scale, through the same
code path a GPU run takes (DataLoader workers, slide inference, aspect grouping, layer decay, L1 box losses,
aligned RoIAlign, the ViT-L normalisation), so no profile can rot. Only sizes change: a narrow 4-block backbone,
64-pixel images from the generated data set (which is stored in the COCO and ADE20K layouts), global batch 2 and
randomly initialised weights (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vit_adapter.cli import main
from vit_adapter.data import generate_dataset
from vit_adapter.engine.config import EXPERIMENTS_DIR, load_config

PROFILES = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml") if p.stem != "cpu_default")

TOY = [
    "model.embed_dim=64",
    "model.depth=4",
    "model.num_heads=2",
    "model.deform_num_heads=2",
    "model.conv_inplane=16",
    "model.pretrain_size=64",
    "model.window_size=2",  # 4x4 tokens: windowed blocks still see several windows
    "data.image_size=64",
    "data.img_scale=[96,64]",
    "data.n_train=4",
    "data.n_val=2",
    "data.batch_size=2",
    "train.max_iters=2",
    "train.eval_interval=2",
    "train.checkpoint_interval=2",
    "train.log_interval=1",
    "train.threads=1",
    "train.deterministic=true",
    "optim.warmup_iters=1",
    "weights.init=scratch",
]
SEG = ["head.channels=32", "head.fpn_channels=32", "data.slide_stride=43"]
DET = [
    "head.fpn_channels=32",
    "head.representation_size=64",
    "head.mask_channels=32",
    "head.mask_convs=1",
    "head.anchor_sizes=[8,16,32,64,128]",
    "head.rpn_batch_size_per_image=64",
    "head.box_batch_size_per_image=64",
    "head.num_classes=10",  # the generated data's 10 object classes (the COCO class-count check is active)
]


def test_every_paper_profile_is_covered() -> None:
    assert len(PROFILES) == 15 and {p.split("_")[0] for p in PROFILES} == {"coco", "ade20k"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("profiles") / "gen"
    generate_dataset(root, n_train=4, n_val=2, image_size=64, seed=0, objects_per_image=(2, 3))
    return root


@pytest.mark.parametrize("profile", PROFILES)
def test_paper_profile_trains_and_evaluates(tmp_path, data_root, profile: str) -> None:
    cfg = load_config(profile)
    task_sets = (
        DET if cfg.model.task == "det" else [*SEG, f"head.num_classes={10 if cfg.data.reduce_zero_label else 11}"]
    )
    sets = [f"data.root={data_root}", *TOY, *task_sets]
    out = tmp_path / "run"
    code = main(["train", "--config", profile, "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]])
    assert code == 0
    resolved = load_config(out / "config.yaml")
    # What made the profile a paper profile survives the toy overrides.
    assert resolved.model.preset == cfg.model.preset and resolved.data.test_mode == cfg.data.test_mode
    assert resolved.optim.no_decay_rule == cfg.optim.no_decay_rule and resolved.data.num_workers == cfg.data.num_workers
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"][-1]["iter"] == 2
    key = "bbox_mAP" if cfg.model.task == "det" else "mIoU"
    assert key in metrics["final"]
    costs = json.loads((out / "costs.json").read_text())
    assert costs["flops_backbone_forward"] > 0 and "attention" in costs["flops_note"]
