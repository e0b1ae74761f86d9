"""ViT-Adapter (Chen et al., ICLR 2023) with one constructor flag per ablation.

Parts (reference §1.2-§1.6): a spatial prior module (SPM) turns the image into multi-scale features ``c``; in each of
N interactions an *injector* writes ``c`` into the ViT tokens (cross-attention scaled by a learnable γ), a group of
ViT blocks runs, and an *extractor* reads the tokens back into ``c`` (cross-attention + ConvFFN). Outputs are four
maps at strides 4/8/16/32. With N = 0 and every part off, the model is the paper's ViT baseline (reference §1.0).
The ablation rows and their flags are documented in ``docs/ablations.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import MSDeformAttn, build_cross_attention
from .baseline import BaselineNeck
from .vit import PlainViT, block_indices

Shapes = tuple[tuple[int, int], ...]


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "syncbn":  # falls back to BatchNorm when no process group is running (reference §4.5)
        return nn.SyncBatchNorm(channels)
    raise ValueError(f"norm must be 'bn' or 'syncbn', got {kind!r}")


def _conv_bn_relu(cin: int, cout: int, stride: int, norm: str) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _norm2d(norm, cout), nn.ReLU(inplace=True)]


def _tokens(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2)


class SpatialPriorModule(nn.Module):
    """Convolutional stem → features at strides 4/8/16/32, each projected to ``dim`` by a 1x1 conv (reference §1.2)."""

    def __init__(self, *, inplanes: int = 64, dim: int = 384, norm: str = "bn") -> None:
        super().__init__()
        c = inplanes
        self.stem = nn.Sequential(
            *_conv_bn_relu(3, c, 2, norm),
            *_conv_bn_relu(c, c, 1, norm),
            *_conv_bn_relu(c, c, 1, norm),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*_conv_bn_relu(c, 2 * c, 2, norm))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * c, 4 * c, 2, norm))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * c, 4 * c, 2, norm))
        self.fc1 = nn.Conv2d(c, dim, 1)
        self.fc2 = nn.Conv2d(2 * c, dim, 1)
        self.fc3 = nn.Conv2d(4 * c, dim, 1)
        self.fc4 = nn.Conv2d(4 * c, dim, 1)

    def forward(self, image: Tensor, patches: Tensor) -> list[Tensor]:
        # Channels-last activations: oneDNN's fp32 convolutions (forward and backward), BatchNorm and max-pool run
        # faster in NHWC on CPU (docs/performance.md), and the 1x1 fc outputs are then already (B, H*W, D) token
        # order, so flattening them into tokens is a view. Same function; only the rounding order differs
        # (tests/test_speed_equivalence.py judges it against float64). One copy of the 3-channel image.
        c1 = self.stem(image.contiguous(memory_format=torch.channels_last))
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [_pointwise(fc, x) for fc, x in ((self.fc1, c1), (self.fc2, c2), (self.fc3, c3), (self.fc4, c4))]


def _pointwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 convolution as one GEMM over the pixels of a channels-last map; returns a channels-last NCHW view.

    On CPU, PyTorch sends 1x1 convolutions to its slow im2col path (``_slow_conv2d``) instead of oneDNN; on NHWC
    memory the same arithmetic is a plain ``linear`` with no copies (the weight (D, C, 1, 1) is viewed as (D, C)).
    """
    return F.linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias).permute(0, 3, 1, 2)


class PatchPrior(nn.Module):
    """The "no SPM" ablation: the four prior maps are the ViT's own patch-embedding features (stride 16, before
    the position embedding) resampled bilinearly to strides 4/8/16/32. No convolution, no parameters.

    Why this definition: the convolutional stem is the only part of the adapter that sees pixels at finer than
    1/16 resolution. Replacing it by a parameter-free resampling keeps every token count, every attention and
    ConvFFN path, the level embedding and the output neck unchanged, so removing it measures the stem's
    high-resolution local prior alone, not the existence of multi-scale queries.
    """

    def forward(self, image: Tensor, patches: Tensor) -> list[Tensor]:
        h, w = patches.shape[-2:]
        sizes = [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (h // 2, w // 2)]
        return [
            patches if s == (h, w) else F.interpolate(patches, size=s, mode="bilinear", align_corners=False)
            for s in sizes
        ]


class ConvFFN(nn.Module):
    """Linear → depthwise 3x3 conv on each of the three token maps → GELU → Linear (reference §1.5)."""

    def __init__(self, *, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, shapes: Shapes) -> Tensor:
        x = self.fc1(x)
        b, _, ch = x.shape
        parts = torch.split(x, [h * w for h, w in shapes], dim=1)
        # One set of weights, each map convolved separately so zero padding stays per map (as official). The
        # token slices are viewed as channels-last (B, ch, h, w) maps and the outputs viewed back as tokens: no
        # transpose copies in or out, only the final cat (same values as transposing to NCHW and back).
        maps = [self.dwconv(p.view(b, h, w, ch).permute(0, 3, 1, 2)) for p, (h, w) in zip(parts, shapes)]
        x = torch.cat([m.permute(0, 2, 3, 1).reshape(b, h * w, ch) for m, (h, w) in zip(maps, shapes)], dim=1)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


class _NormedCrossAttention(nn.Module):
    """What the injector and the extractor share: LayerNorms on the query and the feature side, then the
    cross-attention. Built in this order (``query_norm``, ``feat_norm``, ``attn``), so state-dict keys and the
    RNG draws of the initialisation are those the two classes had when each built them itself."""

    def __init__(
        self, *, dim: int, n_levels: int, n_heads: int, n_points: int, deform_ratio: float, attention: str
    ) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = build_cross_attention(
            attention, dim=dim, n_levels=n_levels, n_heads=n_heads, n_points=n_points, ratio=deform_ratio
        )


class Injector(_NormedCrossAttention):
    """x ← x + γ ⊙ Attn(LN(x), LN(c)) with γ initialised to ``gamma_init`` (0 in the paper, reference §1.4)."""

    def __init__(
        self, *, dim: int, n_heads: int, n_points: int, deform_ratio: float, gamma_init: float, attention: str
    ) -> None:
        # The injector's queries are the ViT tokens and it reads the three prior levels c2/c3/c4.
        super().__init__(
            dim=dim, n_levels=3, n_heads=n_heads, n_points=n_points, deform_ratio=deform_ratio, attention=attention
        )
        self.gamma = nn.Parameter(gamma_init * torch.ones(dim))

    def forward(self, x: Tensor, c: Tensor, ref: Tensor, shapes: Shapes) -> Tensor:
        # x + γ ⊙ attn as one fused op (one pass over the tokens instead of two).
        return torch.addcmul(x, self.gamma, self.attn(self.query_norm(x), ref, self.feat_norm(c), shapes))


class Extractor(_NormedCrossAttention):
    """c ← c + Attn(LN(c), LN(x)); then c ← c + DropPath(ConvFFN(LN(c))) when ``with_cffn`` (reference §1.5)."""

    def __init__(
        self,
        *,
        dim: int,
        n_heads: int,
        n_points: int,
        deform_ratio: float,
        attention: str,
        with_cffn: bool,
        cffn_ratio: float,
        drop_path: float,
    ) -> None:
        # The extractor's queries are the multi-scale tokens c and it reads the single ViT level.
        super().__init__(
            dim=dim, n_levels=1, n_heads=n_heads, n_points=n_points, deform_ratio=deform_ratio, attention=attention
        )
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim=dim, hidden=int(dim * cffn_ratio))
            self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, c: Tensor, x: Tensor, ref: Tensor, vit_shape: Shapes, c_shapes: Shapes) -> Tensor:
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), vit_shape)
        if self.with_cffn:
            c = c + self.drop_path(self.ffn(self.ffn_norm(c), c_shapes))
        return c


class PassThrough(nn.Identity):
    """A disabled part: takes the inputs of the part it stands for and returns the first one unchanged.

    ``nn.Identity`` (timm's idiom) accepts one input; injectors are called with four. No parameters, so the
    state-dict keys are those of a model without the part.
    """

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        return x


def _maybe_cp(module: nn.Module, with_cp: bool, *args: Any) -> Any:
    """``module(*args)``, under gradient checkpointing when ``with_cp`` and the first input needs a gradient."""
    if with_cp and args[0].requires_grad and not isinstance(module, PassThrough):  # nothing to recompute
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class InteractionBlock(nn.Module):
    """Injector → ViT blocks[start:stop] → extractor (+ extra extractors); a disabled injector is a ``PassThrough``.

    The ViT blocks stay in ``ViTAdapter.vit`` (one ViT whose keys match the pretrained checkpoints), so
    ``forward`` receives the function that runs a range of them and returns the tapped tokens with ``x`` and ``c``.
    """

    def __init__(
        self,
        *,
        start: int,
        stop: int,
        injector: Injector | None,
        extractors: Sequence[Extractor],
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.start, self.stop = start, stop
        self.injector = injector if injector is not None else PassThrough()
        self.extractors = nn.ModuleList(extractors)
        self.with_cp = with_cp

    def forward(
        self,
        x: Tensor,
        c: Tensor | None,
        *,
        run_blocks: Callable[[Tensor, int, int], tuple[Tensor, list[Tensor]]],
        ref_inj: Tensor,
        ref_ext: Tensor,
        c_shapes: Shapes,
        vit_shape: Shapes,
    ) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        cp = self.with_cp and self.training
        x = _maybe_cp(self.injector, cp, x, c, ref_inj, c_shapes)
        x, taps = run_blocks(x, self.start, self.stop)
        for ext in self.extractors:
            c = _maybe_cp(ext, cp, c, x, ref_ext, vit_shape, c_shapes)
        return x, c, taps


class ViTAdapter(nn.Module):
    """ViT-Adapter backbone; every ablation of paper Tables 6-7 is a constructor flag.

    Architecture: ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``patch_size``, ``pretrain_size``,
    ``drop_path_rate``, ``layer_scale``, ``window_attn`` (bool: the detection setting; or a per-block list),
    ``window_size``, ``with_cp`` (gradient checkpointing), ``conv_inplane``, ``deform_num_heads``, ``norm``
    ('bn'|'syncbn' for SPM and output norms).

    Ablation switches (see docs/ablations.md):
      use_spm:          convolutional spatial prior (False = ``PatchPrior``: patch features resampled, no stem).
      injector:         'attention' (paper), 'add' (Variant 1: prior maps added to the baseline neck's outputs),
                        'none'.
      use_extractor:    extractors (and the extra ones) on/off.
      output_neck:      'adapter' (prior maps + ConvTranspose + ViT features + BN) or 'baseline' (reference §1.0).
      attention:        'deformable' (paper) or 'dense' (standard multi-head attention, Table 7 "Global").
      n_interactions:   N; the depth is split into N equal groups. N = 0 runs the ViT alone.
      gamma_init, cffn_ratio, with_cffn, n_points, deform_ratio, extra_extractors: as in the official code.
      add_vit_feature:  add ViT features to the adapter outputs; ``task`` picks which (reference §1.6):
                        'det' = the final tokens at every level, 'seg' = tokens after blocks depth*k/4 - 1.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        pretrain_size: int = 224,
        drop_path_rate: float = 0.0,
        layer_scale: bool = True,
        window_attn: bool | Sequence[bool] = False,
        window_size: int = 14,
        with_cp: bool = False,
        conv_inplane: int = 64,
        deform_num_heads: int = 6,
        n_points: int = 4,
        deform_ratio: float = 1.0,
        gamma_init: float = 0.0,
        cffn_ratio: float = 0.25,
        with_cffn: bool = True,
        extra_extractors: int = 2,
        n_interactions: int = 4,
        use_spm: bool = True,
        injector: Literal["attention", "add", "none"] = "attention",
        use_extractor: bool = True,
        output_neck: Literal["adapter", "baseline"] = "adapter",
        attention: Literal["deformable", "dense"] = "deformable",
        add_vit_feature: bool = True,
        task: Literal["det", "seg"] = "det",
        norm: Literal["bn", "syncbn"] = "bn",
    ) -> None:
        super().__init__()
        _validate(depth, n_interactions, injector, output_neck, attention, task, patch_size, use_extractor)
        self.embed_dim, self.depth, self.task = embed_dim, depth, task
        self.injector_kind, self.output_neck = injector, output_neck
        self.add_vit_feature = add_vit_feature
        self.with_cp = with_cp
        self.vit = PlainViT(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            patch_size=patch_size,
            pretrain_size=pretrain_size,
            drop_path_rate=drop_path_rate,
            layer_scale=layer_scale,
            window_attn=window_attn,
            window_size=window_size,
            with_cp=with_cp,
        )
        # Token taps after blocks depth*k/4 - 1: the baseline neck's out_indices and segmentation's ViT features.
        self.tap_indices = [depth * k // 4 - 1 for k in range(1, 5)]

        uses_prior = injector != "none" or use_extractor or output_neck == "adapter"
        self.prior: nn.Module | None = None
        if uses_prior:
            self.prior = (
                SpatialPriorModule(inplanes=conv_inplane, dim=embed_dim, norm=norm) if use_spm else PatchPrior()
            )
        # The level embedding tags c2/c3/c4 for the attention layers that read or write c.
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim)) if injector == "attention" or use_extractor else None

        attn_kw = dict(dim=embed_dim, n_heads=deform_num_heads, n_points=n_points, deform_ratio=deform_ratio)
        ext_kw = dict(
            **attn_kw,
            attention=attention,
            with_cffn=with_cffn,
            cffn_ratio=cffn_ratio,
            drop_path=drop_path_rate,
        )
        group = depth // n_interactions if n_interactions else depth
        blocks = []
        for i in range(n_interactions):
            inj = Injector(**attn_kw, gamma_init=gamma_init, attention=attention) if injector == "attention" else None
            # Extractor drop-path is the constant rate, as in the official code (reference §1.5, [I#167]).
            n_ext = (1 + (extra_extractors if i == n_interactions - 1 else 0)) if use_extractor else 0
            blocks.append(
                InteractionBlock(
                    start=i * group,
                    stop=(i + 1) * group,
                    injector=inj,
                    extractors=[Extractor(**ext_kw) for _ in range(n_ext)],
                    with_cp=with_cp,
                )
            )
        self.interactions = nn.ModuleList(blocks)

        if output_neck == "adapter":
            self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
            self.out_norms = nn.ModuleList(_norm2d(norm, embed_dim) for _ in range(4))
        else:
            self.baseline_neck = BaselineNeck(dim=embed_dim)
        self.out_channels = [embed_dim] * 4
        self._init_adapter_weights()
        self._deform_cache: dict[tuple, tuple[Tensor, Tensor, Shapes, Shapes]] = {}

    # -- initialisation ----------------------------------------------------------------------------------
    def _init_adapter_weights(self) -> None:
        """Official init for everything outside the ViT (reference §1.2), then MSDeformAttn's own reset."""
        for name, m in self.named_modules():
            if name.startswith("vit.") or name == "vit":
                continue
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm | nn.BatchNorm2d | nn.SyncBatchNorm | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()

    # -- inspection ---------------------------------------------------------------------------------------
    def param_breakdown(self) -> dict[str, int]:
        """{'vit': plain ViT, 'adapter': everything else in the backbone} (reference §1.8)."""
        vit = sum(p.numel() for p in self.vit.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"vit": vit, "adapter": total - vit}

    @property
    def has_unused_parameters(self) -> bool:
        """Whether a training step leaves some parameters without a gradient, so that DDP needs
        ``find_unused_parameters``. Only the adapter neck reads ``c`` at the end and the stride-4 prior map (as
        does Variant 1's 'add'); with the baseline neck the SPM's ``fc1`` and the last extractors feed nothing.
        ``tests/test_model.py`` checks this against the gradients of one step for every overlay."""
        if self.output_neck == "adapter":
            # Without extractors and ViT features the outputs are the prior maps alone: the ViT feeds nothing.
            return not self.add_vit_feature and not any(len(b.extractors) for b in self.interactions)
        spm_c1_unused = isinstance(self.prior, SpatialPriorModule) and self.injector_kind != "add"
        return spm_c1_unused or any(len(b.extractors) for b in self.interactions)

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides norms and biases: the level and position embeddings (the
        names the official configs list, reference §2)."""
        names = {f"vit.{n}" for n in self.vit.no_weight_decay()}
        return names | ({"level_embed"} if self.level_embed is not None else set())

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm-style groups for layer-wise lr decay: ViT embedding, ViT blocks; the adapter parts follow last."""
        vit = self.vit.group_matcher(coarse)
        blocks = r"^vit\.blocks\.(\d+)" if coarse else [(r"^vit\.blocks\.(\d+)", None)]
        return {"stem": vit["stem"].replace("^", "^vit\\."), "blocks": blocks}

    # -- geometry -----------------------------------------------------------------------------------------
    def deform_inputs(
        self, h: int, w: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Shapes, Shapes]:
        """Reference points and level shapes for the injector and the extractor (reference §1.3), cached per size."""
        key = (h, w, device, dtype)
        if key not in self._deform_cache:
            s = self.vit.patch_size
            inj_shapes = ((h // (s // 2), w // (s // 2)), (h // s, w // s), (h // (2 * s), w // (2 * s)))
            vit_shape = ((h // s, w // s),)
            ref_inj = _grid_centres(vit_shape, device, dtype)
            ref_ext = _grid_centres(inj_shapes, device, dtype)
            self._deform_cache[key] = (ref_inj, ref_ext, inj_shapes, vit_shape)
        return self._deform_cache[key]

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)

    def forward_features(self, image: Tensor) -> list[Tensor]:
        """The four output maps at strides 4/8/16/32."""
        return self._forward(image, self.tap_indices)[0]

    def forward_intermediates(
        self,
        image: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        output_fmt: Literal["NCHW", "NLC"] = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[list[Tensor], list[Tensor]]:
        """timm-style taps: the ViT tokens after the blocks in ``indices`` (None = every block, an int n = the
        last n), as (B, D, H/16, W/16) maps or (B, N, D) tokens, with the four output maps unless
        ``intermediates_only``. The outputs are those of ``forward`` (tapping only keeps references)."""
        take = block_indices(indices, self.depth)
        outs, taps = self._forward(image, take)
        tapped = [taps[i] for i in take]
        if output_fmt == "NCHW":
            b, (h, w) = image.shape[0], (s // self.vit.patch_size for s in image.shape[-2:])
            tapped = [t.transpose(1, 2).reshape(b, self.embed_dim, h, w) for t in tapped]
        return tapped if intermediates_only else (outs, tapped)

    def _forward(self, image: Tensor, indices: Sequence[int]) -> tuple[list[Tensor], dict[int, Tensor]]:
        b, _, h, w = image.shape
        if h % 32 or w % 32:
            raise ValueError(f"input height and width must be multiples of 32 (got {h}x{w}); pad the image first")
        patches = self.vit.patchify(image)
        grid = (patches.shape[2], patches.shape[3])
        x = self.vit.embed(patches)
        ref_inj, ref_ext, c_shapes, vit_shape = self.deform_inputs(h, w, image.device, x.dtype)

        priors = self.prior(image, patches) if self.prior is not None else None
        c = None
        if priors is not None and self.level_embed is not None:
            c = torch.cat([_tokens(p) + self.level_embed[i] for i, p in enumerate(priors[1:])], dim=1)

        # The outputs' own taps plus the requested ones, in block order; each range returns its taps.
        want = sorted(set(self.tap_indices) | set(indices))
        run_blocks = partial(self.vit.forward_blocks, grid=grid, indices=want)
        tapped: list[Tensor] = []
        if not self.interactions:
            x, tapped = run_blocks(x, 0, self.depth)
        for blk in self.interactions:
            x, c, t = blk(
                x, c, run_blocks=run_blocks, ref_inj=ref_inj, ref_ext=ref_ext, c_shapes=c_shapes, vit_shape=vit_shape
            )
            tapped += t
        taps = dict(zip(want, tapped))

        if self.output_neck == "baseline":
            outs = self.baseline_neck([taps[i] for i in self.tap_indices], grid)
            if self.injector_kind == "add":  # Variant 1: prior maps added at matching strides
                outs = [o + p for o, p in zip(outs, priors)]
            return outs, taps
        return self._adapter_outputs(x, c, priors, taps, grid, c_shapes), taps

    def _adapter_outputs(
        self,
        x: Tensor,
        c: Tensor | None,
        priors: list[Tensor],
        taps: dict[int, Tensor | None],
        grid: tuple[int, int],
        c_shapes: Shapes,
    ) -> list[Tensor]:
        b, _, d = x.shape
        if c is not None:
            parts = torch.split(c, [hh * ww for hh, ww in c_shapes], dim=1)
            c2, c3, c4 = (p.transpose(1, 2).reshape(b, d, hh, ww) for p, (hh, ww) in zip(parts, c_shapes))
        else:  # no attention reads or writes c: the prior maps pass straight through
            c2, c3, c4 = priors[1:]
        # In place: the transposed conv keeps its input, not its output, for backward (saves a 1/4-res map).
        c1 = self.up(c2).add_(priors[0])
        outs = [c1, c2, c3, c4]
        if self.add_vit_feature:
            if self.task == "det":  # the final tokens at every level: one (B, D, H, W) copy shared by the four
                maps = [x.transpose(1, 2).reshape(b, d, *grid)] * 4
            else:
                maps = [taps[i].transpose(1, 2).reshape(b, d, *grid) for i in self.tap_indices]
            scales = (4.0, 2.0, 1.0, 0.5)
            # c1 in place, as above: it is this function's own temporary and autograd keeps neither it nor the
            # upsampled map, so no fresh 3 MiB buffer (first-touch page faults) at the embedded size. c2-c4 are not:
            # they are views of c (the reshape only splits the token dim) or the priors, and c2 is the transposed
            # conv's saved input.
            outs = [
                (o.add_ if i == 0 else o.add)(
                    m if s == 1.0 else F.interpolate(m, scale_factor=s, mode="bilinear", align_corners=False)
                )
                for i, (o, m, s) in enumerate(zip(outs, maps, scales))
            ]
        return [norm(o) for norm, o in zip(self.out_norms, outs)]


def _grid_centres(shapes: Shapes, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Centres ((j+0.5)/W, (i+0.5)/H) of each grid, concatenated; shape (1, ΣHW, 1, 2) as (x, y)."""
    pts = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(
            (torch.arange(h, device=device, dtype=dtype) + 0.5) / h,
            (torch.arange(w, device=device, dtype=dtype) + 0.5) / w,
            indexing="ij",
        )
        pts.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    return torch.cat(pts, 0)[None, :, None, :]


def _validate(
    depth: int,
    n: int,
    injector: str,
    neck: str,
    attention: str,
    task: str,
    patch_size: int,
    use_extractor: bool,
) -> None:
    if depth % 4:
        raise ValueError(f"depth must be a multiple of 4 (got {depth}): outputs tap blocks depth*k/4 - 1")
    if n < 0 or n > depth:
        raise ValueError(f"n_interactions must be in 0..depth={depth} (got {n})")
    if n and depth % n:
        raise ValueError(f"n_interactions={n} must divide depth={depth} (N equal groups of blocks)")
    if injector not in ("attention", "add", "none"):
        raise ValueError(f"injector must be 'attention', 'add' or 'none', got {injector!r}")
    if injector == "add" and neck != "baseline":
        raise ValueError(
            "injector='add' (paper Variant 1) adds the prior maps to the baseline neck: set output_neck='baseline'"
        )
    if neck not in ("adapter", "baseline"):
        raise ValueError(f"output_neck must be 'adapter' or 'baseline', got {neck!r}")
    if attention not in ("deformable", "dense"):
        raise ValueError(f"attention must be 'deformable' or 'dense', got {attention!r}")
    if task not in ("det", "seg"):
        raise ValueError(f"task must be 'det' or 'seg', got {task!r}")
    if patch_size != 16:
        raise ValueError(f"patch_size must be 16 (the adapter's strides 4/8/16/32 assume it), got {patch_size}")
    if n == 0 and (injector == "attention" or use_extractor):
        raise ValueError(
            "n_interactions=0 leaves no place for the injector/extractor: "
            "set injector to 'none'/'add' and use_extractor=False"
        )
