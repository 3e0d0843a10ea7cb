"""The pisasr family: FRAMER_U, FRAMER on PiSA-SR's one-step SD2.1-base U-Net with its pixel and
semantic LoRA sets (docs/specs/framer_u.md). The names below load diffusers and peft on first use
(PEP 562), so config checks that only need the family's names stay light.

- ``presets``: ``unet-tiny`` and ``sd2.1-base`` U-Net geometries;
- ``unet``: :class:`PiSASRUNet` (the module a backend wraps), the block-by-block forward, the
  FRAMER heads and readouts, :func:`hf_student_mask`;
- ``lora``: the pix/sem sets, the stages (:func:`apply_stage`) and adjustable inference;
- ``loading``: :func:`build_unet` / :func:`build_model` (presets or a local diffusers folder);
- ``losses``: the stage losses, CSD, the per-sample keyed draws;
- ``lpips``: LPIPS-VGG in plain torch from two local weight files;
- ``training``: :func:`train_step`, one micro-batch on plain tensors (encode, forward, decode,
  the stage's loss) with the frozen :class:`Helpers`.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "PRESETS": "presets", "preset_config": "presets", "GEOMETRY_KEYS": "presets",
    "PiSASRUNet": "unet", "PiSASROutput": "unet", "hf_student_mask": "unet", "READOUTS": "unet",
    "BLOCK_CLASSES": "unet",
    "SETS": "lora", "STAGES": "lora", "add_lora_sets": "lora", "apply_stage": "lora",
    "set_active_sets": "lora", "using_sets": "lora", "adjustable_residual": "lora",
    "lora_parameters": "lora", "is_lora_key": "lora", "is_head_key": "lora",
    "PretrainedLoadError": "loading", "build_unet": "loading", "build_model": "loading",
    "CSDLoss": "losses", "StageWeights": "losses", "stage_loss": "losses", "pixel_mse": "losses",
    "sample_generator": "losses", "sample_generators": "losses", "encode_latents": "losses",
    "decode_images": "losses", "null_prompt_mask": "losses", "ddpm_alphas_cumprod": "losses",
    "merge_sets": "lora", "Helpers": "training", "StepResult": "training", "train_step": "training",
    "LPIPS": "lpips", "LPIPSWeightsError": "lpips", "load_lpips": "lpips", "random_lpips": "lpips",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
