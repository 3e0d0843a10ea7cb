"""The pisasr family's config section, ``[pisasr]`` (docs/specs/framer_u.md).

Validated by the same typed machinery as the rest of the config (``framer_dist.config``); the
section exists only while ``model.family = "pisasr"``. PiSA-SR's two stages are the family's
training modes: ``train.mode = "pix"`` (stage 1) or ``"sem"`` (stage 2), two launches, the second
with ``pisasr.init_from`` naming the first's final checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from framer_dist.config import Config, option


@dataclass
class PiSASRConfig:
    lora_rank: int = option(4, "rank of every pix/sem LoRA adapter (PiSA-SR: 4)", min=1)
    lora_alpha: float = option(8.0, "peft lora_alpha of every adapter (PiSA-SR: 8)", min=0.0)
    init_from: str = option(
        "", "stage 2 starts here: stage 1's final checkpoint (weights and FRAMER heads) or its "
        "export folder (pisasr_lora.safetensors; the heads then start fresh). '' = the pretrained "
        "U-Net with new adapters")
    framer_stages: list[str] = option(["pix", "sem"], "the stages (train.mode) in which FRAMER is on")
    hf_coarse: Literal["skip", "keep"] = option(
        "skip", "students whose grid lies at or below the LF radius: 'skip' their HF term "
        "(interpolation leakage), 'keep' it")
    head_train: bool = option(True, "train the FRAMER alignment heads (false: frozen at their "
                              "orthogonal init, to measure what a linear probe contributes)")
    weight_l2: float = option(1.0, "pixel MSE weight (both stages)", min=0.0)
    weight_lpips: float = option(2.0, "LPIPS-VGG weight (stage sem)", min=0.0)
    weight_csd: float = option(1.0, "CSD weight (stage sem)", min=0.0)
    lpips_vgg: str = option("", "VGG16 weights, torchvision state-dict layout (.pth/.safetensors); "
                            "'' = random (tests and the CPU demo only)")
    lpips_lin: str = option("", "LPIPS v0.1 linear layers (the lpips wheel's weights/v0.1/vgg.pth); "
                            "'' = random (tests and the CPU demo only)")
    csd_pretrained: str = option("", "the frozen U-Net of CSD ('' = model.pretrained's)")


def section(cfg: Config) -> PiSASRConfig:
    """The run's ``[pisasr]`` section."""
    return cfg.section_of(PiSASRConfig, "pisasr")


def framer_on(cfg: Config) -> bool:
    """FRAMER runs in this launch: enabled, and this stage is one of pisasr.framer_stages."""
    return cfg.framer.enabled and cfg.train.mode in section(cfg).framer_stages


__all__ = ["PiSASRConfig", "framer_on", "section"]
