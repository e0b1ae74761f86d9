"""Named presets and ``create_model``: official sizes T/S/B/L (reference §2), the paper's ViT baselines, CPU preset."""

from __future__ import annotations

from typing import Any

from .adapter import ViTAdapter

# Official defaults per size (reference §2), one row each as in the official configs. The CPU row is the embedded
# default: DeiT-T width, a third of its depth, a lighter stem, chosen for the 2-core budget of the default
# pipeline (see reports/ for how); depth stays a multiple of 4. Its pretraining resolution is the offline
# pretraining's (docs/pretraining.md): a 3x3 grid, resized bicubically.
_SIZE_COLUMNS = ("embed_dim", "depth", "num_heads", "deform_num_heads", "deform_ratio", "drop_path_rate")
_SIZE_ROWS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "t": ((192, 12, 3, 6, 1.0, 0.1), {}),
    "s": ((384, 12, 6, 6, 1.0, 0.2), {}),
    "b": ((768, 12, 12, 12, 0.5, 0.3), {}),
    "l": ((1024, 24, 16, 16, 0.5, 0.4), {"pretrain_size": 384}),
    "cpu": ((192, 4, 3, 6, 1.0, 0.1), {"conv_inplane": 32, "pretrain_size": 48}),
}
_SIZES: dict[str, dict[str, Any]] = {
    size: {**dict(zip(_SIZE_COLUMNS, row, strict=True)), **extra} for size, (row, extra) in _SIZE_ROWS.items()
}

# The paper's ViT baseline (reference §1.0): N = 0, no SPM, baseline neck; drop_path 0.1 in its configs (reference §2).
_BASELINE = dict(n_interactions=0, use_spm=False, injector="none", use_extractor=False, output_neck="baseline")

# Pretrained ViT each official preset starts from (reference §2); a local file is always accepted instead.
PRETRAINED = {
    "t": "deit_tiny_patch16_224.fb_in1k",
    "s": "deit_small_patch16_224.fb_in1k",
    "b": "deit_base_patch16_224.fb_in1k",
    "l": "vit_large_patch16_384.augreg_in21k_ft_in1k",
}


def preset_names() -> list[str]:
    return [f"{kind}_{size}" for kind in ("vit_adapter", "vit") for size in _SIZES]


def preset_kwargs(name: str, task: str = "det") -> dict[str, Any]:
    """Constructor arguments of a preset, before user overrides."""
    kind, _, size = name.rpartition("_")
    if kind not in ("vit_adapter", "vit") or size not in _SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(preset_names())}")
    kw: dict[str, Any] = dict(_SIZES[size], task=task)
    # Windowed attention is the detection setting; ADE20K configs use global attention (reference §1.1).
    kw["window_attn"] = task == "det" and size != "cpu"
    if kind == "vit":
        kw.update(_BASELINE, drop_path_rate=0.1 if size != "cpu" else kw["drop_path_rate"])
    return kw


def create_model(name: str, task: str = "det", **overrides: Any) -> ViTAdapter:
    """Build a backbone by preset name with any constructor flag overridden (``None`` values are ignored)."""
    kw = preset_kwargs(name, task)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return ViTAdapter(**kw)
