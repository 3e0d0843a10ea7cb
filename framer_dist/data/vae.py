"""VAE helpers: online degradation + SD3 latent encoding of a batch, decoding, a tiny test VAE.

SD3/SD3.5 latents are ``(vae.encode(x).mode() - shift_factor) * scaling_factor`` with the factors
from the VAE's config (1.5305 and 0.0609 for SD3's VAE); images are in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import DataConfig
from .degrade import params_from_config, degrade

_CACHE: dict[tuple[str, str], Any] = {}


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


def load_vae(d: DataConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The VAE named by ``data.vae`` (a diffusers folder, or its parent with a ``vae/`` subfolder),
    or the tiny random one when empty; cached per (path, device), frozen, in eval mode."""
    key = (d.vae, str(device))
    if key in _CACHE:
        return _CACHE[key]
    if d.vae:
        from diffusers import AutoencoderKL

        p = Path(d.vae)
        if (p / "vae" / "config.json").is_file():
            p = p / "vae"
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"config key 'data.vae': no diffusers VAE (config.json) in {d.vae}")
        vae = AutoencoderKL.from_pretrained(str(p), torch_dtype=dtype)
    else:
        vae = tiny_vae()
        vae = vae if dtype == torch.float32 else vae.to(dtype)
    vae = vae.to(device).eval().requires_grad_(False)
    _CACHE[key] = vae
    return vae


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


def decode_latents(d: DataConfig, latents: Tensor) -> Tensor:
    """Latents -> images in [-1, 1] with the VAE of ``data.vae`` (on the latents' device)."""
    return decode_pixels(load_vae(d, latents.device), latents)


def degrade_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Add ``hr`` (the USM-sharpened target) and ``lr`` (degraded, bicubic-upsampled back) pixels in
    [-1, 1] from ``hr_raw`` uint8 crops, on the device ``hr_raw`` is on."""
    opts = batch.get("degrade", {})
    p = params_from_config(int(opts.get("scale", 4)), bool(opts.get("usm", True)))
    hr = batch["hr_raw"].float() / 255.0
    out = degrade(hr, batch["seed"], p)
    batch = dict(batch)
    batch["hr"] = out["hr"] * 2 - 1
    batch["lr"] = out["lr_up"] * 2 - 1
    return batch


def encode_batch(vae, batch: dict[str, Any]) -> dict[str, Any]:
    """Degrade (if the batch holds raw HR crops) and encode: adds ``hr_latent``/``lr_latent``."""
    if "hr" not in batch or "lr" not in batch:
        if "hr_raw" not in batch:
            raise KeyError("encode_batch needs 'hr'/'lr' pixels or 'hr_raw' crops; got keys "
                           f"{sorted(batch)}")
        batch = degrade_batch(batch)
    batch = dict(batch)
    batch["hr_latent"] = encode_pixels(vae, batch["hr"])
    batch["lr_latent"] = encode_pixels(vae, batch["lr"])
    return batch
