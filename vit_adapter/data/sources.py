"""Raw material for the synthetic data: Fashion-MNIST silhouettes and real textures from scikit-image.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (gzipped idx files). When it is absent we
fall back to procedural shapes (with a warning) so the project still runs. Textures are the photographs bundled in
scikit-image's wheel that load without ``pooch`` (no network); only PNG sources are used because JPEG decoding
can differ between libjpeg builds, which would break byte-identical generation across machines.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ._io import DataError

DEFAULT_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_ENV = "VIT_ADAPTER_FMNIST_DIR"
FMNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
SHAPE_CLASSES = (
    "disc",
    "square",
    "triangle",
    "ring",
    "cross",
    "star",
    "bar",
    "l-shape",
    "crescent",
    "diamond",
)
# PNG files shipped inside the scikit-image wheel (checked to load offline with skimage 0.26): a mix of
# regular textures (brick, grass, gravel, moon), cluttered natural photos (coffee, chelsea, astronaut, camera,
# coins) and micro-structure (cell, immunohistochemistry, page, text).
TEXTURE_NAMES = (
    "brick",
    "grass",
    "gravel",
    "moon",
    "cell",
    "coins",
    "camera",
    "coffee",
    "chelsea",
    "astronaut",
    "immunohistochemistry",
    "page",
    "text",
)
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class Silhouettes:
    """28x28 uint8 intensity maps (0 = empty) with class indices 0..9."""

    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...]
    source: str  # "fashion-mnist" or "procedural"

    @functools.cached_property
    def by_class(self) -> tuple[np.ndarray, ...]:
        """Item indices of each class (cached: the crowd generator draws same-class items)."""
        return tuple(np.flatnonzero(self.labels == c) for c in range(len(self.classes)))


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Parse a gzipped idx file (magic 0x0000 08 nd, big-endian int32 dims, then uint8 data)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read idx file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_ndim:
        raise DataError(f"{path} is not a uint8 idx file with {expected_ndim} dims (bad magic {raw[:4].hex()})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_ndim))
    offset = 4 + 4 * expected_ndim
    size = int(np.prod(dims))
    if len(raw) - offset != size:
        raise DataError(f"{path}: header says {dims} ({size} bytes) but the file holds {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def fmnist_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The Fashion-MNIST directory: the argument, else $VIT_ADAPTER_FMNIST_DIR, else the Debian location."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get(FMNIST_ENV, DEFAULT_FMNIST_DIR))


@functools.lru_cache(maxsize=8)
def _load_fmnist(directory: str, split: str) -> Silhouettes:
    img_name, lbl_name = _FMNIST_FILES[split]
    images = _read_idx(Path(directory) / img_name, 3)
    labels = _read_idx(Path(directory) / lbl_name, 1).astype(np.int64)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise DataError(f"Fashion-MNIST in {directory}: {images.shape} images vs {labels.shape} labels")
    if labels.max() >= len(FMNIST_CLASSES):
        raise DataError(f"Fashion-MNIST labels in {directory}/{lbl_name} exceed 9")
    images.setflags(write=False)
    labels.setflags(write=False)
    return Silhouettes(images, labels, FMNIST_CLASSES, "fashion-mnist")


def load_silhouettes(split: str, directory: str | os.PathLike[str] | None = None) -> Silhouettes:
    """Fashion-MNIST items for ``split`` ('train' -> the 60k set, 'val' -> the 10k test set).

    Falls back to procedural shapes with a warning when the idx files are absent (not when they are corrupt:
    a corrupt file raises DataError, since silently changing the data would be worse).
    """
    if split not in _FMNIST_FILES:
        raise DataError(f"unknown split {split!r}; expected 'train' or 'val'")
    d = fmnist_dir(directory)
    if not all((d / name).is_file() for name in _FMNIST_FILES[split]):
        warnings.warn(
            f"Fashion-MNIST not found in {d} (install the Debian package 'dataset-fashion-mnist' or set "
            f"${FMNIST_ENV}); falling back to procedural shapes",
            RuntimeWarning,
            stacklevel=2,
        )
        return procedural_silhouettes(split)
    return _load_fmnist(str(d), split)


def _draw_shape(cls: int, rng: np.random.Generator) -> np.ndarray:
    """One 28x28 procedural shape of class ``cls`` with jittered geometry and an internal shading ramp."""
    s = 28 * 4  # draw at 4x and downsample for anti-aliased edges
    im = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(im)
    c = s / 2 + rng.uniform(-6, 6, 2)
    r = s * rng.uniform(0.32, 0.42)
    cx, cy = float(c[0]), float(c[1])
    if cls == 0:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif cls == 1:
        d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=255)
    elif cls == 2:
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=255)
    elif cls == 3:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=0)
    elif cls == 4:
        w = r * 0.35
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
    elif cls == 5:
        ang = np.arange(10) * np.pi / 5 - np.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        d.polygon([(cx + a * np.cos(t), cy + a * np.sin(t)) for a, t in zip(rad, ang)], fill=255)
    elif cls == 6:
        d.rectangle([cx - r * 0.25, cy - r, cx + r * 0.25, cy + r], fill=255)
    elif cls == 7:
        d.rectangle([cx - r, cy - r, cx - r * 0.4, cy + r], fill=255)
        d.rectangle([cx - r, cy + r * 0.4, cx + r, cy + r], fill=255)
    elif cls == 8:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d.ellipse([cx - r * 0.4, cy - r * 1.1, cx + r * 1.4, cy + r * 0.9], fill=0)
    else:
        d.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=255)
    shape = np.asarray(im.resize((28, 28), Image.Resampling.BOX), dtype=np.float32)
    ramp = np.linspace(rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0), 28, dtype=np.float32)[:, None]
    return np.clip(shape * ramp, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=2)
def procedural_silhouettes(split: str, n: int = 2000) -> Silhouettes:
    """Fallback items: 10 shape classes, ``n`` per split, deterministic (seeded by the split name)."""
    seed = int.from_bytes(hashlib.sha256(f"shapes-{split}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(SHAPE_CLASSES)
    images = np.stack([_draw_shape(int(c), rng) for c in labels])
    images.setflags(write=False)
    labels.setflags(write=False)
    return Silhouettes(images, labels, SHAPE_CLASSES, "procedural")


@dataclass(frozen=True)
class Texture:
    name: str
    image: Image.Image  # PIL image ('L' or 'RGB'): PIL crops and resizes in one call (``resize(box=...)``)
    gray: bool


@functools.lru_cache(maxsize=1)
def load_textures() -> tuple[Texture, ...]:
    """Every bundled texture that loads offline, as PIL images (greyscale ones stay 'L', tinted later)."""
    import skimage.data

    out = []
    for name in TEXTURE_NAMES:
        try:
            arr = np.asarray(getattr(skimage.data, name)())
        except Exception as e:  # a future skimage may move a file behind pooch: skip it, never download
            warnings.warn(f"skimage texture {name!r} unavailable offline ({e}); skipped", RuntimeWarning, stacklevel=2)
            continue
        if arr.dtype != np.uint8:
            continue
        gray = arr.ndim == 2
        arr = np.ascontiguousarray(arr if gray else arr[:, :, :3])
        out.append(Texture(name, Image.fromarray(arr, "L" if gray else "RGB"), gray))
    if not out:
        raise DataError("no scikit-image texture could be loaded (skimage.data files missing from the install)")
    return tuple(out)


def textures_fingerprint() -> dict[str, str]:
    """sha256 of each texture's pixels: in manifests, as other skimage versions may ship other files."""
    return {t.name: hashlib.sha256(t.image.tobytes()).hexdigest() for t in load_textures()}
