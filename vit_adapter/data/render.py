"""Pixel-level building blocks shared by the scene generator and the classification set.

Everything takes an explicit ``numpy.random.Generator`` so that one seed fixes every pixel. PIL does the
resampling (crop+resize in one call, bilinear with antialiasing when shrinking); numpy does the compositing.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .sources import Texture

_BILINEAR = Image.Resampling.BILINEAR


def random_colour(
    rng: np.random.Generator, sat: tuple[float, float] = (0.35, 1.0), val: tuple[float, float] = (0.35, 1.0)
) -> np.ndarray:
    """An RGB colour (float32, 0..255) drawn in HSV: hue, saturation and brightness vary independently."""
    h, s, v = rng.random(), rng.uniform(*sat), rng.uniform(*val)
    return np.asarray(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def texture_patch(
    rng: np.random.Generator,
    textures: Sequence[Texture],
    h: int,
    w: int,
    zoom: tuple[float, float] = (0.15, 0.6),
) -> np.ndarray:
    """A random crop of a random texture resized to (h, w), randomly flipped and recoloured; float32 HxWx3.

    ``zoom`` is the crop side as a fraction of the texture's short side: small crops magnify the texture, so
    the same photographs give both fine and coarse background structure.
    """
    tex = textures[int(rng.integers(len(textures)))]
    tw, th = tex.image.size
    ch = rng.uniform(*zoom) * min(tw, th)
    cw = ch * w / h
    if cw > tw:  # very wide outputs: shrink the crop to fit the texture
        ch, cw = ch * tw / cw, float(tw)
    x0 = rng.uniform(0, tw - cw)
    y0 = rng.uniform(0, th - ch)
    arr = np.asarray(tex.image.resize((w, h), _BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)), dtype=np.float32)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    if rng.random() < 0.5:
        arr = arr[::-1]
    if tex.gray:
        # Tint greyscale photographs so colour alone never separates textures from objects.
        tint = random_colour(rng, sat=(0.0, 0.6), val=(0.7, 1.0))
        arr = arr[:, :, None] * (tint / 255.0)
    else:
        arr = arr * rng.uniform(0.8, 1.2, 3).astype(np.float32)
    mean = float(arr.mean())
    arr = (arr - mean) * rng.uniform(0.6, 1.2) + mean * rng.uniform(0.8, 1.2)
    return np.ascontiguousarray(arr, dtype=np.float32)


def background(
    rng: np.random.Generator,
    textures: Sequence[Texture],
    h: int,
    w: int,
    *,
    second_texture_prob: float,
    clutter: int,
) -> np.ndarray:
    """Textured background (float32 HxWx3): one texture, optionally a second one across a random straight
    boundary (strong edges that are *not* objects), then ``clutter`` unlabelled strokes, shapes and blobs."""
    bg = texture_patch(rng, textures, h, w)
    if rng.random() < second_texture_prob:
        other = texture_patch(rng, textures, h, w)
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        d = (xx - w / 2) * np.cos(theta) + (yy - h / 2) * np.sin(theta) - rng.uniform(-0.3, 0.3) * min(h, w)
        bg = np.where((d > 0)[:, :, None], other, bg)
    if clutter > 0:
        bg = _draw_clutter(rng, textures, bg, clutter)
    return bg


def _draw_clutter(rng: np.random.Generator, textures: Sequence[Texture], bg: np.ndarray, n: int) -> np.ndarray:
    h, w = bg.shape[:2]
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    s = min(h, w)
    for _ in range(n):
        kind = int(rng.integers(4))
        colour = tuple(int(c) for c in random_colour(rng))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.25) * s
        if kind == 0:  # thin line: looks like a thin object part, but is background
            ang = rng.uniform(0, np.pi)
            dx, dy = r * np.cos(ang), r * np.sin(ang)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=int(rng.integers(1, 4)))
        elif kind == 1:  # open arc
            a0 = rng.uniform(0, 360)
            box = [cx - r, cy - r * 0.6, cx + r, cy + r * 0.6]
            draw.arc(box, a0, a0 + rng.uniform(60, 300), fill=colour, width=int(rng.integers(1, 3)))
        elif kind == 2:  # small filled polygon of a random colour (a distractor that is not a silhouette)
            k = int(rng.integers(3, 6))
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad = r * rng.uniform(0.3, 0.7, k)
            draw.polygon([(cx + a * np.cos(t), cy + a * np.sin(t)) for a, t in zip(rad, ang)], fill=colour)
        else:  # blob filled with another texture
            m = Image.new("L", (w, h), 0)
            ImageDraw.Draw(m).ellipse([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=255)
            patch = np.clip(texture_patch(rng, textures, h, w), 0, 255).astype(np.uint8)
            im = Image.composite(Image.fromarray(patch, "RGB"), im, m)
            draw = ImageDraw.Draw(im)
    return np.asarray(im, dtype=np.float32)


def silhouette_maps(sil: np.ndarray, h: int, w: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Resize (and rotate) a 28x28 item to an h x w box; return (alpha, shade), float32 in [0, 1].

    alpha comes from the *binarised* silhouette (so dark garment patterns do not punch holes in the mask) and
    the instance mask is ``alpha >= 0.5``; shade is the item's own intensity and keeps its internal detail.
    """
    binary = Image.fromarray(np.where(sil > 8, 255, 0).astype(np.uint8), "L").resize((w, h), _BILINEAR)
    inten = Image.fromarray(np.ascontiguousarray(sil), "L").resize((w, h), _BILINEAR)
    if angle:
        binary = binary.rotate(angle, _BILINEAR, expand=True)
        inten = inten.rotate(angle, _BILINEAR, expand=True)
    alpha = np.asarray(binary, dtype=np.float32) / 255.0
    shade = np.asarray(inten, dtype=np.float32)
    shade = shade / max(float(shade.max()), 1.0)
    return alpha, shade


def window(size: tuple[int, int], top: int, left: int, h: int, w: int) -> tuple[slice, slice, slice, slice] | None:
    """Canvas and local slices of an h x w box at (top, left) clipped to the canvas; None if fully outside."""
    hh, ww = size
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, hh), min(left + w, ww)
    if y1 <= y0 or x1 <= x0:
        return None
    return slice(y0, y1), slice(x0, x1), slice(y0 - top, y1 - top), slice(x0 - left, x1 - left)


def composite(canvas: np.ndarray, fill: np.ndarray, alpha: np.ndarray, ys: slice, xs: slice) -> None:
    """Alpha-blend ``fill`` (the clipped region's colours) into ``canvas`` in place."""
    a = alpha[:, :, None]
    canvas[ys, xs] = canvas[ys, xs] * (1.0 - a) + fill * a


def finish(canvas: np.ndarray, rng: np.random.Generator, noise_std: float) -> np.ndarray:
    """Add sensor noise and quantise to uint8."""
    if noise_std > 0:
        noise = rng.standard_normal(canvas.shape, dtype=np.float32)
        noise *= noise_std
        canvas = canvas + noise
    np.rint(canvas, out=canvas)
    np.clip(canvas, 0, 255, out=canvas)
    return canvas.astype(np.uint8)
