"""Training data: sources, the Real-ESRGAN degradation, prompt embeddings, VAE encoding.

Public API (docs/interfaces.md, docs/data.md):
``build_dataloader``, ``encode_batch``, ``degrade_batch``, ``load_vae``, ``decode_latents``,
``tiny_vae``, ``degrade``, ``DegradeParams``, ``DataReport``.
"""

from .degrade import DegradeParams, degrade
from .images import DataReport
from .loader import DataPipeline, build_dataloader, prompt_shapes
from .sources import DataSourceError
from .vae import decode_latents, degrade_batch, encode_batch, encode_pixels, load_vae, tiny_vae

__all__ = [
    "DataPipeline", "DataReport", "DataSourceError", "DegradeParams", "build_dataloader",
    "decode_latents", "degrade", "degrade_batch", "encode_batch", "encode_pixels", "load_vae",
    "prompt_shapes", "tiny_vae",
]
