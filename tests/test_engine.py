"""The engine end to end on tiny generated data: overfitting, exact resume, determinism, bad input, parameter
totals with heads (paper Tables 1, 6, 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vit_adapter
from vit_adapter.cli import main
from vit_adapter.data import generate_dataset
from vit_adapter.engine.config import load_config
from vit_adapter.engine.hooks import Callbacks, StopTraining
from vit_adapter.engine.trainer import train

BASELINE = [
    "model.n_interactions=0",
    "model.use_spm=false",
    "model.injector=none",
    "model.use_extractor=false",
    "model.output_neck=baseline",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "gen"
    generate_dataset(root, n_train=8, n_val=4, image_size=64, seed=0, objects_per_image=(2, 3))
    return root


def tiny_sets(root: Path, task: str, iters: int = 20, extra: list[str] | None = None) -> list[str]:
    sets = [
        f"model.task={task}",
        f"data.root={root}",
        "data.image_size=64",
        "data.n_train=4",
        "data.n_val=4",
        "data.batch_size=4",
        "data.flip=false",  # one fixed batch, every iteration
        "model.embed_dim=64",
        "model.num_heads=2",
        "model.deform_num_heads=2",
        "model.conv_inplane=16",
        "model.pretrain_size=64",
        "model.drop_path_rate=0.0",
        "optim.lr=1e-3",
        "optim.warmup_iters=0",
        "optim.milestones=[]",
        f"train.max_iters={iters}",
        f"train.eval_interval={iters}",
        f"train.checkpoint_interval={max(1, iters // 2)}",
        "train.log_interval=1",
        "train.threads=1",
        "weights.init=scratch",
        "data.label_mode=classes",  # the 11 stored classes (the CPU default segments object vs background)
    ]
    if task == "seg":
        sets += ["head.type=semfpn", "head.num_classes=11", "head.channels=32", "head.fpn_channels=32"]
    else:
        sets += [
            "head.type=mask_rcnn",
            "head.num_classes=10",
            "head.fpn_channels=32",
            "head.representation_size=64",
            "head.mask_channels=32",
            "head.mask_convs=1",
            "head.anchor_sizes=[8,16,32,64,128]",
            "head.rpn_batch_size_per_image=64",
            "head.box_batch_size_per_image=64",
        ]
    return sets + (extra or [])


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", ["seg", "det"])
@pytest.mark.parametrize("variant", ["full", "baseline"])
def test_overfit_one_batch_then_evaluate(tmp_path, data_root, task: str, variant: str) -> None:
    cfg = load_config("cpu_default", [], tiny_sets(data_root, task, extra=BASELINE if variant == "baseline" else []))
    out = tmp_path / "run"
    result = train(cfg, out, progress=False)
    losses = _losses(out)
    assert len(losses) == 20 and losses[-1] < 0.9 * losses[0], losses
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))  # what train() returned is what it wrote
    keys = {"mIoU", "mAcc", "aAcc"} if task == "seg" else {"bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_75"}
    assert keys <= set(metrics["final"]) and metrics["history"][-1]["iter"] == 20
    if task == "seg":
        assert 0 <= metrics["final"]["mIoU"] <= 100
    costs = json.loads((out / "costs.json").read_text())
    assert costs["params"]["total"] == sum(costs["params"][k] for k in ("vit", "adapter", "head"))
    assert costs["flops_backbone_forward"] > 0 and costs["train_images_per_s"] > 0
    assert (out / "config.yaml").is_file() and (out / "run.json").is_file()
    assert not out.with_name("run.partial").exists()


def test_resume_is_bit_exact_and_seed_is_deterministic(tmp_path, data_root) -> None:
    # Flip on and 8 training images: the data order and the augmentations matter across the interruption.
    sets = tiny_sets(
        data_root,
        "seg",
        iters=8,
        extra=[
            "data.flip=true",
            "data.n_train=8",
            "train.eval_interval=4",
            "train.checkpoint_interval=4",
            "model.drop_path_rate=0.1",
        ],
    )
    cfg = load_config("cpu_default", [], sets)
    straight = tmp_path / "straight"
    train(cfg, straight, progress=False)

    def stop_after_first_epoch(it: int) -> None:  # 8 images / batch 4 = 2 iterations per epoch
        if it == 4:
            raise StopTraining("test interruption")

    resumed = tmp_path / "resumed"
    with pytest.raises(StopTraining):
        train(cfg, resumed, progress=False, hooks=[Callbacks(after_iteration=stop_after_first_epoch)])
    assert resumed.with_name("resumed.partial").is_dir() and not resumed.exists()
    train(cfg, resumed, progress=False)
    assert (resumed / "metrics.json").read_bytes() == (straight / "metrics.json").read_bytes()
    assert _losses(resumed) == _losses(straight)
    assert json.loads((resumed / "run.json").read_text())["resumed_from_iteration"] == 4

    again = tmp_path / "again"
    train(cfg, again, progress=False)
    assert (again / "metrics.json").read_bytes() == (straight / "metrics.json").read_bytes()


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_bad_input_is_one_line_exit_2_and_leaves_no_run_dir(tmp_path, data_root, capsys) -> None:
    out = tmp_path / "run"
    base = ["train", "--config", "cpu_default", "--out", str(out), "--quiet"]
    sets = [a for s in tiny_sets(data_root, "seg", iters=2) for a in ("--set", s)]

    cases = {
        "missing dataset": (["--set", f"data.root={tmp_path / 'nope'}"], "dataset directory not found"),
        "unknown key": (["--set", "train.max_iter=3"], "train.max_iter"),
        "N > depth": (["--set", "model.n_interactions=8"], "n_interactions"),
    }
    weights = tmp_path / "w.pth"
    torch.save({"pos_embed": torch.zeros(1, 17, 64)}, weights)
    cases["weights sha mismatch"] = (
        [
            "--set",
            "weights.init=pretrained",
            "--set",
            f"weights.source={weights}",
            "--set",
            "weights.sha256=" + "0" * 64,
            "--set",
            f"weights.cache_dir={tmp_path / 'cache'}",
        ],
        "sha256",
    )
    for name, (extra, needle) in cases.items():
        code, err = _run_cli(base + sets + extra, capsys)
        assert code == 2, name
        assert needle in err and len(err.splitlines()) == 1, (name, err)
        assert not out.exists() and not out.with_name("run.partial").exists(), name

    # A checkpoint from another architecture: train a baseline, evaluate its checkpoint as the full model.
    code, _ = _run_cli(base + sets + [a for s in BASELINE for a in ("--set", s)], capsys)
    assert code == 0
    ckpt = next((out / "checkpoints").glob("iter_*.pt"))
    code, err = _run_cli(["eval", "--config", "cpu_default", *sets, "--checkpoint", str(ckpt)], capsys)
    assert code == 2 and "another architecture" in err and len(err.splitlines()) == 1


def _info(capsys, name: str, *sets: str) -> dict:
    argv = ["info", name, "--task", "det", "--head", "mask_rcnn", "--json"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"]


# Paper Table 1 (ViT-Adapter / ViT + Mask R-CNN) and Tables 6-7 (ViT-S rows), reference §3.
@pytest.mark.parametrize(
    "name, sets, total_m",
    [
        ("vit_adapter_t", (), 28.1),
        ("vit_adapter_s", (), 47.8),
        ("vit_adapter_b", (), 120.2),
        ("vit_t", (), 26.1),
        ("vit_s", (), 43.8),
        ("vit_b", (), 113.6),
        ("vit_adapter_s", ("injector=add", "n_interactions=0", "use_extractor=false", "output_neck=baseline"), 45.1),
        ("vit_adapter_s", ("use_extractor=false", "output_neck=baseline"), 46.6),
        ("vit_adapter_s", ("attention=dense",), 50.3),
        ("vit_adapter_s", ("n_interactions=1",), 45.5),
        ("vit_adapter_s", ("n_interactions=2",), 46.2),
        ("vit_adapter_s", ("n_interactions=6",), 49.4),
    ],
)
def test_param_totals_with_mask_rcnn_match_paper(capsys, name: str, sets: tuple, total_m: float) -> None:
    p = _info(capsys, name, *sets)
    assert abs(p["total"] / 1e6 - total_m) < 0.2, p
    assert p["head"] > 0 and p["total"] == p["vit"] + p["adapter"] + p["head"]


def test_paper_profile_uses_80_coco_classes_plus_background() -> None:
    from vit_adapter.engine.build import build_model

    cfg = load_config("coco_maskrcnn_1x_s")
    assert cfg.head.num_classes == 80
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.roi_heads.box_predictor.cls_score.out_features == 81


# ---------------------------------------------------------------------------------------------------------
# The loop's hooks, the data path and the run directory's reuse


def test_a_checkpoint_is_on_disk_before_the_evaluation_of_its_iteration(tmp_path, data_root) -> None:
    sets = tiny_sets(data_root, "seg", iters=4, extra=["train.eval_interval=2", "train.checkpoint_interval=2"])
    cfg = load_config("cpu_default", [], sets)
    straight = tmp_path / "straight"
    train(cfg, straight, progress=False)

    def fail_first_eval(it: int, metrics: dict) -> None:  # an evaluation that dies (e.g. a collective error)
        raise RuntimeError("evaluation failed")

    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(cfg, out, progress=False, hooks=[Callbacks(after_eval=fail_first_eval)])
    ckpts = sorted(p.name for p in (out.with_name("run.partial") / "checkpoints").glob("*.pt"))
    assert ckpts == ["iter_00000002.pt"]  # saved before the evaluation, not lost with it
    train(cfg, out, progress=False)  # resumes at 2, evaluates iteration 2 first, then goes on
    assert (out / "metrics.json").read_bytes() == (straight / "metrics.json").read_bytes()
    assert _losses(out) == _losses(straight)


def test_the_grouped_epoch_order_is_computed_once_per_epoch(monkeypatch) -> None:
    from vit_adapter.engine import sampling
    from vit_adapter.engine.distributed import Dist

    calls: list[int] = []
    real = sampling.grouped_epoch_order

    def counted(groups, chunk, seed, epoch):
        calls.append(epoch)
        return real(groups, chunk, seed, epoch)

    monkeypatch.setattr(sampling, "grouped_epoch_order", counted)

    class Sizes:  # 10 images, 6 landscape and 4 portrait, as a COCO dataset's annotation sizes
        ids = list(range(10))
        coco = type("C", (), {"imgs": {i: {"width": 4 if i < 6 else 2, "height": 3} for i in range(10)}})()

        def __len__(self) -> int:
            return 10

    extra = ["data.group_by_aspect=true", "train.max_iters=12", "data.batch_size=2"]
    cfg = load_config("cpu_default", [], tiny_sets(Path("unused"), "det", extra=extra))
    schedule = sampling.Schedule(cfg, Sizes(), 2, 0, Dist())
    loop_iter, loader_iter = schedule.batches(), schedule.batches()  # the loop's and the DataLoader's
    seen = [(next(loader_iter), next(loader_iter), next(loop_iter))[2] for _ in range(6)] + list(loop_iter)
    assert len(seen) == 12 and [e for _, e, _ in seen] == [k // 5 for k in range(12)]  # 5 batches of 2 per epoch
    assert sorted(calls) == [0, 1, 2]  # once per epoch, for both iterators together
    assert [b for _, e, b in seen if e == 1] == [
        real([0] * 6 + [1] * 4, 2, cfg.train.seed, 1)[k : k + 2] for k in range(0, 10, 2)
    ]


def test_evaluation_through_dataloader_workers_gives_the_same_metrics(data_root) -> None:
    from vit_adapter.engine.build import build_datasets, build_model
    from vit_adapter.engine.evaluation import evaluate

    results = []
    for workers in (0, 2):
        cfg = load_config("cpu_default", [], tiny_sets(data_root, "seg", extra=[f"data.num_workers={workers}"]))
        _, val_set, collate = build_datasets(cfg, 0)
        torch.manual_seed(0)
        results.append(evaluate(build_model(cfg), val_set, collate, cfg, torch.device("cpu"), progress=False))
    assert results[0] == results[1] and "mIoU" in results[0]


def test_fp16_a_non_finite_loss_skips_the_step_instead_of_stopping() -> None:
    from types import SimpleNamespace

    from vit_adapter.engine.distributed import Dist
    from vit_adapter.engine.hooks import Hook, default_hooks
    from vit_adapter.engine.trainer import _step

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x, y):
            return {"loss": ((self.w * x - y) ** 2).sum()}

    class Inf(Hook):
        def after_loss(self, loop, losses) -> None:
            losses["loss"] = losses["loss"] * float("inf")

    cfg = load_config("cpu_default", [], ["optim.clip_grad=null"])
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    loop = SimpleNamespace(
        cfg=cfg, net=model, model=model, optimizer=opt, scaler=scaler, d=Dist(), device=torch.device("cpu"),
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0), done=0,
        schedule=SimpleNamespace(split=lambda idx: [idx]), train_set=[0], losses={},
        collate=lambda items: (torch.ones(3), torch.zeros(3)),
    )  # fmt: skip
    hooks = default_hooks([Inf()])
    _step(loop, [0], None, hooks)  # no DivergedError: the scaler sees inf gradients and skips the step
    assert torch.equal(model.w.detach(), torch.ones(3)) and scaler.get_scale() == 256.0
    loop.scaler = None  # fp32: the same loss stops the run
    with pytest.raises(FloatingPointError, match="loss is inf at iteration 1"):
        _step(loop, [0], None, hooks)


def test_reuse_or_reset_keeps_what_was_trained_for_this_identity(tmp_path) -> None:
    from vit_adapter.engine.rundir import IDENTITY_FILE, reuse_or_reset

    out = tmp_path / "s0"
    assert reuse_or_reset(out, "a") == "absent"
    out.mkdir()  # a finished run as the trainer leaves it: run.json records its identity
    (out / "metrics.json").write_text("{}")
    (out / "run.json").write_text(json.dumps({"identity": "a"}))
    assert reuse_or_reset(out, "a") == "finished" and out.is_dir()
    work = out.with_name("s0.partial")
    work.mkdir()
    (work / IDENTITY_FILE).write_text("b\n")
    assert reuse_or_reset(out, "b") == "partial"  # the stale finished run goes, the matching work dir resumes
    assert not out.exists() and work.is_dir()
    assert reuse_or_reset(out, "c") == "absent" and not work.exists()
    # A caller with a wider identity records it beside the run; only that marker counts then.
    assert reuse_or_reset(out, "sweep-id", record=True) == "absent"
    assert out.with_name("s0.identity").read_text().strip() == "sweep-id"


def test_one_rank_seeing_an_infinite_loss_stops_every_rank(tmp_path, data_root) -> None:
    import os
    import subprocess
    import sys

    sets = tiny_sets(data_root, "seg", iters=4, extra=["data.batch_size=2", "train.dist_timeout_s=60"])
    cfg = load_config("cpu_default", [], sets)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    helper = Path(__file__).parent / "helpers" / "ddp_diverge.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*cmd, str(helper), json.dumps(cfg.to_dict()), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ended = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert ended[1].startswith("diverged: loss is inf at iteration 2"), ended
    assert ended[0].startswith("diverged: loss is nan on another rank at iteration 2"), ended


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-only backend needs a CUDA device")
@pytest.mark.parametrize("task", ["seg", "det"])
def test_train_and_eval_under_a_cuda_only_backend(tmp_path, data_root, task: str) -> None:
    """NCCL's device rule (collectives take CUDA tensors only) on 2 processes: evaluation's confusion-matrix sum
    and every other collective must run on the group's device."""
    import os
    import subprocess
    import sys

    extra = ["data.batch_size=2", "train.device=cuda", "train.dist_timeout_s=120"]
    cfg = load_config("cpu_default", [], tiny_sets(data_root, task, iters=2, extra=extra))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    helper = Path(__file__).parent / "helpers" / "ddp_device_rule.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*cmd, str(helper), json.dumps(cfg.to_dict()), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((tmp_path / "metrics.json").read_text())
    assert ("mIoU" if task == "seg" else "bbox_mAP") in final


TENSOR_COLLECTIVES = {"all_reduce", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "broadcast"}


def test_every_tensor_collective_goes_through_the_group_device() -> None:
    """NCCL takes only CUDA tensors, so a tensor collective on a CPU tensor (the confusion matrix once was) dies
    at the first evaluation of a multi-GPU run; a CPU-only CI cannot run NCCL to see it. So: every tensor
    collective of the package is made in engine/distributed.py, whose helpers move the tensor to the group's
    device (``Dist.device``) first. Object collectives (``*_object``) pickle through the current CUDA device."""
    import ast

    package = Path(vit_adapter.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                if node.func.attr in TENSOR_COLLECTIVES and isinstance(owner, ast.Name) and owner.id == "dist":
                    found.append(f"{path.relative_to(package)}:{node.lineno}")
    assert found and all(f.startswith("engine/distributed.py:") for f in found), found
