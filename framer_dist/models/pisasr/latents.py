"""SD2.1 latents (the pisasr family's latent codec) and the tiny random test VAE.

``z = vae.encode(x).sample() * 0.18215`` (PiSA-SR samples the posterior), 4 channels at 1/8 of
the image size, images in [-1, 1]. Training draws the sample per sample from stream ``vae``
(``losses.encode_latents``); the codec (data tools, framer-sr, the analysis) draws it keyed by the
samples' seeds, or from seed 0 when none are given.
"""

from __future__ import annotations

import torch
from torch import Tensor

from framer_dist.models import LatentCodec

from .losses import VAE_SCALING, posterior_sample


def tiny_vae(seed: int = 0):
    """A random ``AutoencoderKL`` with SD2.1's latent layout (4 channels, /8) and scaling;
    deterministic for a given seed. For tests and the CPU demo."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
            scaling_factor=VAE_SCALING)
    return vae.eval().requires_grad_(False)


def _scaling(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", None) or VAE_SCALING)


@torch.no_grad()
def encode_pixels(vae, x: Tensor, keys: Tensor | None = None) -> Tensor:
    p = next(vae.parameters())
    dist = vae.encode(x.to(p.device, p.dtype)).latent_dist
    seeds = keys.tolist() if keys is not None else [0] * x.shape[0]
    gens = [torch.Generator().manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF) for s in seeds]
    return posterior_sample(dist.mean, dist.logvar, gens) * _scaling(vae)


@torch.no_grad()
def decode_pixels(vae, latents: Tensor) -> Tensor:
    p = next(vae.parameters())
    return vae.decode(latents.to(p.device, p.dtype) / _scaling(vae)).sample.clamp(-1, 1)


CODEC = LatentCodec(channels=4, encode=encode_pixels, decode=decode_pixels, tiny_vae=tiny_vae)
