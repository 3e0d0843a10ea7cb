"""One PiSA-SR training micro-batch on plain tensors (docs/specs/framer_u.md, "Backbone"), for the
family's ``step`` to call: encode the upscaled LR image, run the one-step U-Net (with the FRAMER
readout when asked), decode, and the stage's loss.

The frozen helpers (VAE, LPIPS, the CSD U-Net, the null and negative prompt embeddings) are
passed in (:class:`Helpers`): they stay outside the engine. Every draw is keyed by the samples'
global positions (``losses.sample_generators``): the VAE posterior sample (stream ``vae``), the
null-prompt choice (``null``), the CSD timestep and noise (``csd``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .losses import (VAE_SCALING, CSDLoss, StageWeights, decode_images, encode_latents,
                     null_prompt_mask, sample_generators, stage_loss)
from .unet import Readout


@dataclass
class Helpers:
    """The frozen models and embeddings a step needs besides the trained U-Net."""

    vae: nn.Module
    null_embeds: Tensor | None = None       # [1, T, D] the empty prompt ('' through the text encoder)
    negative_embeds: Tensor | None = None   # [1, T, D] CSD's negative prompt (stage sem)
    lpips: nn.Module | None = None          # stage sem
    csd: CSDLoss | None = None              # stage sem
    scaling: float = VAE_SCALING


@dataclass
class StepResult:
    loss: Tensor                                # the stage loss (FRAMER is added by the trainer)
    parts: dict[str, Tensor] = field(default_factory=dict)   # detached: mse, lpips, csd
    features: Tensor | None = None              # [L, B, C, H, W], last = teacher
    z_h: Tensor | None = None                   # [B, 4, h, w] fp32
    pred: Tensor | None = None                  # [B, 3, H, W] decoded, in [-1, 1]


def train_step(model: nn.Module, helpers: Helpers, lr: Tensor, hr: Tensor, prompt_embeds: Tensor,
               positions: Sequence[int], *, seed: int, stage: str, readout: Readout = None,
               null_prob: float = 0.5, weights: StageWeights = StageWeights(),
               autocast: Any = None) -> StepResult:
    """``lr``: the LR image upscaled to the HR size and ``hr``: the target, both ``[B, 3, H, W]``
    in [-1, 1]; ``prompt_embeds``: the tag prompts ``[B, T, D]`` (CSD's positive branch always
    uses them; the U-Net gets the null prompt with probability ``null_prob``, drawn per sample:
    pass 0 when the data pipeline has already dropped prompts)."""
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    b = lr.shape[0]
    if len(positions) != b:
        raise ValueError(f"train_step: {len(positions)} positions for a batch of {b}")
    z_l = encode_latents(helpers.vae, lr, sample_generators(seed, positions, "vae"), helpers.scaling)
    ctx = prompt_embeds
    if null_prob > 0:
        if helpers.null_embeds is None:
            raise ValueError("train_step: null_prob > 0 needs helpers.null_embeds (the empty prompt)")
        mask = null_prompt_mask(sample_generators(seed, positions, "null"), null_prob)
        mask = mask.to(prompt_embeds.device).view(b, 1, 1)
        ctx = torch.where(mask, helpers.null_embeds.to(prompt_embeds).expand_as(prompt_embeds),
                          prompt_embeds)
    with autocast:
        out = model(z_l, ctx, readout=readout)
        pred = decode_images(helpers.vae, out.z_h, helpers.scaling)
    neg = None
    if stage == "sem":
        if helpers.negative_embeds is None:
            raise ValueError("train_step: stage 'sem' needs helpers.negative_embeds (CSD)")
        neg = helpers.negative_embeds.to(prompt_embeds).expand_as(prompt_embeds)
    loss = stage_loss(stage, pred, hr, z_h=out.z_h, lpips=helpers.lpips, csd=helpers.csd,
                      prompt_embeds=prompt_embeds, negative_embeds=neg,
                      generators=sample_generators(seed, positions, "csd") if stage == "sem" else None,
                      weights=weights)
    return StepResult(loss.total, loss.parts, out.features, out.z_h, pred)
