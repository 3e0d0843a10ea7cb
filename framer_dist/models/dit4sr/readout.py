"""DiT4SR's per-layer readout for the layer-hierarchy analysis (``InferenceSpec.readout``): the
FRAMER feature of every block at a fixed noise level, as training computes it."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def layer_features(model, x0: Tensor, lr_latent: Tensor, sigma: float, noise: Tensor,
                   prompt_embeds: Tensor, pooled: Tensor, feature: str) -> Tensor:
    """Every block's feature ``F^(i)`` (docs/specs/framer.md section 1) at noise level ``sigma``."""
    dt = next(model.parameters()).dtype
    dev = next(model.parameters()).device
    x_t = ((1 - sigma) * x0 + sigma * noise).to(dev)
    b = x0.shape[0]
    out = model(hidden_states=x_t.to(dt), lr_latent=lr_latent.to(dev, dt),
                # fp32 as in training and framer-sr (bf16 would round 301 to 302)
                timestep=torch.full((b,), sigma * 1000.0, device=dev, dtype=torch.float32),
                encoder_hidden_states=prompt_embeds.expand(b, -1, -1).to(dev, dt),
                pooled_projections=pooled.expand(b, -1).to(dev, dt),
                readout="hidden" if feature == "hidden" else "velocity")
    f = out.features.float()
    if feature == "x0":
        f = x_t.float()[None] - sigma * f
    return f


def readout(model, x0: Tensor, lr_latent: Tensor, sigma: float, noise: Tensor,
            cond: tuple[Tensor, Tensor], feature: str) -> tuple[Tensor, None]:
    """The family's readout: the features; the teacher is the last block (select_layers')."""
    return layer_features(model, x0, lr_latent, sigma, noise, cond[0], cond[1], feature), None
