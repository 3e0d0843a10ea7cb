"""The LR-conditioned SD3/SD3.5 MMDiT (DIT4SR_SPEC.md) with the FRAMER per-layer readout."""

from .loading import (PretrainedLoadError, build_model, is_control_key, load_pretrained,
                      save_model)
from .presets import PRESETS, preset_geometry
from .training import (apply_training_mode, load_control, load_lora, lora_state_dict,
                       save_control, save_lora)
from .transformer import DiT4SROutput, DiT4SRTransformer

__all__ = [
    "PRESETS", "DiT4SROutput", "DiT4SRTransformer", "PretrainedLoadError", "apply_training_mode",
    "build_model", "is_control_key", "load_control", "load_lora",
    "load_pretrained", "lora_state_dict", "preset_geometry", "save_control", "save_lora",
    "save_model",
]
