"""VAE helpers: online degradation + latent encoding of a batch, decoding.

How pixels become latents is the model family's (``ModelFamily.latents``, e.g. SD3's shift and
scale for dit4sr); this module loads the VAE and applies the family's codec. Images are in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import DataConfig
from .degrade import params_from_config, degrade

_CACHE: dict[tuple[str, str, str], Any] = {}


class LatentVae:
    """A frozen diffusers VAE with its family's latent codec: ``encode`` pixels in [-1, 1] ->
    latents, ``decode`` back."""

    def __init__(self, vae: Any, codec: Any) -> None:
        self.vae, self.codec = vae, codec

    def encode(self, x: Tensor, keys: Tensor | None = None) -> Tensor:
        return self.codec.encode(self.vae, x, keys)

    def decode(self, latents: Tensor) -> Tensor:
        return self.codec.decode(self.vae, latents)


def latent_codec(family: str):
    """``model.family``'s latent codec (a ConfigError when the family has none)."""
    from ..models import get_family

    return get_family(family).part("latents")


def load_vae(d: DataConfig, family: str, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> LatentVae:
    """The VAE named by ``data.vae`` (a diffusers folder, or its parent with a ``vae/`` subfolder),
    or the family's tiny random one when empty, with ``family``'s codec; cached per (path,
    device, family), frozen, in eval mode."""
    key = (d.vae, str(device), family, dtype)
    if key in _CACHE:
        return _CACHE[key]
    codec = latent_codec(family)
    if d.vae:
        from diffusers import AutoencoderKL

        p = Path(d.vae)
        if (p / "vae" / "config.json").is_file():
            p = p / "vae"
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"config key 'data.vae': no diffusers VAE (config.json) in {d.vae}")
        vae = AutoencoderKL.from_pretrained(str(p), torch_dtype=dtype)
    else:
        vae = codec.tiny_vae()
        vae = vae if dtype == torch.float32 else vae.to(dtype)
    vae = vae.to(device).eval().requires_grad_(False)
    _CACHE[key] = LatentVae(vae, codec)
    return _CACHE[key]


def decode_latents(d: DataConfig, latents: Tensor, family: str) -> Tensor:
    """Latents -> images in [-1, 1] with the VAE of ``data.vae`` (on the latents' device)."""
    return load_vae(d, family, latents.device).decode(latents)


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


def encode_batch(vae: LatentVae, batch: dict[str, Any]) -> dict[str, Any]:
    """Degrade (if the batch holds raw HR crops) and encode: adds ``hr_latent``/``lr_latent``
    (a sampling codec draws keyed by the samples' ``seed``)."""
    if "hr" not in batch or "lr" not in batch:
        if "hr_raw" not in batch:
            raise KeyError("encode_batch needs 'hr'/'lr' pixels or 'hr_raw' crops; got keys "
                           f"{sorted(batch)}")
        batch = degrade_batch(batch)
    batch = dict(batch)
    keys = batch.get("seed")
    batch["hr_latent"] = vae.encode(batch["hr"], keys)
    batch["lr_latent"] = vae.encode(batch["lr"], keys)
    return batch
