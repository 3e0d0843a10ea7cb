"""Backbone geometries (docs/specs/dit4sr.md, "Geometry"), as SD3Transformer2DModel keyword
arguments."""

from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = dict(
    patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
    joint_attention_dim=4096, pooled_projection_dim=2048, sample_size=128,
)

PRESETS: dict[str, dict[str, Any]] = {
    # Tests and the CPU demo: same code paths as SD3.5-medium (a dual-attention block, RMS q/k norm,
    # a context_pre_only last block), a few hundred thousand parameters.
    "tiny": dict(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=32,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    ),
    "sd3-medium": dict(
        _COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
        pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None,
    ),
    "sd3.5-medium": dict(
        _COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    ),
    "sd3.5-large": dict(
        _COMMON, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
        pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm",
    ),
}

# The keys that decide whether a pretrained folder fits a preset (sample_size only sets a default).
GEOMETRY_KEYS = (
    "patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
    "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
    "pooled_projection_dim", "pos_embed_max_size", "dual_attention_layers", "qk_norm",
)


def preset_geometry(name: str) -> dict[str, Any]:
    """A copy of the preset's constructor arguments; unknown names raise naming `model.preset`."""
    if name not in PRESETS:
        raise ValueError(f"config key 'model.preset': {name!r} is not a known preset; "
                         f"allowed values: {', '.join(map(repr, PRESETS))}")
    return dict(PRESETS[name])
