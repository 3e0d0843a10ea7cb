"""Training data: sources, the Real-ESRGAN degradation, prompt embeddings, VAE encoding.

Public API (docs/interfaces.md, docs/data.md):
``build_dataloader``, ``encode_batch``, ``degrade_batch``, ``load_vae``, ``decode_latents``,
``degrade``, ``DegradeParams``, ``DataReport``.
"""

from .degrade import DegradeParams, degrade
from .images import DataReport
from .loader import DataPipeline, build_dataloader, prompt_shapes, yields_pixels
from .sources import DataSourceError
from .vae import LatentVae, decode_latents, degrade_batch, encode_batch, latent_codec, load_vae

__all__ = [
    "DataPipeline", "DataReport", "DataSourceError", "DegradeParams", "LatentVae", "build_dataloader",
    "decode_latents", "degrade", "degrade_batch", "encode_batch", "latent_codec", "load_vae",
    "prompt_shapes", "yields_pixels",
]
