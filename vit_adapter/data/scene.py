"""The scene generator's settings (``SceneConfig``) and the options ``data.generator`` accepts.

Kept apart from the renderer (synth.py) so that config validation can check ``data.generator`` without loading
numpy, Pillow or pycocotools.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class SceneConfig:
    """Every knob of a scene. ``from_difficulty`` sets the defaults that trade ease for spatial detail."""

    image_size: tuple[int, int] = (128, 128)  # (H, W)
    objects_per_image: tuple[int, int] = (2, 6)  # inclusive range of (non-crowd) objects
    scale_range: tuple[float, float] = (0.15, 0.5)  # object box side as a fraction of min(H, W)
    small_prob: float = 0.25  # chance that an object is tiny, i.e. smaller than one 16-px ViT patch
    small_px: tuple[int, int] = (6, 15)  # side range (px) of tiny objects
    thin_prob: float = 0.15  # chance of squashing an item 2.5-4x along one axis (1-3 px wide parts)
    camouflage_prob: float = 0.15  # chance the item is filled with the surrounding texture, colour nudged
    textured_fill_prob: float = 0.25  # chance the item is filled with another texture instead of a colour
    clutter: tuple[int, int] = (1, 5)  # inclusive range of unlabelled strokes/shapes/blobs per image
    second_texture_prob: float = 0.4  # chance of a second background texture across a straight boundary
    crowd_prob: float = 0.1  # chance of one iscrowd=1 group of tiny same-class items
    max_rotation: float = 30.0  # degrees
    min_visible_frac: float = 0.45  # an occluded/truncated object keeps at least this fraction of its area
    min_visible_px: int = 6
    noise_std: float = 3.0  # Gaussian sensor noise (0..255 scale)
    mask_format: Literal["rle", "polygon"] = "rle"  # COCO segmentation of non-crowd objects

    @classmethod
    def from_difficulty(cls, difficulty: float = 0.5, **overrides: Any) -> SceneConfig:
        """Defaults scaled by ``difficulty`` in [0, 1]; any field may still be overridden by keyword."""
        d = float(difficulty)
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
        base = dict(
            small_prob=0.1 + 0.3 * d,
            thin_prob=0.3 * d,
            camouflage_prob=0.3 * d,
            textured_fill_prob=0.1 + 0.3 * d,
            clutter=(round(2 * d), round(2 + 6 * d)),
            second_texture_prob=0.2 + 0.4 * d,
            noise_std=1.0 + 4.0 * d,
            min_visible_frac=0.6 - 0.3 * d,
        )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown scene parameter(s): {', '.join(unknown)}")
        base.update(overrides)
        if isinstance(base.get("image_size"), int):
            base["image_size"] = (base["image_size"], base["image_size"])
        for key in ("image_size", "objects_per_image", "scale_range", "small_px", "clutter"):
            if key in base:
                base[key] = tuple(base[key])
        cfg = cls(**base)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        h, w = self.image_size
        if h < 16 or w < 16:
            raise ValueError(f"image_size must be at least 16x16, got {self.image_size}")
        lo, hi = self.objects_per_image
        if not 0 <= lo <= hi:
            raise ValueError(f"objects_per_image must satisfy 0 <= min <= max, got {self.objects_per_image}")
        if not 0 < self.scale_range[0] <= self.scale_range[1] <= 1.5:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi <= 1.5, got {self.scale_range}")
        if not 2 <= self.small_px[0] <= self.small_px[1]:
            raise ValueError(f"small_px must satisfy 2 <= lo <= hi, got {self.small_px}")
        if not 0 <= self.clutter[0] <= self.clutter[1]:
            raise ValueError(f"clutter must satisfy 0 <= min <= max, got {self.clutter}")
        for name in (
            "small_prob",
            "thin_prob",
            "camouflage_prob",
            "textured_fill_prob",
            "second_texture_prob",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        if self.camouflage_prob + self.textured_fill_prob > 1.0:
            raise ValueError("camouflage_prob + textured_fill_prob must not exceed 1")
        if not 0.0 <= self.crowd_prob <= 1.0 or not 0.0 < self.min_visible_frac <= 1.0:
            raise ValueError("crowd_prob must be in [0, 1] and min_visible_frac in (0, 1]")
        if self.mask_format not in ("rle", "polygon"):
            raise ValueError(f"mask_format must be 'rle' or 'polygon', got {self.mask_format!r}")


# Keys of data.generator besides the SceneConfig fields; image_size comes from data.image_size, not from here.
_EXTRA_OPTIONS = ("difficulty", "fmnist_dir")


def generator_options() -> list[str]:
    """Every key ``data.generator`` (and ``generate_dataset``'s keyword arguments) accepts, sorted."""
    fields = [f.name for f in dataclasses.fields(SceneConfig) if f.name != "image_size"]
    return sorted([*fields, *_EXTRA_OPTIONS])


def check_generator(options: Mapping[str, Any], image_size: int) -> SceneConfig:
    """The SceneConfig that ``options`` (data.generator) gives at ``image_size``; ValueError naming a bad key.

    Run at config validation, so that a typo fails `data` and `train` alike before anything is written."""
    allowed = generator_options()
    unknown = sorted(str(k) for k in options if k not in allowed)
    if unknown:
        hint = "; data.image_size sets the size" if "image_size" in unknown else ""
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}{hint}")
    scene = {k: v for k, v in options.items() if k not in _EXTRA_OPTIONS}
    fmnist = options.get("fmnist_dir")
    if fmnist is not None and not isinstance(fmnist, str):
        raise ValueError(f"fmnist_dir must be a path string or null, got {fmnist!r}")
    for f in dataclasses.fields(SceneConfig):
        v = scene.get(f.name)
        if isinstance(f.default, tuple) and v is not None and not (isinstance(v, list | tuple) and len(v) == 2):
            raise ValueError(f"{f.name} must be a list of 2 values [low, high], got {v!r}")
    try:
        return SceneConfig.from_difficulty(options.get("difficulty", 0.5), image_size=image_size, **scene)
    except (TypeError, ValueError) as err:  # e.g. clutter: 3 instead of [lo, hi]
        raise ValueError(str(err)) from err
