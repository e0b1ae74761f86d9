"""The two pretraining objectives of ``vit_adapter.engine.pretrain``: what each renders, how it scores a batch and
how it measures its held-out top-1.

``classify``: 10-way classification of one centred Fashion-MNIST item on a texture (mean-pooled tokens).
``scene_tokens``: every token of a generated scene predicts its patch's class histogram (background + 10 classes).

``engine/pretrain.py`` runs one objective-agnostic loop and asks the objective (picked once from
``OBJECTIVE_REGISTRY``) for the parts that differ, so a third objective is one class here, not a branch in three
places of the loop.
This module must not import ``engine.pretrain`` (which imports it); torch is imported inside functions so that
building the CLI parser stays cheap.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vit_adapter.engine.pretrain_config import PretrainConfig
    from vit_adapter.models.vit import PlainViT

log = logging.getLogger(__name__)

NUM_CLASSES = 10  # Fashion-MNIST classes: the classify head's outputs


def render_split(
    split: str,
    image_size: int,
    n: int,
    data_seed: int,
    item_scale: tuple[float, float],
    cache_dir: str | None,
    placement: str = "centre",
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images uint8 (N, 3, S, S), labels int64 (N,), silhouette source) of one split, via an npz cache if given.

    Rendering (~2-4 ms an image) is done once; training then reads from memory, so every epoch costs only the
    model. The cache holds exactly what a fresh render produces (the generator is deterministic).
    """
    import numpy as np
    import torch

    from vit_adapter.data._io import DataError
    from vit_adapter.data.pretrain import RENDER_VERSION, TexturedFashionMNIST

    ds = None
    cache = None
    if cache_dir is not None:
        tag = f"{item_scale[0]:g}-{item_scale[1]:g}" + ("" if placement == "centre" else f"_{placement}")
        name = f"tfmnist_v{RENDER_VERSION}_{split}_{image_size}px_n{n}_seed{data_seed}_scale{tag}.npz"
        cache = Path(cache_dir) / name
        if cache.is_file():
            try:
                ds = TexturedFashionMNIST.from_npz(cache)
            except DataError as err:  # stale or damaged cache: render afresh and replace it
                log.warning("re-rendering %s: %s", cache, err)
    if ds is None:
        ds = TexturedFashionMNIST(
            split, image_size=image_size, n=n, seed=data_seed, item_scale=item_scale, placement=placement
        )
        if cache is not None:
            ds.save_npz(cache)  # renders every image once, atomically written
    x = torch.from_numpy(np.ascontiguousarray(ds.images())).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(np.array(ds.labels[:n]), dtype=torch.int64)  # a copy: the npz arrays are read-only
    return x, y, ds.source


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 255] float (B, 3, S, S) -> ImageNet-normalised float, exactly as the dataset does it."""
    import torch

    from vit_adapter.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / 255.0
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) / 255.0
    return (x.float() / 255.0 - mean) / std


def classify(vit: PlainViT, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of normalised images: the ViT has no class token, so its tokens are mean-pooled."""
    return head(vit(x).mean(dim=1))


def _held_out_score(
    vit: PlainViT,
    head: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    hits: Callable[[torch.Tensor, torch.Tensor], tuple[int, int]],
    batch_size: int,
) -> float:
    """Sum ``hits(images batch, targets batch) -> (correct, counted)`` over uint8 images (N, 3, S, S) in eval
    mode without gradients; the modules' train/eval state is restored afterwards."""
    import torch

    was = vit.training, head.training
    vit.eval()
    head.eval()
    correct = counted = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            c, n = hits(normalize(images[i : i + batch_size]), targets[i : i + batch_size])
            correct, counted = correct + c, counted + n
    vit.train(was[0])
    head.train(was[1])
    return correct / max(counted, 1)


def evaluate_top1(
    vit: PlainViT, head: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250
) -> float:
    """Top-1 accuracy of (vit, head) on uint8 images (N, 3, S, S), in eval mode, without gradients."""

    def hits(x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
        return int((classify(vit, head, x).argmax(dim=1) == y).sum()), len(y)

    return _held_out_score(vit, head, images, labels, hits, batch_size)


def token_logits(vit: PlainViT, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, T, C) per-token logits of normalised images (the scene_tokens objective)."""
    return head(vit(x))


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Objectness + class loss of each token against its patch's class histogram ``targets`` (B, T, C).

    Channel 0 of ``logits`` is an objectness logit, trained with binary cross-entropy towards the patch's object
    share; channels 1.. are class logits, trained with soft cross-entropy towards the patch's class mix among its
    object pixels, each token weighted by its object share. Why factorised: with ~87 % background pixels a single
    softmax spreads the object mass over 10 classes and background wins every argmax (the 11-class pilots stayed
    at that prior); detection heads separate "is there an object" from "which class" for the same reason.
    """
    import torch.nn.functional as F

    fg = 1.0 - targets[..., 0]
    objectness = F.binary_cross_entropy_with_logits(logits[..., 0], fg)
    mix = targets[..., 1:] / fg.clamp(min=1e-6).unsqueeze(-1)
    ce = -(mix * logits[..., 1:].log_softmax(dim=-1)).sum(dim=-1)
    return objectness + (fg * ce).sum() / fg.sum().clamp(min=1e-6)


def token_hits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(correct, counted) over the tokens whose majority class is an object: their class argmax (channels 1..)
    against the patch's most frequent object class."""
    obj = targets.argmax(dim=-1) > 0
    right = logits[..., 1:].argmax(dim=-1) == targets[..., 1:].argmax(dim=-1)
    return int((right & obj).sum()), int(obj.sum())


def flip_tokens(targets: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-token targets (B, T, C) of horizontally flipped images (T = grid[0] * grid[1], row-major)."""
    b, t, c = targets.shape
    return targets.view(b, grid[0], grid[1], c).flip(2).reshape(b, t, c)


def evaluate_tokens(
    vit: PlainViT, head: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 250
) -> float:
    """Held-out token top-1 over object-majority tokens, in eval mode, without gradients."""
    return _held_out_score(
        vit, head, images, targets, lambda x, y: token_hits(token_logits(vit, head, x), y), batch_size
    )


# ---------------------------------------------------------------------------------------------------------
# The objectives
# ---------------------------------------------------------------------------------------------------------


class PretrainObjective(ABC):
    """What a pretraining objective supplies to the loop: its data, head width, batch loss and held-out score.

    Built once a run from its config and resolved ViT kwargs. Images are uint8 (N, 3, S, S) as loaded; the loop
    augments and normalises them. Objectives never touch the loop's generator: its draws (order, crop, flip,
    inversion) must stay in one place for a seed to give the same run.
    """

    def __init__(self, cfg: PretrainConfig, vit_kwargs: dict[str, Any]) -> None:
        self.cfg = cfg
        self.image_size: int = vit_kwargs["pretrain_size"]
        self.patch_size: int = vit_kwargs.get("patch_size", 16)

    @classmethod
    def check(cls, cfg: PretrainConfig) -> None:
        """The objective's own rules on the shared options (ValueError naming the problem); none by default."""
        return None

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Output width of the head."""

    @property
    @abstractmethod
    def render_version(self) -> int:
        """Version of the renderer behind ``load`` (recorded in the sidecar; a new one invalidates caches)."""

    @abstractmethod
    def load(self, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(uint8 images (n, 3, S, S), targets, silhouette source) of ``split``."""

    @abstractmethod
    def loss_and_hits(
        self, vit: PlainViT, head: nn.Module, x: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, int, int]:
        """(scalar training loss, correct, counted) of a batch of normalised images ``x``."""

    def flip_targets(self, targets: torch.Tensor, flip: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Targets of the batch after the images where ``flip`` (bool (B,)) is set were mirrored horizontally.

        The default suits whole-image labels, which a mirror leaves unchanged.
        """
        return targets

    @abstractmethod
    def evaluate(
        self, vit: PlainViT, head: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int
    ) -> float:
        """Held-out top-1 on uint8 ``images``, in eval mode, without gradients."""

    @abstractmethod
    def describe_val(self) -> str:
        """What the held-out top-1 was measured on (the sidecar's ``top1_split``)."""


class ClassifyObjective(PretrainObjective):
    """10-way classification of one textured Fashion-MNIST item, label-smoothed cross-entropy."""

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    @property
    def render_version(self) -> int:
        from vit_adapter.data.pretrain import RENDER_VERSION

        return RENDER_VERSION

    def load(self, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        c = self.cfg
        return render_split(split, self.image_size, n, c.data_seed, c.item_scale, c.cache_dir, c.placement)

    def loss_and_hits(
        self, vit: PlainViT, head: nn.Module, x: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, int, int]:
        import torch.nn.functional as F

        logits = classify(vit, head, x)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.cfg.label_smoothing)
        return loss, int((logits.argmax(1) == targets).sum()), len(targets)

    def evaluate(
        self, vit: PlainViT, head: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int
    ) -> float:
        return evaluate_top1(vit, head, images, targets, batch_size)

    def describe_val(self) -> str:
        return f"val (Fashion-MNIST test items 0..{self.cfg.n_val - 1}, held out)"


class SceneTokensObjective(PretrainObjective):
    """Per-token class histograms of generated scenes (``token_loss``), scored on object-majority tokens."""

    @classmethod
    def check(cls, cfg: PretrainConfig) -> None:
        # The token targets are computed for the uncropped scene; a crop-and-resize would need them recomputed.
        # Inversion is simply not part of this recipe (docs/pretraining.md).
        if cfg.augment not in ("none", "flip"):
            raise ValueError(f"objective scene_tokens supports augment none|flip, got {cfg.augment!r}")
        if cfg.invert_prob != 0:
            raise ValueError("objective scene_tokens has no photometric inversion (invert_prob must be 0)")

    @property
    def num_classes(self) -> int:
        from vit_adapter.data.scene_tokens import NUM_CLASSES as SCENE_CLASSES

        return SCENE_CLASSES

    @property
    def render_version(self) -> int:
        from vit_adapter.data.scene_tokens import TOKENS_VERSION

        return TOKENS_VERSION

    def load(self, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        import numpy as np
        import torch

        from vit_adapter.data.scene_tokens import render_token_split

        c = self.cfg
        images, targets, src = render_token_split(
            split,
            n=n,
            image_size=self.image_size,
            data_seed=c.data_seed,
            patch=self.patch_size,
            difficulty=c.scene_difficulty,
            workers=c.render_workers,
            cache_dir=c.cache_dir,
        )
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        return x, torch.from_numpy(np.array(targets)), src

    def loss_and_hits(
        self, vit: PlainViT, head: nn.Module, x: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, int, int]:
        logits = token_logits(vit, head, x)
        loss = token_loss(logits, targets)
        hits, counted = token_hits(logits.detach(), targets)
        return loss, hits, counted

    def flip_targets(self, targets: torch.Tensor, flip: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        import torch

        return torch.where(flip[:, None, None], flip_tokens(targets, grid), targets)

    def evaluate(
        self, vit: PlainViT, head: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int
    ) -> float:
        return evaluate_tokens(vit, head, images, targets, batch_size)

    def describe_val(self) -> str:
        from vit_adapter.data.scene_tokens import SEED_OFFSET

        c = self.cfg
        return (
            f"val: object-majority tokens of {c.n_val} scenes of Fashion-MNIST test items (seed "
            f"{c.data_seed + SEED_OFFSET}, held out)"
        )


# Keyed by ``PretrainConfig.objective``; ``engine.pretrain.OBJECTIVES`` is its keys.
OBJECTIVE_REGISTRY: dict[str, type[PretrainObjective]] = {
    "classify": ClassifyObjective,
    "scene_tokens": SceneTokensObjective,
}
