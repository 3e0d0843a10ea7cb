"""The DiT4SR family: the LR-conditioned SD3/SD3.5 MMDiT (docs/specs/dit4sr.md) with the FRAMER
per-layer readout. ``family.py`` is what the trainer sees; the names below load diffusers and
peft on first use (PEP 562), so config checks that only need the family's names stay light."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "PretrainedLoadError": "loading", "build_model": "loading", "is_control_key": "loading",
    "load_pretrained": "loading", "save_model": "loading",
    "PRESETS": "presets", "preset_geometry": "presets",
    "apply_training_mode": "training", "load_control": "training", "load_lora": "training",
    "lora_state_dict": "training", "save_control": "training", "save_lora": "training",
    "DiT4SROutput": "transformer", "DiT4SRTransformer": "transformer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
