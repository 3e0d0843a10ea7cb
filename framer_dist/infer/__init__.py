"""Inference: the SR pipeline, latent tiling and colour fixes, and the ``framer-sr`` CLI; the
model family's sampler and checkpoint loading come through ``ModelFamily.inference``.

See docs/inference.md. Heavy pieces (transformers, diffusers models) load lazily.
"""

from .colorfix import adain_color_fix, color_fix, wavelet_color_fix
from .io import InferenceError
from .pipeline import InferenceOptions, SRPipeline
from .tiling import seam_score, tiled_denoiser

__all__ = ["InferenceError", "InferenceOptions", "SRPipeline", "adain_color_fix", "color_fix",
           "seam_score", "tiled_denoiser", "wavelet_color_fix"]
