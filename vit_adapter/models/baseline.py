"""The paper's ViT-baseline output neck (reference §1.0): a simple feature pyramid from four depth quarters."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class BaselineNeck(nn.Module):
    """LayerNorm'd ViT tokens from blocks depth*k/4 - 1, reshaped to stride 16, then
    2x(ConvTranspose) → stride 4, ConvTranspose → 8, identity → 16, MaxPool → 32."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        if dim % 32:
            raise ValueError(f"the baseline neck's GroupNorm(32, dim) needs dim divisible by 32 (got {dim})")
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-6) for _ in range(4))
        self.up1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, 2),
            nn.GroupNorm(32, dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, 2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.up3 = nn.Identity()
        self.up4 = nn.MaxPool2d(2, 2)

    def forward(self, feats: Sequence[Tensor], grid: tuple[int, int]) -> list[Tensor]:
        b, _, d = feats[0].shape
        maps = [norm(f).transpose(1, 2).reshape(b, d, *grid) for norm, f in zip(self.norms, feats)]
        return [up(m) for up, m in zip((self.up1, self.up2, self.up3, self.up4), maps)]
