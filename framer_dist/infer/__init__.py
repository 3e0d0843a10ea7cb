"""Inference: the SR pipeline, its sampler, tiling and colour fixes, and the ``framer-sr`` CLI.

See docs/inference.md. Heavy pieces (transformers, diffusers models) load lazily.
"""

from .colorfix import adain_color_fix, color_fix, wavelet_color_fix
from .io import InferenceError
from .pipeline import InferenceOptions, SRPipeline
from .sampler import euler_sample, flow_sigmas, guided_denoiser, model_denoiser
from .tiling import seam_score, tiled_denoiser

__all__ = ["InferenceError", "InferenceOptions", "SRPipeline", "adain_color_fix", "color_fix",
           "euler_sample", "flow_sigmas", "guided_denoiser", "model_denoiser", "seam_score",
           "tiled_denoiser", "wavelet_color_fix"]
