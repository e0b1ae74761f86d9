"""Dense pretraining set: generated scenes with a class histogram per ViT token (the COCO-like stand-in).

The single-item classification set (``pretrain.py``) teaches a ViT to name one centred item; pilots showed that
this knowledge does not survive into multi-object scenes (docs/pilots.md). This set renders scenes with the same
generator as the downstream data (``synth.render_scene``) and labels every ``patch x patch`` token with the
fraction of its pixels that belongs to each class (background and the 10 Fashion-MNIST classes). Training a ViT
to predict that histogram is a supervised dense objective: the pretrained tokens then carry class semantics at
the scale and in the clutter of the downstream scenes, as ImageNet-pretrained features do for COCO.

The scenes never coincide with the downstream ones: their per-scene seeds are offset by ``SEED_OFFSET`` from the
data seed (the downstream data uses seeds 0 and, for pilots, 1000). The 'train' split draws Fashion-MNIST
training items, 'val' the test items, exactly as the downstream splits do.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._io import load_npz_cache, save_npz_cache
from .sources import load_silhouettes, load_textures
from .synth import SceneConfig, render_scene, scene_rng

SEED_OFFSET = 1_000_000  # pretraining scenes use seed data_seed + SEED_OFFSET: disjoint from downstream seeds
NUM_CLASSES = 11  # background + 10 item classes (the semantic label values 0..10)
# Bumped whenever the images or targets change: npz caches of another version are re-rendered.
TOKENS_VERSION = 1


def token_histograms(semantic: np.ndarray, patch: int, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """(H, W) integer labels -> (H/patch * W/patch, num_classes) float32: each token's class fractions.

    Tokens are in row-major order, as a ViT flattens its patch grid. Every row sums to 1.
    """
    h, w = semantic.shape
    if h % patch or w % patch:
        raise ValueError(f"label map {h}x{w} is not a multiple of the patch size {patch}")
    if semantic.max(initial=0) >= num_classes:
        raise ValueError(f"label value {int(semantic.max())} >= num_classes {num_classes}")
    onehot = np.eye(num_classes, dtype=np.float32)[semantic]  # (H, W, C)
    grid = onehot.reshape(h // patch, patch, w // patch, patch, num_classes).mean(axis=(1, 3))
    return grid.reshape(-1, num_classes)


def _render_one(args: tuple[int, str, int, SceneConfig, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, split, index, cfg, patch = args
    scene = render_scene(scene_rng(seed, split, index), cfg, load_silhouettes(split), load_textures())
    return scene.image, token_histograms(scene.semantic(), patch)


def render_token_split(
    split: str,
    *,
    n: int,
    image_size: int,
    data_seed: int = 0,
    patch: int = 16,
    difficulty: float = 0.5,
    workers: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(images uint8 (N, S, S, 3), token targets float32 (N, T, 11), silhouette source) of one split.

    Deterministic in (split, n, image_size, data_seed, patch, difficulty); ``workers`` > 1 renders in forked
    processes with identical output. With ``cache_dir`` the arrays are stored once as an npz (atomically).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    params = {
        "version": TOKENS_VERSION,
        "split": split,
        "n": int(n),
        "image_size": int(image_size),
        "seed": int(data_seed) + SEED_OFFSET,
        "patch": int(patch),
        "difficulty": float(difficulty),
        "silhouettes": load_silhouettes(split).source,
    }
    cache = None
    if cache_dir is not None:
        tag = f"{split}_{image_size}px_n{n}_seed{data_seed}_p{patch}_d{difficulty:g}_v{TOKENS_VERSION}"
        cache = Path(cache_dir) / f"scene_tokens_{tag}.npz"
        if cache.is_file():
            arrays, found = load_npz_cache(cache, ("images", "targets"), "a scene-token cache (delete it to re-render)")
            if found == params:
                return arrays["images"], arrays["targets"], params["silhouettes"]
    cfg = SceneConfig.from_difficulty(difficulty, image_size=int(image_size))
    jobs = [(params["seed"], split, i, cfg, int(patch)) for i in range(n)]
    if workers > 1 and n >= 16:
        import multiprocessing as mp

        load_silhouettes(split), load_textures()  # loaded once here, shared with the forked workers
        with mp.get_context("fork").Pool(workers) as pool:
            out = pool.map(_render_one, jobs, chunksize=32)
    else:
        out = [_render_one(j) for j in jobs]
    images = np.stack([o[0] for o in out])
    targets = np.stack([o[1] for o in out])
    if cache is not None:
        save_npz_cache(cache, params, images=images, targets=targets)
    return images, targets, params["silhouettes"]
