"""One nested dataclass config: YAML profile + overlays (plain nested merge) + ``--set key=value``.

The layering is DINOv2-like: the dataclass holds the defaults, a profile from ``experiments/`` sets a whole
experiment, overlays (e.g. an ablation from ``ablations/``) change a few keys, and ``--set section.key=value``
changes single values last. There is no ``_base_`` inheritance and no registry: what you read in a profile is
what runs, and the resolved config is saved next to the run (see docs/config.md).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# The generic typed-YAML machinery (YAML 1.2 floats, duplicate keys, typed dataclass building) is shared with
# pretrain and sweep; ConfigError and parse_yaml stay importable from here.
from vit_adapter.config.typed import ConfigError, build_dataclass, hints, parse_yaml, read_yaml, suggest
from vit_adapter.utils.io import plain_data
from vit_adapter.utils.paths import project_root

# Profiles and overlays of the project being run (utils.paths: this checkout, else the working directory), so a
# non-editable install or another clone's editable install still reads the profiles of the tree it is run in.
EXPERIMENTS_DIR = project_root() / "experiments"
ABLATIONS_DIR = project_root() / "ablations"

Task = Literal["det", "seg"]
Preset = Literal[
    "vit_adapter_t",
    "vit_adapter_s",
    "vit_adapter_b",
    "vit_adapter_l",
    "vit_t",
    "vit_s",
    "vit_b",
    "vit_l",
    "vit_adapter_cpu",
    "vit_cpu",
]


# ---------------------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Backbone choice. Every flag defaults to None = "the preset's default" (reference §7)."""

    preset: Preset = "vit_adapter_cpu"
    task: Task = "det"
    # Ablation switches (reference §7).
    use_spm: bool | None = None
    injector: Literal["attention", "add", "none"] | None = None
    use_extractor: bool | None = None
    output_neck: Literal["adapter", "baseline"] | None = None
    attention: Literal["deformable", "dense"] | None = None
    n_interactions: int | None = None
    extra_extractors: int | None = None
    # Module hyper-parameters (reference §1, §2).
    gamma_init: float | None = None
    cffn_ratio: float | None = None
    with_cffn: bool | None = None
    n_points: int | None = None
    deform_ratio: float | None = None
    drop_path_rate: float | None = None
    window_attn: bool | None = None
    layer_scale: bool | None = None
    norm: Literal["bn", "syncbn"] | None = None
    with_cp: bool | None = None
    pretrain_size: int | None = None
    add_vit_feature: bool | None = None  # add the ViT tokens to the adapter outputs (reference §1.6)
    window_size: int | None = None  # 14 in the official detection configs (reference §1.1)
    mlp_ratio: float | None = None
    # Architecture (None = preset).
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    deform_num_heads: int | None = None
    conv_inplane: int | None = None
    patch_size: int | None = None


@dataclass
class HeadConfig:
    """Task head. Detection = Mask R-CNN; segmentation = UperNet or Semantic FPN."""

    type: Literal["mask_rcnn", "upernet", "semfpn"] = "mask_rcnn"
    num_classes: int = 10
    channels: int = 256  # decode-head channels (UperNet 512, reference §2)
    aux_weight: float = 0.4  # UperNet auxiliary FCN head loss weight (reference §2); 0 = no aux head
    aux_in_index: int = 2  # which backbone level feeds the aux head (reference §2)
    fpn_channels: int = 256  # FPN neck width (reference §2, §6)
    # Segmentation: per-class cross-entropy weights (mmseg's class_weight), one per class; None = unweighted.
    class_weight: list[float] | None = None
    # Mask R-CNN (torchvision naming; defaults follow mmdet's mask_rcnn_r50_fpn base).
    representation_size: int = 1024
    mask_convs: int = 4
    mask_channels: int = 256
    anchor_sizes: list[int] | None = None  # None = torchvision default (32, 64, 128, 256, 512)
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100
    # mmdet-compatible box math (docs/paper_profile.md): "l1" = mmdet 2.22's L1 RPN/RoI box losses, "smooth_l1" =
    # torchvision's (beta 1/9); roi_align_aligned = mmcv RoIAlign's half-pixel alignment (torchvision: False).
    box_loss: Literal["smooth_l1", "l1"] = "smooth_l1"
    roi_align_aligned: bool = False


@dataclass
class DataConfig:
    """Dataset, sizes and augmentation."""

    dataset: Literal["generated", "coco", "ade20k"] = "generated"
    root: str | None = None  # None = the dataset's default location
    image_size: int = 128  # generated image side / training crop side; multiple of 32 (reference §5)
    img_scale: list[int] | None = None  # [long, short] resize target, mmdet/mmseg style; None = no resize
    ratio_range: list[float] | None = None  # random rescale of img_scale, [min, max]
    size_divisor: int = 32  # pad to a multiple of this (reference §2, §5)
    n_train: int | None = None  # None = the whole split
    n_val: int | None = None
    generator: dict[str, Any] = field(default_factory=dict)  # settings passed to the scene generator
    # "foreground": segmentation of object vs background (every object class -> 1, head.num_classes 2); the
    # CPU default's task, chosen by pilots (docs/pilots.md). "classes": the label maps as stored.
    label_mode: Literal["classes", "foreground"] = "classes"
    batch_size: int = 16  # GLOBAL batch per optimiser step: per process = batch_size / world / train.grad_accum
    eval_batch_size: int | None = None  # images per evaluation forward and process; None = the per-process batch
    num_workers: int = 0  # 0 = load in the training process; > 0 = torch DataLoader workers
    pin_memory: bool = True  # page-locked host batches (CUDA only)
    group_by_aspect: bool = False  # detection: each per-process batch is all landscape or all portrait (mmdet)
    # Input normalisation (0..255 RGB); None = ImageNet mean/std. The AugReg ViT-L configs use 127.5/127.5.
    norm_mean: list[float] | None = None
    norm_std: list[float] | None = None
    flip: bool = True
    crop: bool = False  # random crop to image_size x image_size
    cat_max_ratio: float | None = None  # mmseg RandomCrop: max share of one class in a crop
    photometric: bool = False
    reduce_zero_label: bool = False  # ADE20K: label 0 ("other") becomes ignore
    cache_in_memory: bool = False
    test_mode: Literal["whole", "slide"] = "whole"
    slide_stride: int | None = None  # sliding-window stride when test_mode == "slide" (reference §2: 341)


@dataclass
class OptimConfig:
    """AdamW + warmup + step or poly schedule, all in iterations."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float | None = None  # None = off; else the per-layer lr decay rate
    # Substrings of parameter names that get no weight decay (reference §2).
    no_decay: list[str] = field(default_factory=lambda: ["level_embed", "pos_embed", "norm", "bias"])
    # "names": the substrings above; "ndim_or_bias": the official layer-decay constructor's rule (1-D parameters
    # and names ending in ".bias" get no decay), used by the layer-decay profiles.
    no_decay_rule: Literal["names", "ndim_or_bias"] = "names"
    warmup_iters: int = 0
    warmup_ratio: float = 1e-3  # lr starts at warmup_ratio * lr and rises linearly
    schedule: Literal["step", "poly"] = "step"
    # Iterations at which the step schedule multiplies the lr by gamma.
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    power: float = 1.0
    min_lr: float = 0.0
    clip_grad: float | None = None  # max grad norm; None = off


@dataclass
class TrainConfig:
    """Loop length, intervals, seed and execution settings."""

    max_iters: int = 1000
    eval_interval: int = 500
    checkpoint_interval: int = 500
    log_interval: int = 50
    seed: int = 0
    grad_accum: int = 1  # micro-batches per optimiser step (data.batch_size is the global batch)
    amp: bool = False  # CUDA autocast; box/proposal math stays fp32
    amp_dtype: Literal["bf16", "fp16"] = "bf16"  # fp16 uses a dynamic GradScaler starting at loss_scale
    loss_scale: float = 512.0  # the official segmentation configs' fp16 init_scale
    tf32: bool = True  # allow TF32 matmuls/convs on CUDA (the paper's torch 1.9 default)
    dist_timeout_s: int = 1800  # process-group timeout (collectives, e.g. around evaluation)
    threads: int | None = None  # torch intra-op threads; None = leave torch's default
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = True


@dataclass
class WeightsConfig:
    """Backbone initialisation: a timm name, a URL or a local file (see engine/weights.py)."""

    init: Literal["pretrained", "scratch"] = "scratch"
    source: str | None = None
    sha256: str | None = None
    cache_dir: str = "weights"  # where fetched weights are stored as .safetensors


@dataclass
class Config:
    """The whole resolved configuration of one run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (lists, not tuples) that YAML and JSON can write."""
        return {f.name: plain_data(dataclasses.asdict(getattr(self, f.name))) for f in dataclasses.fields(self)}


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]

# Largest data.image_size a config accepts: three times the paper's largest input side (COCO's 1333 px); one
# 4096^2 RGB float32 image is already 200 MB, and a mistyped 100000 used to end in a MemoryError mid-run.
MAX_IMAGE_SIZE = 4096

# Model keys that are not create_model() overrides.
_MODEL_NON_FLAGS = ("preset", "task")
_HEADS_FOR_TASK: dict[str, tuple[str, ...]] = {"det": ("mask_rcnn",), "seg": ("upernet", "semfpn")}
_DATASETS_FOR_TASK: dict[str, tuple[str, ...]] = {
    "det": ("generated", "coco"),
    "seg": ("generated", "ade20k"),
}


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------------
# Layering: each layer is checked for unknown keys as it is merged, and we remember which layer set each
# leaf so that a type error later names the file (or --set) it came from.
# ---------------------------------------------------------------------------------------------------------


def _section_fields(section: str) -> dict[str, Any]:
    return hints(SECTIONS[section])


def _merge_layer(base: dict[str, Any], layer: Mapping[str, Any], source: str, origins: dict[str, str]) -> None:
    for section, values in layer.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section '{section}' in {source}{suggest(str(section), list(SECTIONS))}")
        if values is None:
            continue  # an empty section in YAML ("model:") changes nothing
        if not isinstance(values, Mapping):
            raise ConfigError(f"section '{section}' in {source} must be a mapping, got {type(values).__name__}")
        known = _section_fields(section)
        target = base.setdefault(section, {})
        for key, value in values.items():
            if key not in known:
                dotted = f"{section}.{key}"
                raise ConfigError(f"unknown key '{dotted}' in {source}{suggest(str(key), list(known))}")
            _merge_value(target, key, value, f"{section}.{key}", source, origins)


def _merge_value(
    target: dict[str, Any], key: str, value: Any, dotted: str, source: str, origins: dict[str, str]
) -> None:
    """Nested dicts merge key by key (e.g. data.generator); anything else replaces."""
    if isinstance(value, Mapping) and isinstance(target.get(key), dict):
        for sub, sub_value in value.items():
            _merge_value(target[key], sub, sub_value, f"{dotted}.{sub}", source, origins)
        origins.setdefault(dotted, source)
        return
    target[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
    origins[dotted] = source


def parse_set(item: str) -> dict[str, Any]:
    """`section.key[.sub]=value` -> nested dict; the value is YAML (`true`, `1e-4`, `[1, 2]`, `null`)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: the key must be dotted as section.key, got {dotted.strip()!r}")
    value: Any = parse_yaml(raw, f"--set {dotted.strip()}") if raw.strip() else ""
    for part in reversed(parts):
        value = {part: value}
    return value


def _build(data: Mapping[str, Any], origins: Mapping[str, str]) -> Config:
    sections = {
        name: build_dataclass(cls, data.get(name, {}), "defaults", origins=origins, prefix=f"{name}.")
        for name, cls in SECTIONS.items()
    }
    cfg = Config(**sections)
    _check_consistency(cfg, origins)
    return cfg


def _check_consistency(cfg: Config, origins: Mapping[str, str]) -> None:
    """Cross-field rules a type cannot express; each error names the key and where it was set."""

    def fail(dotted: str, why: str) -> None:
        value = _get(cfg, dotted)
        src = origins.get(dotted, "defaults")
        raise ConfigError(f"{dotted} = {value!r} (from {src}) is invalid: {why}")

    task = cfg.model.task
    if cfg.head.type not in _HEADS_FOR_TASK[task]:
        fail("head.type", f"task '{task}' needs one of {', '.join(_HEADS_FOR_TASK[task])}")
    if cfg.data.dataset not in _DATASETS_FOR_TASK[task]:
        fail("data.dataset", f"task '{task}' needs one of {', '.join(_DATASETS_FOR_TASK[task])}")
    if cfg.data.image_size <= 0 or cfg.data.image_size % 32:
        fail("data.image_size", "must be a positive multiple of 32 (reference §5)")
    if cfg.data.image_size > MAX_IMAGE_SIZE:
        fail("data.image_size", f"must be <= {MAX_IMAGE_SIZE} (larger sides do not fit in memory)")
    for dotted in ("data.n_train", "data.n_val"):
        # A negative count used to act as a slice (-1: all but the last image) and 0 "finished" with null metrics.
        v = _get(cfg, dotted)
        if v is not None and v < 1:
            fail(dotted, "must be >= 1, or null for the whole split")
    _check_generator(cfg, origins)
    _check_model_shape(cfg, fail)
    if cfg.data.test_mode == "slide" and not cfg.data.slide_stride:
        fail("data.slide_stride", "test_mode 'slide' needs a positive stride")
    for dotted in ("data.batch_size", "train.max_iters", "train.grad_accum", "head.num_classes"):
        if _get(cfg, dotted) < 1:
            fail(dotted, "must be >= 1")
    if cfg.data.batch_size % cfg.train.grad_accum:  # the world size is checked when training starts
        fail("data.batch_size", f"the global batch must divide into train.grad_accum = {cfg.train.grad_accum}")
    for dotted in ("data.eval_batch_size", "train.dist_timeout_s", "data.num_workers", "train.threads"):
        v = _get(cfg, dotted)
        if v is not None and v < (0 if dotted == "data.num_workers" else 1):
            fail(dotted, "must be >= 0" if dotted == "data.num_workers" else "must be >= 1")
    for dotted in ("data.norm_mean", "data.norm_std"):
        v = _get(cfg, dotted)
        if v is not None and (len(v) != 3 or (dotted == "data.norm_std" and min(v) <= 0)):
            fail(dotted, "must be 3 RGB values (std > 0) or null")
    for dotted in (
        "train.eval_interval",
        "train.checkpoint_interval",
        "train.log_interval",
        "optim.warmup_iters",
    ):
        if _get(cfg, dotted) < 0:
            fail(dotted, "must be >= 0 (0 = off)")
    if cfg.optim.lr <= 0:
        fail("optim.lr", "must be > 0")
    if not 0 < cfg.optim.warmup_ratio <= 1:
        fail("optim.warmup_ratio", "must be in (0, 1]")
    if cfg.head.class_weight is not None and (
        cfg.model.task != "seg" or len(cfg.head.class_weight) != cfg.head.num_classes
    ):
        fail("head.class_weight", f"needs model.task 'seg' and one weight per class ({cfg.head.num_classes})")
    if cfg.data.label_mode == "foreground" and (cfg.model.task != "seg" or cfg.head.num_classes != 2):
        fail("data.label_mode", "'foreground' needs model.task 'seg' and head.num_classes 2")
    if cfg.optim.layer_decay is not None and not 0 < cfg.optim.layer_decay <= 1:
        fail("optim.layer_decay", "must be in (0, 1] or null")
    ms = cfg.optim.milestones
    if cfg.optim.schedule == "step" and ms and (ms != sorted(set(ms)) or ms[0] <= 0):
        fail("optim.milestones", "must be strictly increasing positive iterations")
    if cfg.weights.init == "pretrained" and not cfg.weights.source:
        fail("weights.source", "init 'pretrained' needs a source (timm name, URL or path)")
    sha = cfg.weights.sha256
    if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
        fail("weights.sha256", "must be 64 lower-case hex digits or null")


def _check_generator(cfg: Config, origins: Mapping[str, str]) -> None:
    """data.generator: only keys the scene generator knows, with valid values (`train` used to accept a typo
    that `data` then crashed on)."""
    from vit_adapter.data.scene import check_generator

    gen = cfg.data.generator
    try:
        check_generator(gen, cfg.data.image_size)
    except ValueError as err:
        where = sorted({origins.get(f"data.generator.{k}", origins.get("data.generator", "defaults")) for k in gen})
        src = ", ".join(where) or origins.get("data.generator", "defaults")
        raise ConfigError(f"data.generator (from {src}) is invalid: {err}") from None


# Architecture keys that must be positive integers when set (None = the preset's value).
_POSITIVE_MODEL_INTS = (
    "embed_dim",
    "depth",
    "num_heads",
    "deform_num_heads",
    "conv_inplane",
    "patch_size",
    "n_points",
    "window_size",
    "pretrain_size",
)


def _check_model_shape(cfg: Config, fail: Any) -> None:
    """Shapes the model could not be built with, found before anything is written (embed_dim=100 with 3 heads
    or num_heads=0 used to fail inside the first forward, after the run directory existed)."""
    m = cfg.model
    for key in _POSITIVE_MODEL_INTS:
        v = getattr(m, key)
        if v is not None and v < 1:
            fail(f"model.{key}", "must be >= 1")
    for key in ("n_interactions", "extra_extractors"):
        v = getattr(m, key)
        if v is not None and v < 0:
            fail(f"model.{key}", "must be >= 0")
    for key in ("cffn_ratio", "deform_ratio", "mlp_ratio"):
        v = getattr(m, key)
        if v is not None and v <= 0:
            fail(f"model.{key}", "must be > 0")
    if m.drop_path_rate is not None and not 0 <= m.drop_path_rate < 1:
        fail("model.drop_path_rate", "must be in [0, 1)")
    if m.embed_dim is None and m.num_heads is None:
        return  # the preset's own pair divides
    from vit_adapter.models.factory import preset_kwargs

    preset = preset_kwargs(m.preset, m.task)
    dim = m.embed_dim if m.embed_dim is not None else preset["embed_dim"]
    heads = m.num_heads if m.num_heads is not None else preset["num_heads"]
    if dim % heads:
        if m.embed_dim is not None:
            origin = "" if m.num_heads is not None else f" (preset {m.preset})"
            fail("model.embed_dim", f"must be divisible by model.num_heads = {heads}{origin}")
        fail("model.num_heads", f"must divide model.embed_dim = {dim} (preset {m.preset})")


def _get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".", 1)
    return getattr(getattr(cfg, section), key)


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def resolve_path(name: str | Path, search: Sequence[Path]) -> Path:
    """The one rule (docs/faults.md): a bare name (no directory, no suffix, e.g. `cpu_default`) is a profile,
    `<dir>/<name>.yaml` in the first search dir (the project's experiments/, ablations/) that has it; anything
    else is a path, relative to the current working directory."""
    path = Path(name)
    if path.suffix == "" and len(path.parts) == 1:
        for folder in search:
            candidate = folder / f"{name}.yaml"
            if candidate.is_file():
                return candidate
        where = ", ".join(str(d) for d in search)
        raise ConfigError(f"profile '{name}' not found: no {name}.yaml in {where} (a file needs a path or suffix)")
    if path.is_file():
        return path
    raise ConfigError(f"config file '{name}' not found (relative paths start at {Path.cwd()})")


def load_config(
    profile: str | Path | None,
    overlays: Sequence[str | Path] = (),
    sets: Sequence[str] = (),
) -> Config:
    """Defaults <- profile <- each overlay in order <- each `--set section.key=value`.

    `profile` and overlays are paths or bare names (`cpu_default` -> experiments/cpu_default.yaml,
    `n1` -> ablations/n1.yaml). Raises ConfigError for unknown keys, wrong types and inconsistent values.
    """
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if profile is not None:
        path = resolve_path(profile, [EXPERIMENTS_DIR])
        _merge_layer(data, _read_yaml_mapping(path), str(path), origins)
    for overlay in overlays:
        path = resolve_path(overlay, [ABLATIONS_DIR, EXPERIMENTS_DIR])
        _merge_layer(data, _read_yaml_mapping(path), str(path), origins)
    for item in sets:
        _merge_layer(data, parse_set(item), f"--set {item.split('=', 1)[0].strip()}", origins)
    return _build(data, origins)


def config_from_dict(d: Mapping[str, Any], source: str = "dict") -> Config:
    """Build and validate a Config from a (possibly partial) nested dict, e.g. a saved config.yaml."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    _merge_layer(data, d, source, origins)
    return _build(data, origins)


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for short lists (`betas: [0.9, 0.999]`), like the profiles."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flat = all(not isinstance(v, dict | list) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _represent_list)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text (section order kept, so it reads like a profile)."""
    header = "# Resolved configuration (defaults + profile + overlays + --set); loadable as a profile.\n"
    body = yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=110)
    return header + body


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config.yaml atomically; returns the path."""
    from vit_adapter.utils.io import atomic_write_text

    return atomic_write_text(path, dump_config(cfg))


# Settings that change how a run executes, not what it computes; resume identity may ignore them so that an
# interrupted run can continue on another machine (config_hash(cfg, exclude=EXECUTION_KEYS)).
EXECUTION_KEYS = ("train.threads", "train.device", "train.log_interval", "data.num_workers", "data.root")


def config_hash(cfg: Config, exclude: Sequence[str] = ()) -> str:
    """Stable sha256 of the resolved config (key order and YAML formatting do not matter).

    `exclude` lists dotted `section.key` names left out of the digest (e.g. EXECUTION_KEYS).
    """
    d = cfg.to_dict()
    for dotted in exclude:
        section, _, key = dotted.partition(".")
        if section not in d or key not in d[section]:
            raise ConfigError(f"config_hash: unknown key '{dotted}' in exclude")
        del d[section][key]
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def model_overrides(cfg: Config) -> dict[str, Any]:
    """The non-None model flags, for `create_model(cfg.model.preset, task=cfg.model.task, **overrides)`."""
    flags = dataclasses.asdict(cfg.model)
    return {k: v for k, v in flags.items() if k not in _MODEL_NON_FLAGS and v is not None}


# ---------------------------------------------------------------------------------------------------------
# argparse glue for the CLI (kept here so every subcommand spells the options the same way)
# ---------------------------------------------------------------------------------------------------------


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Register --config, --overlay/--ablation and --set on a parser."""
    parser.add_argument("--config", default="cpu_default", help="profile: path or name in experiments/")
    parser.add_argument(
        "--overlay",
        "--ablation",
        dest="overlays",
        action="append",
        default=[],
        help="overlay applied after the profile (path or name in ablations/); repeatable, in order",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one value (YAML-parsed); repeatable, applied last",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """load_config() from the options registered by add_config_args()."""
    return load_config(args.config, args.overlays, args.sets)
