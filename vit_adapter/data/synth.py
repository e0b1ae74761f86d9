"""Deterministic scene generator: Fashion-MNIST silhouettes on real textures, written as COCO and ADE20K.

One scene per (seed, split, index): its own ``numpy`` Generator is derived from those three numbers, so any
image can be regenerated alone and the whole set is byte-identical for a seed. See docs/data.md for the design
(why small objects, thin parts, clutter and camouflage are there).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from pycocotools import mask as mask_utils
from skimage import measure

from ..utils.io import json_bytes, sha256_bytes, sha256_file
from ..utils.locks import DirLock
from . import render
from ._io import DataError, load_json, png_bytes
from .pool import render_pool
from .scene import SceneConfig
from .sources import Silhouettes, Texture, load_silhouettes, load_textures, textures_fingerprint
from .workdirs import CONTENT, make_workdir, remove_stale_workdirs, swap_into_place

FORMAT_VERSION = 1
GENERATOR = "vit_adapter.data.synth"
SPLITS = {"train": 0, "val": 1}  # the split code enters the per-image seed
COCO_DIRS = {"train": "train2017", "val": "val2017"}
ADE_DIRS = {"train": "training", "val": "validation"}
ADE_ROOT = "ADEChallengeData2016"
BACKGROUND_VALUE = 0  # semantic PNG value for "no object" (ADE20K uses 0 for "other", see docs/data.md)
IGNORE_INDEX = 255


@dataclass
class Instance:
    category_id: int
    mask: np.ndarray  # (H, W) bool, the *visible* pixels
    iscrowd: int = 0
    area0: int = field(default=0, repr=False)  # unoccluded area, for the occlusion limit


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    instances: list[Instance]

    def semantic(self) -> np.ndarray:
        """(H, W) uint8: category id of the visible instance at each pixel, 0 elsewhere."""
        sem = np.full(self.image.shape[:2], BACKGROUND_VALUE, dtype=np.uint8)
        for inst in self.instances:  # visible masks are disjoint, so the order does not matter
            sem[inst.mask] = inst.category_id
        return sem


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The Generator of one scene: independent of every other scene, so images can be made in any order."""
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def _fill(
    mode: str,
    rng: np.random.Generator,
    textures: tuple[Texture, ...],
    canvas: np.ndarray,
    ys: slice,
    xs: slice,
    shade: np.ndarray,
    alpha: np.ndarray,
) -> np.ndarray:
    """Colours of an object over its clipped window (float32 h x w x 3)."""
    h, w = shade.shape
    if mode == "camouflage":
        # The object's inside is the same background texture taken from elsewhere in the image, with its mean
        # colour nudged slightly and weak shading: only the texture seam and the silhouette give it away.
        hh, ww = canvas.shape[:2]
        dy, dx = int(rng.integers(h, hh + h)), int(rng.integers(w, ww + w))
        rows = (np.arange(ys.start, ys.stop) + dy) % hh
        cols = (np.arange(xs.start, xs.stop) + dx) % ww
        src = canvas[np.ix_(rows, cols)]
        under = canvas[ys, xs]
        wsum = max(float(alpha.sum()), 1e-6)
        local_mean = (under * alpha[:, :, None]).sum((0, 1)) / wsum
        src_mean = (src * alpha[:, :, None]).sum((0, 1)) / wsum
        nudge = rng.normal(0.0, 12.0, 3).astype(np.float32)
        return (src - src_mean + local_mean + nudge) * (0.85 + 0.3 * shade)[:, :, None]
    if mode == "textured":
        base = render.texture_patch(rng, textures, h, w, zoom=(0.05, 0.3))
        base = base * (render.random_colour(rng, sat=(0.2, 0.9), val=(0.8, 1.0)) / 255.0)
    else:
        base = np.broadcast_to(render.random_colour(rng), (h, w, 3))
    return base * (0.35 + 0.65 * shade)[:, :, None]


def _occlusion_ok(placed: list[Instance], new: np.ndarray, cfg: SceneConfig) -> bool:
    for inst in placed:
        keep = np.count_nonzero(inst.mask & ~new)
        if keep < max(cfg.min_visible_px, cfg.min_visible_frac * inst.area0):
            return False
    return True


def _place(
    rng: np.random.Generator,
    cfg: SceneConfig,
    placed: list[Instance],
    alpha: np.ndarray,
) -> tuple[tuple[slice, slice, slice, slice], np.ndarray] | None:
    """Try a few positions (allowing partial truncation at the border) that respect the occlusion limits."""
    hh, ww = cfg.image_size
    h, w = alpha.shape
    area0 = int(np.count_nonzero(alpha >= 0.5))
    for _ in range(6):
        top = int(rng.integers(-(h // 4), hh - h + h // 4 + 1)) if h < hh else int(rng.integers(hh - h, 1))
        left = int(rng.integers(-(w // 4), ww - w + w // 4 + 1)) if w < ww else int(rng.integers(ww - w, 1))
        win = render.window((hh, ww), top, left, h, w)
        if win is None:
            continue
        ys, xs, ly, lx = win
        full = np.zeros((hh, ww), dtype=bool)
        full[ys, xs] = alpha[ly, lx] >= 0.5
        if np.count_nonzero(full) < max(cfg.min_visible_px, cfg.min_visible_frac * area0):
            continue
        if _occlusion_ok(placed, full, cfg):
            return win, full
    return None


def _paste(
    rng: np.random.Generator,
    cfg: SceneConfig,
    textures: tuple[Texture, ...],
    canvas: np.ndarray,
    placed: list[Instance],
    sil: np.ndarray,
    side: float,
    thin: bool,
    mode: str,
    category_id: int,
) -> bool:
    if thin:
        a = rng.uniform(2.5, 4.0)
        h, w = (side, side / a) if rng.random() < 0.5 else (side / a, side)
    else:
        a = math.sqrt(rng.uniform(0.8, 1.25))
        h, w = side * a, side / a
    angle = float(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
    alpha, shade = render.silhouette_maps(sil, max(2, round(h)), max(2, round(w)), angle)
    if np.count_nonzero(alpha >= 0.5) < cfg.min_visible_px:
        return False
    where = _place(rng, cfg, placed, alpha)
    if where is None:
        return False
    (ys, xs, ly, lx), full = where
    fill = _fill(mode, rng, textures, canvas, ys, xs, shade[ly, lx], alpha[ly, lx])
    render.composite(canvas, fill, alpha[ly, lx], ys, xs)
    for inst in placed:
        inst.mask &= ~full
    placed.append(Instance(category_id, full, 0, int(np.count_nonzero(full))))
    return True


def _crowd(
    rng: np.random.Generator,
    cfg: SceneConfig,
    canvas: np.ndarray,
    sil: Silhouettes,
) -> Instance | None:
    """A tight cluster of 4-8 tiny same-class items annotated as one iscrowd=1 region (COCO's crowd)."""
    hh, ww = cfg.image_size
    cls = int(rng.integers(len(sil.classes)))
    pool = sil.by_class[cls]
    if pool.size == 0:
        return None
    colour = render.random_colour(rng)
    cy, cx = rng.uniform(0.2, 0.8) * hh, rng.uniform(0.2, 0.8) * ww
    spread = rng.uniform(0.05, 0.12) * min(hh, ww)
    union = np.zeros((hh, ww), dtype=bool)
    for _ in range(int(rng.integers(4, 9))):
        item = sil.images[int(pool[rng.integers(pool.size)])]
        side = int(rng.integers(5, 10))
        alpha, shade = render.silhouette_maps(item, side, side, float(rng.uniform(-30, 30)))
        top = int(round(cy + rng.normal(0, spread))) - alpha.shape[0] // 2
        left = int(round(cx + rng.normal(0, spread))) - alpha.shape[1] // 2
        win = render.window((hh, ww), top, left, *alpha.shape)
        if win is None:
            continue
        ys, xs, ly, lx = win
        jitter = rng.normal(0, 8, 3).astype(np.float32)
        fill = (colour + jitter) * (0.35 + 0.65 * shade[ly, lx])[:, :, None]
        render.composite(canvas, fill, alpha[ly, lx], ys, xs)
        union[ys, xs] |= alpha[ly, lx] >= 0.5
    area = int(np.count_nonzero(union))
    if area < cfg.min_visible_px:
        return None
    return Instance(cls + 1, union, 1, area)


def render_scene(
    rng: np.random.Generator,
    cfg: SceneConfig,
    sil: Silhouettes,
    textures: tuple[Texture, ...] | None = None,
) -> Scene:
    """Compose one scene. Later objects occlude earlier ones; instance masks are the visible pixels."""
    textures = textures or load_textures()
    hh, ww = cfg.image_size
    n_clutter = int(rng.integers(cfg.clutter[0], cfg.clutter[1] + 1))
    canvas = render.background(rng, textures, hh, ww, second_texture_prob=cfg.second_texture_prob, clutter=n_clutter)
    placed: list[Instance] = []
    if rng.random() < cfg.crowd_prob:
        crowd = _crowd(rng, cfg, canvas, sil)
        if crowd is not None:
            placed.append(crowd)
    n_obj = int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1))
    for _ in range(n_obj):
        idx = int(rng.integers(len(sil.labels)))
        if rng.random() < cfg.small_prob:
            side = float(rng.integers(cfg.small_px[0], cfg.small_px[1] + 1))
        else:
            side = float(rng.uniform(*cfg.scale_range)) * min(hh, ww)
        thin = bool(rng.random() < cfg.thin_prob)
        u = rng.random()
        mode = (
            "camouflage"
            if u < cfg.camouflage_prob
            else "textured"
            if u < cfg.camouflage_prob + cfg.textured_fill_prob
            else "plain"
        )
        _paste(rng, cfg, textures, canvas, placed, sil.images[idx], side, thin, mode, int(sil.labels[idx]) + 1)
    image = render.finish(canvas, rng, cfg.noise_std)
    return Scene(image, placed)


# ------------------------------------------------------------------------------------------- COCO encoding
def rle_uncompressed(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (used for iscrowd=1): run lengths over the column-major pixels, zeros first."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def rle_compressed(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_to_polygons(mask: np.ndarray, tolerance: float = 0.5) -> list[list[float]]:
    """Outer contours as COCO polygons [x0, y0, x1, y1, ...]; holes are lost (COCO polygons have none)."""
    padded = np.pad(mask.astype(np.float32), 1)
    polys = []
    for contour in measure.find_contours(padded, 0.5):
        contour = measure.approximate_polygon(contour - 1.0, tolerance)
        if len(contour) < 4:  # closed contour: first == last, so < 3 distinct points
            continue
        # find_contours gives (row, col) at pixel centres; COCO polygon coordinates put pixel centres at +0.5.
        xy = np.stack([contour[:, 1] + 0.5, contour[:, 0] + 0.5], axis=1)
        polys.append([round(float(v), 2) for v in xy.ravel()])
    return polys


def coco_annotation(inst: Instance, ann_id: int, image_id: int, mask_format: str) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    if inst.iscrowd:
        seg: Any = rle_uncompressed(inst.mask)
    elif mask_format == "polygon":
        seg = mask_to_polygons(inst.mask) or rle_compressed(inst.mask)  # tiny masks: keep them exact
    else:
        seg = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": inst.category_id,
        "segmentation": seg,
        "area": float(mask_utils.area(rle)),
        "bbox": bbox,
        "iscrowd": inst.iscrowd,
    }


# ------------------------------------------------------------------------------------------- dataset writing
def _params(cfg: SceneConfig, seed: int, n_train: int, n_val: int) -> dict[str, Any]:
    p = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    p.update(seed=int(seed), n_train=int(n_train), n_val=int(n_val))
    return p


@dataclass(frozen=True)
class _Job:
    seed: int
    split: str
    cfg: SceneConfig
    fmnist: str | None


def _encode_scene(job: _Job, index: int) -> tuple[bytes, bytes, tuple[int, int], list[dict[str, Any]]]:
    """Render and encode one scene (image PNG, label PNG, size, annotations without ids). Pure function of
    (job, index), so worker processes give exactly the bytes a single process gives."""
    scene = render_scene(scene_rng(job.seed, job.split, index), job.cfg, load_silhouettes(job.split, job.fmnist))
    anns = [coco_annotation(inst, 0, 0, job.cfg.mask_format) for inst in scene.instances]
    return png_bytes(scene.image), png_bytes(scene.semantic()), scene.image.shape[:2], anns


def _encode_chunk(job: _Job, indices: range) -> list[tuple[bytes, bytes, tuple[int, int], list[dict[str, Any]]]]:
    return [_encode_scene(job, i) for i in indices]


def _encoded_scenes(job: _Job, n: int, pool: ProcessPoolExecutor | None):
    """Encoded scenes in index order, from the worker ``pool`` when there is one (tiny sets, or no pool:
    everything runs in this process)."""
    if pool is None or n < 16:
        for i in range(n):
            yield _encode_scene(job, i)
        return
    step = 8
    chunks = [range(a, min(a + step, n)) for a in range(0, n, step)]
    for chunk in pool.map(_encode_chunk, [job] * len(chunks), chunks):
        yield from chunk


def _write_split(
    tmp: Path,
    job: _Job,
    n: int,
    first_id: int,
    files: dict[str, str],
    categories: list[dict[str, Any]],
    pool: ProcessPoolExecutor | None,
    progress: bool = True,
) -> dict[str, int]:
    split = job.split
    images, anns = [], []
    n_crowd = 0
    from tqdm import tqdm  # a bar on a terminal only: logs captured to files stay readable

    show = progress and n > 0 and getattr(sys.stderr, "isatty", lambda: False)()
    scenes = tqdm(_encoded_scenes(job, n, pool), total=n, desc=f"render {split}", leave=False, disable=not show)
    for i, (img_png, sem_png, (h, w), scene_anns) in enumerate(scenes):
        image_id = first_id + i
        coco_name = f"{image_id:012d}.png"
        ade_stem = f"ADE_{'train' if split == 'train' else 'val'}_{i + 1:08d}.png"
        for rel, data in (
            (f"{COCO_DIRS[split]}/{coco_name}", img_png),
            (f"{ADE_ROOT}/images/{ADE_DIRS[split]}/{ade_stem}", img_png),
            (f"{ADE_ROOT}/annotations/{ADE_DIRS[split]}/{ade_stem}", sem_png),
        ):
            (tmp / rel).write_bytes(data)
            files[rel] = sha256_bytes(data)
        images.append({"id": image_id, "file_name": coco_name, "height": int(h), "width": int(w)})
        for ann in scene_anns:
            anns.append({**ann, "id": len(anns) + 1, "image_id": image_id})
            n_crowd += ann["iscrowd"]
    coco = {
        "info": {
            "description": "Fashion-MNIST silhouettes on scikit-image textures",
            "contributor": GENERATOR,
        },
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": categories,
    }
    rel = f"annotations/instances_{COCO_DIRS[split]}.json"
    data = json_bytes(coco)
    (tmp / rel).write_bytes(data)
    files[rel] = sha256_bytes(data)
    return {"images": n, "instances": len(anns), "crowd": n_crowd}


def generate_dataset(root: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """Write COCO (``annotations/instances_{train,val}2017.json``, ``{train,val}2017/``) and ADE20K
    (``ADEChallengeData2016/{images,annotations}/{training,validation}``) layouts of the same scenes under
    ``root``, plus ``root/manifest.json`` (parameters and the sha256 of every file). Returns the manifest
    (``ensure_dataset``, which takes the same ``options``, also says whether it was reused).

    ``scene`` holds SceneConfig overrides (objects_per_image, scale_range, camouflage_prob, clutter, ...).
    The directory is built in a temporary sibling and renamed into place, so ``root`` is never half-written.
    If ``root`` already holds a dataset made with identical parameters it is reused (its manifest returned);
    different parameters raise DataError unless ``overwrite``. Anything at ``root`` that this generator did not
    write (no manifest.json of ours) is never replaced. One writer at a time (a lock beside ``root``); the work
    directories a killed earlier writer of ``root`` left beside it are removed, and nothing else (see
    ``workdirs``). ``workers`` > 1 renders in forked processes that end with this one; the bytes written do not
    depend on it. ``progress`` shows a tqdm bar per split while rendering (only when stderr is a terminal).
    """
    manifest, _ = ensure_dataset(root, **options)
    return manifest


def ensure_dataset(
    root: str | os.PathLike[str],
    *,
    n_train: int,
    n_val: int,
    image_size: int | tuple[int, int] = 128,
    seed: int = 0,
    difficulty: float = 0.5,
    overwrite: bool = False,
    fmnist_dir: str | os.PathLike[str] | None = None,
    workers: int = 1,
    progress: bool = True,
    **scene: Any,
) -> tuple[dict[str, Any], bool]:
    """``generate_dataset``, returning ``(manifest, reused)``: reused is True when ``root`` already held a
    dataset with these parameters and nothing was generated (the CLI says so)."""
    if n_train < 0 or n_val < 0 or int(seed) < 0:
        raise ValueError(f"n_train, n_val and seed must be non-negative, got {n_train}, {n_val}, {seed}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    cfg = SceneConfig.from_difficulty(difficulty, image_size=image_size, **scene)
    params = _params(cfg, seed, n_train, n_val)
    params["difficulty"] = float(difficulty)
    root = Path(root)
    if root.name in ("", ".", ".."):
        raise ValueError(f"dataset root {str(root)!r} names no directory of its own; give e.g. data/generated")
    lock = DirLock(root, f"dataset directory {root}").acquire()
    try:
        return _generate_locked(root, cfg, params, seed, n_train, n_val, overwrite, fmnist_dir, workers, progress)
    finally:
        lock.release()


def _generate_locked(
    root: Path,
    cfg: SceneConfig,
    params: dict[str, Any],
    seed: int,
    n_train: int,
    n_val: int,
    overwrite: bool,
    fmnist_dir: str | os.PathLike[str] | None,
    workers: int,
    progress: bool = True,
) -> tuple[dict[str, Any], bool]:
    remove_stale_workdirs(root)  # a killed writer's leftovers (we hold the lock), and only those
    if os.path.lexists(root):
        existing = _our_manifest(root)
        if existing is None:
            if root.is_dir() and not root.is_symlink() and not any(root.iterdir()):
                pass  # an empty directory may be filled
            else:
                raise DataError(
                    f"{root} exists and is not a dataset vit-adapter generated (no manifest.json of "
                    f"{GENERATOR}); refusing to replace it: pick another output directory"
                )
        elif existing.get("params") == params:
            return existing, True
        elif not overwrite:
            raise DataError(f"{root} holds a dataset generated with other parameters; pass --overwrite to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    work = make_workdir(root, "tmp")
    try:
        tmp = work / CONTENT  # becomes root; the marker stays behind in work
        for split in SPLITS:
            (tmp / COCO_DIRS[split]).mkdir(parents=True)
            (tmp / ADE_ROOT / "images" / ADE_DIRS[split]).mkdir(parents=True)
            (tmp / ADE_ROOT / "annotations" / ADE_DIRS[split]).mkdir(parents=True)
        (tmp / "annotations").mkdir()
        classes = load_silhouettes("train", fmnist_dir)
        load_silhouettes("val", fmnist_dir)  # load (and warn) once here, before any worker forks
        load_textures()
        fm = None if fmnist_dir is None else str(fmnist_dir)
        categories = [{"id": i + 1, "name": n, "supercategory": classes.source} for i, n in enumerate(classes.classes)]
        files: dict[str, str] = {}
        with render_pool(workers) as pool:
            opts = (pool, progress)
            counts = {
                "train": _write_split(tmp, _Job(seed, "train", cfg, fm), n_train, 1, files, categories, *opts),
                "val": _write_split(tmp, _Job(seed, "val", cfg, fm), n_val, n_train + 1, files, categories, *opts),
            }
        manifest = {
            "format_version": FORMAT_VERSION,
            "generator": GENERATOR,
            "params": params,
            "silhouettes": classes.source,
            "categories": categories,
            "semantic": {
                "background_value": BACKGROUND_VALUE,
                "ignore_index": IGNORE_INDEX,
                "classes": ["background", *classes.classes],  # pixel value v -> classes[v]
            },
            "textures": textures_fingerprint(),
            "versions": {"numpy": np.__version__, "pillow": PIL.__version__},
            "counts": counts,
            "files": dict(sorted(files.items())),
        }
        (tmp / "manifest.json").write_bytes(json_bytes(manifest))
        swap_into_place(tmp, root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest, False


def _our_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of a dataset this generator wrote (its marker), else None."""
    man_path = root / "manifest.json"
    if not root.is_dir() or not man_path.is_file():
        return None
    try:
        existing = load_json(man_path)
    except DataError:
        return None
    return existing if isinstance(existing, dict) and existing.get("generator") == GENERATOR else None


def verify_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Re-hash every file listed in ``root/manifest.json``; raise DataError naming the first mismatch."""
    root = Path(root)
    manifest = load_json(root / "manifest.json")
    try:
        files = manifest["files"]
    except (KeyError, TypeError) as e:
        raise DataError(f"{root / 'manifest.json'} has no 'files' key") from e
    for rel, digest in files.items():
        path = root / rel
        if not path.is_file():
            raise DataError(f"file listed in the manifest is missing: {path}")
        if sha256_file(path) != digest:
            raise DataError(f"sha256 mismatch for {path} (file changed since generation)")
    return manifest
