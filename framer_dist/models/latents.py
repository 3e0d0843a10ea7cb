"""A family's latent codec: how images become its latents and back (the VAE normalisation).

The VAE itself is a diffusers ``AutoencoderKL`` that the caller loads from a folder
(``framer_dist.data.load_vae`` for training and the data tools, ``framer_dist.infer.load_vae``
for framer-sr and the analysis); the family says how to read and write latents with it, how many
channels they have, and which random VAE stands in for tests and the CPU demo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor


@dataclass(frozen=True)
class LatentCodec:
    channels: int  # latent channels (synthetic latents, the inference checks)
    # (vae, pixels [B, 3, H, W] in [-1, 1], keys) -> latents [B, channels, H/f, W/f]. keys: int64
    # [B] per-sample seeds (a batch's "seed") for a codec that samples the posterior, or None
    # (inference, analysis): such a codec then draws from a fixed seed. A codec that takes the
    # posterior mode ignores them.
    encode: Callable[[Any, Tensor, Tensor | None], Tensor]
    decode: Callable[[Any, Tensor], Tensor]  # (vae, latents) -> pixels in [-1, 1], clamped
    tiny_vae: Callable[[], Any]  # a seeded random AutoencoderKL of this layout ('' as data.vae / --vae)


__all__ = ["LatentCodec"]
