"""Plain ViT for dense prediction, built from timm's ViT blocks (reference §1.1).

Differences from timm's ``VisionTransformer`` are the official ViT-Adapter ones: no class token, no final norm,
the position embedding is stored at the pretraining grid and resized bicubically to every input grid, optional
14x14 window attention (zero padded *after* ``norm1``, as the official ``WindowedAttention``), and LayerScale on
by default. Block parameters keep timm's names, so DeiT/AugReg/timm state dicts load without renaming.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from timm.models.vision_transformer_sam import window_partition, window_unpartition
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class WindowBlock(Block):
    """A timm ``Block`` whose attention runs inside ``window_size``² windows of the token grid.

    Zero padding is applied to the normed tokens, so padded keys/values equal the qkv bias as in the official
    code; drop-path acts per sample after the windows are merged back (timm's SAM block would drop per window).
    """

    def __init__(self, *args, window_size: int = 14, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.window_size = window_size

    def forward_grid(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        h, w = grid
        y = self.norm1(x).view(b, h, w, c)
        y, pad_hw = window_partition(y, self.window_size)
        ws = self.window_size
        y = self.attn(y.view(-1, ws * ws, c)).view(-1, ws, ws, c)
        y = window_unpartition(y, ws, (h, w), pad_hw).reshape(b, n, c)
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _run_block(block: nn.Module, x: Tensor, grid: tuple[int, int]) -> Tensor:
    return block.forward_grid(x, grid) if isinstance(block, WindowBlock) else block(x)


def window_flags(depth: int, window_attn: bool | Sequence[bool]) -> list[bool]:
    """Per-block window flags. ``True`` means the detection setting: every block windowed except each
    ``depth/4``-th (indices 2,5,8,11 for 12 layers; 5,11,17,23 for 24; reference §1.1)."""
    if isinstance(window_attn, bool):
        if not window_attn:
            return [False] * depth
        q = depth // 4
        return [(i + 1) % q != 0 for i in range(depth)]
    flags = [bool(f) for f in window_attn]
    if len(flags) != depth:
        raise ValueError(f"window_attn has {len(flags)} entries but depth is {depth}")
    return flags


class PlainViT(nn.Module):
    """Patch embedding + position embedding + transformer blocks; tokens in, tokens out (B, H*W, D)."""

    def __init__(
        self,
        *,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        pretrain_size: int = 224,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale: bool = True,
        window_attn: bool | Sequence[bool] = False,
        window_size: int = 14,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_size = patch_size
        self.pretrain_grid = (pretrain_size // patch_size, pretrain_size // patch_size)
        self.with_cp = with_cp
        self.patch_embed = PatchEmbed(
            img_size=pretrain_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            flatten=False,
            strict_img_size=False,
        )
        # Stored at the pretraining grid without a class slot (the official code keeps and discards it).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pretrain_grid[0] * self.pretrain_grid[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # Linear drop-path schedule (reference §1.1); plain floats so construction works on the meta device.
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        common = dict(
            dim=embed_dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            init_values=1.0 if layer_scale else None,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        self.window_flags = window_flags(depth, window_attn)
        self.blocks = nn.ModuleList(
            WindowBlock(**common, drop_path=dpr[i], window_size=window_size)
            if win
            else Block(**common, drop_path=dpr[i])
            for i, win in enumerate(self.window_flags)
        )
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_vit_weights)

    def resized_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Bicubic resize (align_corners=False, no antialias) from the pretraining grid, reference §1.1."""
        if tuple(grid) == self.pretrain_grid:
            return self.pos_embed
        gh, gw = self.pretrain_grid
        pe = self.pos_embed.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe.float(), size=grid, mode="bicubic", align_corners=False).to(self.pos_embed.dtype)
        return pe.flatten(2).transpose(1, 2)

    def patchify(self, x: Tensor) -> Tensor:
        """Patch features as a map (B, D, H/16, W/16), before the position embedding."""
        return self.patch_embed(x)

    def embed(self, patches: Tensor) -> Tensor:
        grid = (patches.shape[2], patches.shape[3])
        tokens = patches.flatten(2).transpose(1, 2)
        # Position embedding first: the sum then takes its contiguous (B, N, D) layout instead of the transposed
        # view's, and every later residual add and LayerNorm runs on contiguous tokens (same values).
        return self.pos_drop(self.resized_pos_embed(grid) + tokens)

    def forward_blocks(
        self, x: Tensor, start: int, stop: int, grid: tuple[int, int], indices: Collection[int] = ()
    ) -> tuple[Tensor, list[Tensor]]:
        """Run blocks ``start..stop-1``; also return the tokens after each block whose index is in ``indices``,
        in block order (returned, not written into a caller's dict, so the taps are plain outputs)."""
        tapped: list[Tensor] = []
        for i in range(start, stop):
            blk = self.blocks[i]
            if self.with_cp and self.training and x.requires_grad:
                x = checkpoint(_run_block, blk, x, grid, use_reentrant=False)
            else:
                x = _run_block(blk, x, grid)
            if i in indices:
                tapped.append(x)
        return x, tapped

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        output_fmt: Literal["NCHW", "NLC"] = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm-style taps: the tokens after the blocks in ``indices`` (None = every block, an int n = the last
        n blocks), as (B, D, H, W) maps or (B, N, D) tokens, with the final tokens unless ``intermediates_only``."""
        take = block_indices(indices, self.depth)
        patches = self.patchify(x)
        grid = (patches.shape[2], patches.shape[3])
        x, tapped = self.forward_blocks(self.embed(patches), 0, self.depth, grid, indices=take)
        if output_fmt == "NCHW":
            tapped = [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid) for t in tapped]
        return tapped if intermediates_only else (x, tapped)

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides the 1-D ones (timm's convention)."""
        return {"pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm-style parameter groups for layer-wise lr decay: the embedding, then one group per block."""
        return {
            "stem": r"^pos_embed|^patch_embed",
            "blocks": r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None)],
        }

    def forward(self, x: Tensor) -> Tensor:
        patches = self.patchify(x)
        grid = (patches.shape[2], patches.shape[3])
        return self.forward_blocks(self.embed(patches), 0, self.depth, grid)[0]


def block_indices(indices: int | Sequence[int] | None, depth: int) -> list[int]:
    """Block indices to tap, as timm's ``forward_intermediates``: None = all, n = the last n, else the list."""
    if indices is None:
        return list(range(depth))
    take = list(range(depth - indices, depth)) if isinstance(indices, int) else sorted(set(indices))
    if not take or take[0] < 0 or take[-1] >= depth:
        raise ValueError(f"block indices must lie in 0..{depth - 1}, got {indices}")
    return take


def _init_vit_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------------
# Loading timm / DeiT / official checkpoints from a local file.

# Keys a classification checkpoint has that a dense-prediction ViT does not use (expected, reported quietly).
_CLASSIFIER_KEYS = re.compile(r"^(cls_token|dist_token|reg_token|norm\.|fc_norm\.|head\.|head_dist\.|pre_logits\.)")


@dataclass
class LoadReport:
    """What happened when a state dict was loaded into a ``PlainViT``."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.resized:
            parts.append(f"resized {', '.join(self.resized)}")
        if self.missing:
            parts.append(f"missing (kept at init) {_abbrev(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {_abbrev(self.unexpected)}")
        if self.ignored:
            parts.append(f"ignored classifier keys {_abbrev(self.ignored)}")
        return "; ".join(parts)


def _abbrev(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


class WeightLoadError(ValueError):
    """A checkpoint that cannot be loaded into the model (unreadable file or shape mismatch)."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file; unwrap ``model``/``state_dict`` containers."""
    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: object = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any decoding failure is a bad file
        raise WeightLoadError(f"cannot read weights file {path}: {err}") from err
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise WeightLoadError(f"weights file {path} does not hold a state dict of tensors")
    return dict(sd)


def _normalise_key(key: str) -> str:
    key = re.sub(r"^(module\.|backbone\.|encoder\.|vit\.)", "", key)
    # Official ViT-Adapter names LayerScale gamma1/gamma2; timm names them ls1.gamma/ls2.gamma.
    return re.sub(r"^blocks\.(\d+)\.gamma([12])$", r"blocks.\1.ls\2.gamma", key)


def load_vit_state_dict(vit: PlainViT, state_dict: Mapping[str, Tensor]) -> LoadReport:
    """Load a timm/DeiT/official state dict into ``vit``: class slot dropped from ``pos_embed``, which is
    resized bicubically to the model's pretraining grid when needed; LayerScale gammas absent from DeiT files
    stay at their init (reference §1.1, [I#34]). Any other shape mismatch raises, naming the keys."""
    report = LoadReport()
    own = vit.state_dict()
    new: dict[str, Tensor] = {}
    for raw_key, value in state_dict.items():
        key = _normalise_key(raw_key)
        if _CLASSIFIER_KEYS.match(key):
            report.ignored.append(raw_key)
            continue
        if key not in own:
            report.unexpected.append(raw_key)
            continue
        if key == "pos_embed" and value.shape[-1] == own[key].shape[-1]:
            value = _adapt_pos_embed(value, vit)
            if state_dict[raw_key].shape != own[key].shape:
                report.resized.append(f"pos_embed {tuple(state_dict[raw_key].shape)}->{tuple(value.shape)}")
        new[key] = value
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in new.items() if v.shape != own[k].shape
    ]
    if mismatched:
        raise WeightLoadError("shape mismatch for " + "; ".join(mismatched))
    vit.load_state_dict(new, strict=False)
    report.loaded = sorted(new)
    report.missing = sorted(k for k in own if k not in new)
    return report


def _adapt_pos_embed(pe: Tensor, vit: PlainViT) -> Tensor:
    n = pe.shape[1]
    side = int(round((n - 1) ** 0.5))
    if side * side == n - 1:  # class slot present
        pe = pe[:, 1:]
        n -= 1
    side = int(round(n**0.5))
    if side * side != n:
        raise WeightLoadError(f"pos_embed with {pe.shape[1]} tokens is not a square grid (+ optional class slot)")
    if (side, side) == vit.pretrain_grid:
        return pe
    grid = pe.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=vit.pretrain_grid, mode="bicubic", align_corners=False)
    return grid.flatten(2).transpose(1, 2).to(pe.dtype)
