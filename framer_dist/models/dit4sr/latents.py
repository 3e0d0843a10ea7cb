"""SD3/SD3.5 latents (the DiT4SR family's latent codec) and the tiny random test VAE.

Latents are ``(vae.encode(x).mode() - shift_factor) * scaling_factor`` with the factors from the
VAE's config (1.5305 and 0.0609 for SD3's VAE), 16 channels at 1/8 of the image size; images are
in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from framer_dist.models import LatentCodec


def tiny_vae(seed: int = 0, latent_channels: int = 16, blocks: int = 4):
    """A random ``AutoencoderKL`` with the SD3 latent layout (16 channels, /8 for 4 blocks) and
    SD3's scaling/shift factors; deterministic for a given seed. For tests and the CPU demo."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        chans = tuple([8, 8, 16, 16][:blocks]) if blocks <= 4 else tuple([16] * blocks)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=chans, layers_per_block=1, norm_num_groups=4,
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
            use_post_quant_conv=False)
    return vae.eval().requires_grad_(False)


def _factors(vae) -> tuple[float, float]:
    scale = getattr(vae.config, "scaling_factor", None) or 1.0
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return float(scale), float(shift)


@torch.no_grad()
def encode_pixels(vae, x: Tensor) -> Tensor:
    """Images in [-1, 1] ``[B, 3, H, W]`` -> SD3-normalised latents (the posterior mode)."""
    scale, shift = _factors(vae)
    p = next(vae.parameters())
    lat = vae.encode(x.to(p.device, p.dtype)).latent_dist.mode()
    return (lat - shift) * scale


@torch.no_grad()
def decode_pixels(vae, latents: Tensor) -> Tensor:
    scale, shift = _factors(vae)
    p = next(vae.parameters())
    return vae.decode(latents.to(p.device, p.dtype) / scale + shift).sample.clamp(-1, 1)


# the posterior mode: no draw, so the per-sample keys are not needed
CODEC = LatentCodec(channels=16, encode=lambda vae, x, keys: encode_pixels(vae, x),
                    decode=decode_pixels, tiny_vae=tiny_vae)
