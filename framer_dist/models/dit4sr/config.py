"""The DiT4SR family's config section, ``[dit4sr]`` (with ``[dit4sr.lora]`` and ``[dit4sr.flow]``).

Validated by the same typed machinery as the rest of the config (``framer_dist.config``); the
section exists only while ``model.family = "dit4sr"``. Before the family seam these keys were
``model.lr_injection_scale``, ``[lora]`` and ``[flow]`` (``MOVED_KEYS``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from framer_dist.config import Config, option


@dataclass
class LoraConfig:
    rank: int = option(16, "LoRA rank", min=1)
    alpha: float = option(16.0, "LoRA alpha", min=0.0)
    dropout: float = option(0.0, "LoRA dropout", min=0.0, max=1.0)
    targets: list[str] = option(["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                 "add_v_proj", "to_add_out"],
                                "attention projections that get adapters (default: every frozen "
                                "one, image and text stream, as diffusers' SD3 LoRA training script)")
    include_mlp: bool = option(False, "also adapt the feed-forward linears")


@dataclass
class FlowConfig:
    shift: float = option(3.0, "SD3 timestep shift", min=1e-6)
    logit_mean: float = option(0.0, "logit-normal sigma sampling mean")
    logit_std: float = option(1.0, "logit-normal sigma sampling std", min=1e-6)
    precondition_outputs: bool = option(True, "loss on x0 estimate (sigma^2-weighted v-loss)")


@dataclass
class DiT4SRConfig:
    lr_injection_scale: float = option(1.2, "scale of the depth-wise conv LR injection in the MLP",
                                       min=0.0)
    lora: LoraConfig = field(default_factory=LoraConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)


# where the keys lived before the family seam -> where they live now
MOVED_KEYS = {"model.lr_injection_scale": "dit4sr.lr_injection_scale",
              "lora": "dit4sr.lora", "flow": "dit4sr.flow"}


def section(cfg: Config) -> DiT4SRConfig:
    """The run's ``[dit4sr]`` section."""
    return cfg.section_of(DiT4SRConfig, "dit4sr")
