"""I/O helpers shared by the generator and the loaders: one error type, checked reading and decoding, npz caches.

Atomic writes and digests are ``vit_adapter.utils.io``'s.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..utils.io import atomic_write_bytes


class DataError(ValueError):
    """Bad or inconsistent input data; the message always names the offending file, key or size."""


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a directory, else raise one clear DataError."""
    if not path.is_dir():
        raise DataError(f"{what} directory not found: {path}")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    return path


def load_json(path: Path) -> Any:
    require_file(path, "JSON")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"cannot parse JSON file {path}: {e}") from e


def read_image(path: Path, mode: str = "RGB") -> np.ndarray:
    """Decode an image fully (PIL decodes lazily, so truncation only shows on load) into a uint8 array."""
    try:
        with Image.open(path) as im:
            im.load()
            # Palette/greyscale label PNGs must keep their raw indices: convert only when the mode differs
            # and the target is RGB (a label map read as 'L' from a 'P' image keeps the palette indices).
            if mode == "RGB" and im.mode != "RGB":
                im = im.convert("RGB")
            elif mode == "L" and im.mode not in ("L", "P"):
                raise DataError(f"label image {path} has mode {im.mode!r}; expected a single-channel PNG")
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot decode image {path}: {e}") from e
    return arr


def check_image(path: Path) -> tuple[int, int]:
    """(height, width) from the header, without decoding the pixels. A PNG's chunks are also read through to
    IEND with their CRCs checked (``Image.verify``), which finds truncated or corrupted files at a fraction of
    a decode's cost; other formats (JPEG) get the header check only and fail, if truncated, when loaded."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.format == "PNG":
                im.verify()
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode image {path}: {' '.join(str(e).split())}") from e
    return int(h), int(w)


def save_npz_cache(path: str | os.PathLike[str], params: dict[str, Any], **arrays: np.ndarray) -> Path:
    """Store `arrays` with the `params` that generated them (as sorted JSON), atomically: a rendered set is
    computed once, and a reader can tell whether a cache file was made for the parameters it needs."""
    buf = io.BytesIO()
    np.savez(buf, **arrays, params=np.array(json.dumps(params, sort_keys=True)))
    return atomic_write_bytes(path, buf.getvalue())


def load_npz_cache(
    path: str | os.PathLike[str], names: tuple[str, ...], what: str
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays by name, params) of a file written by ``save_npz_cache``; DataError naming `path` and `what` it
    should have been when it is missing or is not such a file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in names}, json.loads(str(z["params"]))
    except FileNotFoundError as e:
        raise DataError(f"npz file not found: {path}") from e
    except (KeyError, ValueError, OSError) as e:
        raise DataError(f"{path} is not {what}: {e}") from e


def png_bytes(arr: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode a uint8 array as PNG. PIL+zlib output is byte-identical for identical input.

    Level 1: the noisy synthetic images barely compress better at higher levels, which cost 1.5-2x the time.
    """
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
