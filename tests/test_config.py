"""Config system (profiles + overlays + --set), the shipped YAML files, and the run-directory utilities."""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vit_adapter.engine import rundir
from vit_adapter.engine.config import (
    ABLATIONS_DIR,
    EXECUTION_KEYS,
    EXPERIMENTS_DIR,
    Config,
    ConfigError,
    add_config_args,
    config_from_args,
    config_from_dict,
    config_hash,
    load_config,
    model_overrides,
    parse_set,
    save_config,
)
from vit_adapter.utils import io as utils_io

PROFILES = sorted(EXPERIMENTS_DIR.glob("*.yaml"))
OVERLAYS = sorted(ABLATIONS_DIR.glob("*.yaml"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------
# Shipped profiles and overlays
# ---------------------------------------------------------------------------------------------------------


def test_expected_files_exist() -> None:
    names = {p.stem for p in PROFILES}
    for size in "tsbl":
        assert f"coco_maskrcnn_1x_{size}" in names
        assert f"ade20k_upernet_160k_{size}" in names
    assert {"cpu_default", "ade20k_semfpn_80k_t", "ade20k_semfpn_80k_s", "ade20k_semfpn_80k_b"} <= names
    from vit_adapter.analysis.registry import load_registry

    assert {p.stem for p in OVERLAYS} == set(load_registry().names)  # the registry lists every overlay


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_profile_loads(profile: Path) -> None:
    cfg = load_config(profile)
    assert isinstance(cfg, Config)
    # Every key written in the file ends up in the resolved config with the file's value.
    raw = yaml.safe_load(profile.read_text())
    resolved = cfg.to_dict()
    for section, values in raw.items():
        for key, value in (values or {}).items():
            if isinstance(value, float) or isinstance(resolved[section][key], float):
                assert resolved[section][key] == pytest.approx(float(value)), f"{section}.{key}"
            else:
                assert resolved[section][key] == value, f"{section}.{key}"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_every_overlay_touches_only_model_and_loads(overlay: Path) -> None:
    raw = yaml.safe_load(overlay.read_text())
    # structural flags only; the pretraining check also changes the initialisation, nothing else
    scratch = overlay.stem.endswith("_scratch")
    assert set(raw) == ({"model", "weights"} if scratch else {"model"})
    if scratch:
        assert raw["weights"] == {"init": "scratch"}
    text = overlay.read_text()
    assert "Table 6" in text or "Table 7" in text or "ours" in text  # the comment names the paper row
    for profile in ("cpu_default", "coco_maskrcnn_1x_s"):
        cfg = load_config(profile, [overlay])
        for key, value in raw["model"].items():
            assert getattr(cfg.model, key) == value


# The ablation table (reference §7), written out independently of the YAML files.
ABLATION_TABLE = {
    #                  use_spm, injector,   extractor, neck,      attention,    N
    "baseline": (False, "none", False, "baseline", None, 0),
    "variant1_add": (True, "add", False, "baseline", None, 0),
    "variant2_injector": (True, "attention", False, "baseline", "deformable", 4),
    "full": (True, "attention", True, "adapter", "deformable", 4),
    "no_spm": (False, "attention", True, "adapter", "deformable", 4),
    "no_injector": (True, "none", True, "adapter", "deformable", 4),
    "dense_attention": (True, "attention", True, "adapter", "dense", 4),
    "n1": (True, "attention", True, "adapter", "deformable", 1),
    "n2": (True, "attention", True, "adapter", "deformable", 2),
    "n6": (True, "attention", True, "adapter", "deformable", 6),
    "baseline_compute_matched": (False, "none", False, "baseline", None, 0),
    "baseline_scratch": (False, "none", False, "baseline", None, 0),
    "full_scratch": (True, "attention", True, "adapter", "deformable", 4),
}


@pytest.mark.parametrize("name", sorted(ABLATION_TABLE))
def test_overlay_matches_ablation_table(name: str) -> None:
    m = load_config("cpu_default", [name]).model  # bare names resolve to ablations/<name>.yaml
    use_spm, injector, extractor, neck, attention, n = ABLATION_TABLE[name]
    assert (m.use_spm, m.injector, m.use_extractor, m.output_neck, m.n_interactions) == (
        use_spm,
        injector,
        extractor,
        neck,
        n,
    )
    if attention is not None:
        assert m.attention == attention
    # The 2 extra extractors exist exactly when the extractor does (reference §1.8).
    assert m.extra_extractors == (2 if extractor else 0)


def test_overlays_are_order_independent() -> None:
    a = load_config("cpu_default", ["dense_attention", "baseline"])
    b = load_config("cpu_default", ["n1", "baseline"])
    assert model_overrides(a) == model_overrides(b)


def test_paper_hyperparameters() -> None:
    s = load_config("coco_maskrcnn_1x_s")
    assert (s.optim.lr, s.optim.weight_decay, s.data.batch_size) == (1e-4, 0.05, 16)
    assert s.train.max_iters == 12 * 7330 and s.optim.milestones == [8 * 7330, 11 * 7330]
    assert (s.optim.warmup_iters, s.optim.warmup_ratio, s.data.img_scale) == (500, 1e-3, [1333, 800])
    assert s.model.window_attn is True and s.head.num_classes == 80
    t = load_config("coco_maskrcnn_1x_t")
    assert (t.optim.lr, t.optim.weight_decay) == (2e-4, 0.01)  # official T config (documented choice)
    big = load_config("coco_maskrcnn_1x_l")
    assert big.optim.layer_decay == 0.8 and big.model.with_cp is True
    lrs = {size: load_config(f"ade20k_upernet_160k_{size}").optim for size in "tsbl"}
    assert [lrs[k].lr for k in "tsbl"] == [12e-5, 6e-5, 6e-5, 2e-5]
    assert [lrs[k].weight_decay for k in "tsbl"] == [0.01, 0.01, 0.01, 0.05]
    up = load_config("ade20k_upernet_160k_b")
    assert (up.optim.schedule, up.optim.power, up.optim.warmup_iters, up.optim.warmup_ratio) == (
        "poly",
        1.0,
        1500,
        1e-6,
    )
    assert (up.train.max_iters, up.head.channels, up.head.aux_weight) == (160000, 512, 0.4)
    assert up.data.image_size == 512
    assert up.model.window_attn is False and up.optim.layer_decay == 0.95
    fpn = load_config("ade20k_semfpn_80k_s")
    assert (fpn.head.type, fpn.optim.weight_decay, fpn.optim.power) == ("semfpn", 1e-4, 0.9)
    # 40k iterations at batch 16 = the paper's "80k" at batch 8 (reference §6): same number of images.
    assert fpn.train.max_iters * fpn.data.batch_size == 80000 * 8


# ---------------------------------------------------------------------------------------------------------
# Layering and --set
# ---------------------------------------------------------------------------------------------------------


def test_defaults_without_profile() -> None:
    assert load_config(None) == Config()


def test_set_values_are_yaml_parsed() -> None:
    cfg = load_config(
        "cpu_default",
        sets=[
            "optim.lr=1e-4",  # YAML 1.1 would read this as a string
            "model.use_spm=false",
            "head.anchor_sizes=[4, 8]",
            "model.n_interactions=null",
            "optim.clip_grad=1",  # int accepted for a float field, stored as float
            "data.root=/tmp/x",
        ],
    )
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.use_spm is False
    assert cfg.head.anchor_sizes == [4, 8]
    assert cfg.model.n_interactions is None
    assert cfg.optim.clip_grad == 1.0 and isinstance(cfg.optim.clip_grad, float)
    assert cfg.data.root == "/tmp/x"


def test_yaml_file_exponent_float(tmp_path: Path) -> None:
    prof = _write(tmp_path / "p.yaml", "optim:\n  lr: 3e-4\n  betas: [0.9, 0.95]\n")
    cfg = load_config(prof)
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.95)


def test_layers_apply_in_order(tmp_path: Path) -> None:
    a = _write(
        tmp_path / "a.yaml",
        "train:\n  seed: 1\n  max_iters: 10\ndata:\n  generator: {small_prob: 0.1, thin_prob: 0.2}\n",
    )
    b = _write(tmp_path / "b.yaml", "train:\n  seed: 2\ndata:\n  generator: {thin_prob: 0.3}\n")
    cfg = load_config("cpu_default", [a, b], ["train.seed=3", "data.generator.noise_std=4"])
    assert cfg.train.seed == 3  # --set beats overlays
    assert cfg.train.max_iters == 10  # untouched by b
    assert cfg.data.generator == {"small_prob": 0.1, "thin_prob": 0.3, "noise_std": 4}  # nested dicts merge key by key
    assert load_config("cpu_default", [b, a]).train.seed == 1


def test_unknown_key_names_file_and_suggests(tmp_path: Path) -> None:
    bad = _write(tmp_path / "typo.yaml", "model:\n  use_sp: true\n")
    with pytest.raises(ConfigError) as err:
        load_config("cpu_default", [bad])
    msg = str(err.value)
    assert "model.use_sp" in msg and str(bad) in msg and "use_spm" in msg and "\n" not in msg


def test_unknown_section_and_set_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown section 'optimizer'.*--set.*did you mean 'optim'"):
        load_config(None, sets=["optimizer.lr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.max_iter' in --set train\.max_iter;.*'max_iters'"):
        load_config(None, sets=["train.max_iter=5"])


def test_type_errors_name_key_value_and_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.injector = 'concat' \(from --set model\.injector\) .*'add'"):
        load_config(None, sets=["model.injector=concat"])
    with pytest.raises(ConfigError, match=r"train\.max_iters = True .*an int"):
        load_config(None, sets=["train.max_iters=true"])  # bool is not an int
    with pytest.raises(ConfigError, match=r"train\.max_iters = 1\.5"):
        load_config(None, sets=["train.max_iters=1.5"])
    with pytest.raises(ConfigError, match=r"optim\.lr = 'fast'"):
        load_config(None, sets=["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"model\.use_spm = 1 .*bool"):
        load_config(None, sets=["model.use_spm=1"])
    with pytest.raises(ConfigError, match=r"optim\.betas .*2 values"):
        load_config(None, sets=["optim.betas=[0.9]"])
    bad = _write(tmp_path / "bad.yaml", "data:\n  batch_size: '16'\n")
    with pytest.raises(ConfigError, match=rf"data\.batch_size = '16' \(from {bad}\)"):
        load_config(None, [bad])


def test_consistency_checks() -> None:
    with pytest.raises(ConfigError, match=r"data\.label_mode.*num_classes 2"):
        load_config("cpu_default", sets=["head.num_classes=11"])
    assert load_config("cpu_default", sets=["head.num_classes=11", "data.label_mode=classes"]).head.num_classes == 11
    with pytest.raises(ConfigError, match=r"head\.type = 'semfpn'.*'det'"):
        load_config("cpu_default", sets=["model.task=det"])
    with pytest.raises(ConfigError, match=r"data\.image_size = 100 .*multiple of 32"):
        load_config(None, sets=["data.image_size=100"])
    with pytest.raises(ConfigError, match=r"optim\.milestones"):
        load_config(None, sets=["optim.milestones=[50, 10]"])
    with pytest.raises(ConfigError, match=r"weights\.source"):
        load_config(None, sets=["weights.init=pretrained"])
    # A consistent switch of all three is fine.
    cfg = load_config("cpu_default", sets=["model.task=det", "head.type=mask_rcnn", "data.label_mode=classes"])
    assert cfg.model.task == "det"


def test_malformed_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_set("train.seed")
    with pytest.raises(ConfigError, match="dotted as section.key"):
        parse_set("seed=1")
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_profile")
    dup = _write(tmp_path / "dup.yaml", "train:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: invalid YAML: .*duplicate key 'seed'"):
        load_config(dup)
    lst = _write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------------------------------------
# Serialisation, identity, factory glue
# ---------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_hash(tmp_path: Path) -> None:
    cfg = load_config("coco_maskrcnn_1x_s", ["n2"], ["data.generator.clutter=[1, 2]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert config_from_dict(yaml.safe_load(path.read_text())) == cfg
    assert config_hash(load_config(path)) == config_hash(cfg)
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    # Key order does not change the hash; any value does.
    reordered = {k: dict(reversed(list(v.items()))) for k, v in reversed(list(cfg.to_dict().items()))}
    assert config_hash(config_from_dict(reordered)) == config_hash(cfg)
    assert config_hash(load_config("coco_maskrcnn_1x_s", ["n2"], ["train.seed=1"])) != config_hash(cfg)
    assert len(config_hash(cfg)) == 64
    # Execution-only settings can be left out of the identity (resume on another machine).
    moved = load_config("coco_maskrcnn_1x_s", ["n2"], ["data.generator.clutter=[1, 2]", "train.threads=1"])
    assert config_hash(moved) != config_hash(cfg)
    assert config_hash(moved, exclude=EXECUTION_KEYS) == config_hash(cfg, exclude=EXECUTION_KEYS)
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        config_hash(cfg, exclude=["train.nope"])


def test_model_overrides() -> None:
    assert model_overrides(load_config(None)) == {}
    cfg = load_config("cpu_default", ["variant1_add"], ["model.gamma_init=0.5"])
    over = model_overrides(cfg)
    assert "preset" not in over and "task" not in over and "attention" not in over  # None dropped
    assert over == {
        "use_spm": True,
        "injector": "add",
        "use_extractor": False,
        "extra_extractors": 0,
        "output_neck": "baseline",
        "n_interactions": 0,
        "norm": "bn",
        "gamma_init": 0.5,
    }


def test_model_fields_match_the_model_constructor() -> None:
    # Every model flag must be a ViTAdapter constructor argument, so create_model(**model_overrides) never
    # fails on a name; and every constructor argument must be configurable.
    import dataclasses
    import inspect

    from vit_adapter.engine.config import ModelConfig
    from vit_adapter.models.adapter import ViTAdapter

    ctor = set(inspect.signature(ViTAdapter.__init__).parameters) - {"self"}
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"preset"}
    assert fields == ctor


def test_argparse_glue() -> None:
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    ns = parser.parse_args(["--ablation", "n1", "--set", "train.seed=7", "--set", "optim.lr=3e-4"])
    cfg = config_from_args(ns)
    assert (cfg.model.n_interactions, cfg.train.seed, cfg.optim.lr) == (1, 7, 3e-4)
    assert cfg.data.dataset == "generated"  # --config defaults to cpu_default


# ---------------------------------------------------------------------------------------------------------
# Atomic writes (vit_adapter/utils/io.py) and run directories (vit_adapter/engine/rundir.py)
# ---------------------------------------------------------------------------------------------------------


def test_atomic_writes(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "m.json"
    utils_io.atomic_write_json(target, {"b": 1, "a": [1.5]})
    assert json.loads(target.read_text()) == {"a": [1.5], "b": 1}
    utils_io.atomic_write_bytes(tmp_path / "x.bin", b"\x00\x01")
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\x01"
    # A failure mid-write keeps the old file and leaves no temp file.
    with pytest.raises(RuntimeError), utils_io.atomic_open(target, "w") as fh:
        fh.write("partial")
        raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"a": [1.5], "b": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.json"]
    with pytest.raises(ValueError):
        utils_io.atomic_write_json(target, {"x": float("nan")})
    assert json.loads(target.read_text()) == {"a": [1.5], "b": 1}


def test_run_dir_lifecycle(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "full-0"
    run = rundir.open_run_dir(out, "hash-a")
    assert run.work.is_dir() and not out.exists() and not run.resumed
    rundir.atomic_torch_save({"it": 20}, run.checkpoint_path(20))
    rundir.atomic_torch_save({"it": 100}, run.checkpoint_path(100))
    (run.checkpoint_dir / ".iter_00000120.pt.abc.tmp").write_bytes(b"junk")  # a killed save
    run.release()  # the writer ended (a killed process loses its flock the same way)
    # Interrupted: the same config resumes from the newest complete checkpoint; the killed save's temp goes.
    again = rundir.open_run_dir(out, "hash-a")
    assert again.resumed and not (again.checkpoint_dir / ".iter_00000120.pt.abc.tmp").exists()
    assert torch.load(again.latest_checkpoint(), weights_only=True) == {"it": 100}
    assert [i for i, _ in again.checkpoints()] == [20, 100]
    with pytest.raises(rundir.RunDirError, match=rf"in use by another writer \(PID {os.getpid()}\)"):
        rundir.open_run_dir(out, "hash-a")  # one writer at a time, even within one process
    again.release()
    with pytest.raises(rundir.RunDirError, match="another config"):
        rundir.open_run_dir(out, "hash-b")
    again = rundir.open_run_dir(out, "hash-a")
    again.prune_checkpoints(keep=1)
    assert [i for i, _ in again.checkpoints()] == [100]
    rundir.atomic_write_text(again.path("metrics.json"), "{}")
    assert again.finalize() == out
    assert (out / "metrics.json").is_file() and not again.work.exists()
    again.release()
    # A finished run is not overwritten unless asked; when asked, the old one stays until finalize.
    with pytest.raises(rundir.RunDirError, match="finished run"):
        rundir.open_run_dir(out, "hash-a")
    fresh = rundir.open_run_dir(out, "hash-b", overwrite=True)
    assert (out / "metrics.json").is_file()
    rundir.atomic_write_text(fresh.path("new.txt"), "x")
    fresh.finalize()
    fresh.release()
    assert (out / "new.txt").is_file() and not (out / "metrics.json").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["full-0"]  # no lock file, no temp left


def test_run_dir_status_and_discard(tmp_path: Path) -> None:
    """The one "finished / resumable / gone" test that pipeline and sweep use (no `.partial` literals there)."""
    out = tmp_path / "full-0"
    assert rundir.RunDir(out).status() == "absent" and rundir.RunDir(out).work_identity() is None
    run = rundir.open_run_dir(out, "hash-a")
    run.release()
    assert run.status() == "partial" and run.work_identity() == "hash-a"
    run.discard(finished=False)
    assert run.status() == "absent"
    run = rundir.open_run_dir(out, "hash-a")
    rundir.atomic_write_text(run.path(rundir.METRICS_FILE), "{}")
    run.finalize()
    run.release()
    assert rundir.RunDir(out).status() == "finished"
    later = rundir.open_run_dir(out, "hash-b", overwrite=True)  # a newer attempt beside the finished run
    later.release()
    later.discard(finished=False)
    assert later.status() == "finished" and not later.work.exists()
    (out / rundir.METRICS_FILE).unlink()
    assert later.status() == "damaged"
    later.discard()
    assert later.status() == "absent" and not out.exists()


def test_run_dir_no_resume_starts_fresh(tmp_path: Path) -> None:
    run = rundir.open_run_dir(tmp_path / "r", "h")
    rundir.atomic_torch_save({}, run.checkpoint_path(5))
    run.release()
    fresh = rundir.open_run_dir(tmp_path / "r", "other", resume=False)
    assert not fresh.resumed and fresh.latest_checkpoint() is None
    assert (fresh.work / rundir.IDENTITY_FILE).read_text().strip() == "other"


def test_git_state_ignores_the_pipelines_own_outputs(tmp_path: Path) -> None:
    """A run regenerated by `dvc repro` sees results/, weights/ and dvc.lock changing under it; only code and
    config changes make it "dirty" (the report says whether the runs came from committed code)."""
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True)

    git("init", "-q")
    for rel in ("params.yaml", "dvc.lock", "results/metrics.json", "vit_adapter/model.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("v1\n")
    git("add", ".")
    git("commit", "-q", "-m", "init")
    assert rundir.git_state(tmp_path)["dirty"] is False
    for rel in ("dvc.lock", "results/metrics.json", "results/runs/full/s0/run.json", "weights/w.safetensors"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("v2\n")
    assert rundir.git_state(tmp_path)["dirty"] is False
    (tmp_path / "vit_adapter" / "model.py").write_text("v2\n")
    assert rundir.git_state(tmp_path)["dirty"] is True


def test_run_metadata() -> None:
    meta = rundir.run_metadata(git=False)  # git is a subprocess; covered by the pipeline, not here
    assert meta["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert meta["versions"]["numpy"] == np.__version__
    assert meta["torch_threads"] == torch.get_num_threads()
    assert meta["utc_time"].endswith("+00:00") and meta["hostname"]
    assert "git" not in meta
    json.dumps(meta)  # serialisable as-is


@pytest.fixture
def _restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.usefixtures("_restore_determinism")
def test_set_determinism() -> None:
    def draw() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    rundir.set_determinism(123)
    first = draw()
    assert torch.are_deterministic_algorithms_enabled()
    rundir.set_determinism(123)
    assert draw() == first
    rundir.set_determinism(124, deterministic=False)
    assert draw() != first
    assert not torch.are_deterministic_algorithms_enabled()
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG")
