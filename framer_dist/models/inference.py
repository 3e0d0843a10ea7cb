"""What ``framer-sr`` (``framer_dist.infer``) and the layer-hierarchy analysis
(``framer_dist.analysis``) get from a family: loading its exports, its sampler on the latent
grid, and its per-layer readout.

The family-independent parts stay in ``framer_dist.infer``: finding the trainer's export and its
EMA copy, image IO, resizing and padding, the VAE, prompt sources and caches, latent tiling
(``infer.tiling.tiled_denoiser``, which a sampler may use), the colour fix and the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

Prompt = tuple[Tensor, Tensor]  # (prompt_embeds [B, T, D], pooled [B, P]); P may be 0


@dataclass(frozen=True)
class ModelShape:
    """What the pipeline needs to know of a loaded model."""

    channels: int                 # latent channels it takes (checked against the VAE's)
    multiple: int                 # latent sides are padded and tiled to multiples of this
    text_dims: tuple[int, int]    # (D, P) of its prompt embeddings (hashed and empty prompts)


@dataclass(frozen=True)
class InferenceSpec:
    """A family's inference (docs/interfaces.md, "Model families"). Errors are
    ``framer_dist.models.ModelLoadError`` with a one-line message; the tools print it."""

    kinds: tuple[str, ...]        # checkpoint kinds ``--kind`` names, besides "auto"
    # (an existing file or folder, sub-folders not to look in) -> (kind, the file or folder to
    # load); ModelLoadError naming what it looked for when nothing fits
    detect: Callable[[Path, tuple[str, ...]], tuple[str, Path]]
    # (kind, path from detect, the --base folder or None) -> the model (eval mode is set by the caller)
    load: Callable[[str, Path, Path | None], nn.Module]
    shape: Callable[[nn.Module], ModelShape]
    # (model, lr_latent [B, C, h, w], cond: Prompt, uncond: Prompt | None, options, *, seed,
    # dtype, progress) -> the SR latent [B, C, h, w]. options: infer.InferenceOptions (its
    # ``family_options`` hold the values of ``arguments``); uncond is None when
    # options.guidance == 1; seed: the image's noise seed (same for every image of a batch);
    # dtype: compute dtype; progress(step) after each of options.steps steps, or None
    sample: Callable[..., Tensor]
    # (model, x0 [B, C, h, w], lr_latent, sigma = t / 1000, noise like x0, cond: Prompt, feature)
    # -> (every block's FRAMER feature [L, B, C', H', W'] as in training, the teacher [B, C', H',
    # W'] or None when it is the layer select_layers names); None: no hierarchy analysis
    readout: Callable[..., tuple[Tensor, Tensor | None]] | None = None
    # InferenceOptions fields this family defaults otherwise, for flags not given (a one-step
    # sampler: {"steps": 1, "guidance": 1.0})
    defaults: dict[str, Any] = field(default_factory=dict)
    # the family's own framer-sr flags: (option strings, argparse keyword arguments); their values
    # reach ``sample`` in options.family_options[dest]. Flags must not clash with another family's.
    arguments: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = ()


__all__ = ["InferenceSpec", "ModelShape", "Prompt"]
