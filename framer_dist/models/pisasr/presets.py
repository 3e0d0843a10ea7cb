"""U-Net geometries of the pisasr family (docs/specs/framer_u.md, "Backbone" and "Presets"), as
``UNet2DConditionModel`` keyword arguments.

``sd2.1-base`` is the configuration of stabilityai/stable-diffusion-2-1-base's ``unet/`` (865,910,724
parameters); ``unet-tiny`` uses the same block classes, resamplers and LoRA split at a few hundred
thousand parameters (tests and the CPU demo, 16x16 latents)."""

from __future__ import annotations

from typing import Any

_SD21_BASE: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
    dual_cross_attention=False, use_linear_projection=True, num_class_embeds=None,
    upcast_attention=False, resnet_time_scale_shift="default",
)

PRESETS: dict[str, dict[str, Any]] = {
    # Tests and the CPU demo: CrossAttnDown x2 + Down, the UNetMidBlock2DCrossAttn, Up +
    # CrossAttnUp x2, linear projection, 4 GroupNorm groups: 370,500 parameters, 7 blocks.
    "unet-tiny": dict(
        _SD21_BASE, sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 32), layers_per_block=1, attention_head_dim=2,
        cross_attention_dim=16, norm_num_groups=4,
    ),
    "sd2.1-base": dict(_SD21_BASE),
}

# The keys that decide whether a pretrained unet/ folder fits a preset (sample_size only sets a
# default size, upcast_attention only the attention's precision).
GEOMETRY_KEYS = (
    "in_channels", "out_channels", "down_block_types", "mid_block_type", "up_block_types",
    "block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
    "use_linear_projection", "norm_num_groups", "transformer_layers_per_block",
)

# The U-Net's frozen text encoder width per preset (prompt embeddings are [B, 77, D]).
TEXT_DIMS = {name: int(cfg["cross_attention_dim"]) for name, cfg in PRESETS.items()}


def preset_config(name: str) -> dict[str, Any]:
    """A copy of the preset's constructor arguments; unknown names raise naming `model.preset`."""
    if name not in PRESETS:
        raise ValueError(f"config key 'model.preset': {name!r} is not a known pisasr preset; "
                         f"allowed values: {', '.join(map(repr, PRESETS))}")
    return dict(PRESETS[name])
