"""What determines a pretraining run: ``PretrainConfig`` (its options, defaults and types), the bounds its
validation checks, and the ViT it builds (``vit_kwargs``). The loop (``engine/pretrain.py``) and the objectives
(``engine/pretrain_objectives.py``) both read it; it imports neither, so the three modules form no cycle.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from vit_adapter.config.typed import describe

N_TRAIN_MAX = 60_000  # Fashion-MNIST training items
N_VAL_MAX = 10_000  # Fashion-MNIST test items (our held-out 'val' split)
HEAD_SUFFIX = ".head.safetensors"
# ViT constructor arguments taken from a preset (the adapter-only ones are ignored here).
_VIT_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "layer_scale", "drop_path_rate")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines a pretraining run (recorded in the sidecar under ``config``).

    Defaults are the tuned CPU recipe (docs/pretraining.md). ``image_size=None`` means 48 px for the CPU
    preset (the tuned size) and the preset's ``pretrain_size`` otherwise; ``steps`` and ``epochs`` are
    alternatives (``steps`` wins if both are given; neither means ``DEFAULT_STEPS``).
    """

    preset: str = "vit_cpu"
    # 'classify': 10-way classification of one centred item (mean-pooled tokens). 'scene_tokens': every token of
    # a generated scene predicts its patch's class histogram (background + 10 classes), a supervised dense
    # objective at the downstream resolution and object scale (data/scene_tokens.py, docs/pretraining.md).
    objective: str = "classify"
    image_size: int | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    beta2: float = 0.999
    warmup_steps: int = 200
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    drop_path_rate: float | None = 0.0  # None: the preset's rate; short runs do better without (tuning table)
    n_train: int = 20_000
    n_val: int = 2_000
    data_seed: int = 0  # rendering seed of the images; separate from the training seed so caches are shared
    item_scale: tuple[float, float] = (0.65, 0.9)
    placement: str = "centre"  # 'centre' (Fashion-MNIST-like) or 'anywhere' (uniform position; small items)
    augment: str = "none"  # 'crop_flip' (random resized crop + flip), 'flip' or 'none'; none won at this budget
    pos_init: str = "sincos"  # 'sincos' (2-D sin-cos, MAE-style) or 'normal' (PlainViT's trunc-normal, std .02)
    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (0.8, 1.25)
    # Photometric inversion (255 - x) of this fraction of the images: dark items on bright textures, the other
    # polarity, which the downstream scenes have and the pretraining images (bright item, dim texture) lack.
    invert_prob: float = 0.0
    seed: int = 0
    threads: int | None = None
    time_budget_s: float | None = None
    cache_dir: str | None = None
    eval_batch_size: int = 250
    log_every: int = 100
    # scene_tokens only: the scene generator's difficulty (as the downstream data.generator) and the processes
    # that render the scenes (the output does not depend on it).
    scene_difficulty: float = 0.5
    # Start from the ViT of an earlier pretraining output (its pos_embed resized to this grid): the two-phase
    # recipe, item classification then scene tokens (docs/pretraining.md). None = random init.
    init_from: str | None = None
    render_workers: int = 1

    def resolved_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        if self.epochs is None:
            return DEFAULT_STEPS
        return max(1, math.ceil(self.epochs * self.n_train / self.batch_size))


DEFAULT_STEPS = 2000
# Pretraining resolution when image_size is None: tuned for the CPU preset (3x3 tokens; docs/pretraining.md).
TUNED_IMAGE_SIZE = {"vit_cpu": 48, "vit_adapter_cpu": 48}
SCENE_IMAGE_SIZE = 128  # scene_tokens default: the downstream CPU profile's image size
AUGMENTS = ("crop_flip", "flip", "none")
POS_INITS = ("normal", "sincos")


# The option types are the PretrainConfig annotations, checked by the shared config loader (vit_adapter.config):
# a string from a config file would otherwise fail deep inside with a TypeError.
_KINDS = {int: "int", float: "a number", str: "str", bool: "a bool"}


def type_message(name: str, value: Any, tp: Any, source: str) -> str:
    """``lr must be a number, got '1e-3'``: the annotation without its ``| None``, in short words."""
    arms = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is types.UnionType else []
    kind = arms[0] if len(arms) == 1 else tp
    return f"{name} must be {_KINDS.get(kind) or describe(kind)}, got {value!r}"


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def vit_kwargs(
    preset: str, image_size: int | None, drop_path_rate: float | None, objective: str = "classify"
) -> dict[str, Any]:
    """``PlainViT`` constructor arguments of ``preset`` at ``pretrain_size = image_size`` (global attention)."""
    from vit_adapter.models.factory import preset_kwargs

    kw = preset_kwargs(preset, "seg")  # raises ValueError naming the known presets
    out = {k: kw[k] for k in _VIT_KEYS if k in kw}
    if image_size is None:
        default = SCENE_IMAGE_SIZE if objective == "scene_tokens" else kw.get("pretrain_size", 224)
        image_size = TUNED_IMAGE_SIZE.get(preset, default) if objective == "classify" else default
    out["pretrain_size"] = int(image_size)
    if drop_path_rate is not None:
        out["drop_path_rate"] = float(drop_path_rate)
    return out
