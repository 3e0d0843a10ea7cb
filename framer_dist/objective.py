"""The training objective of one micro-batch: rectified-flow noise loss + lambda * FRAMER.

Shared by the trainer (``train.py``) and the step benchmark (``bench/train_step.py``), so the
benchmark times exactly what training runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from framer_dist import flow
from framer_dist.config import Config
from framer_dist.framer import framer_objective


@dataclass
class MicroBatchLoss:
    total: Tensor                     # what backward runs on
    noise: Tensor
    framer: Tensor                    # agg_i L^(i) before lambda (zero when FRAMER is off)
    layer_metrics: dict[str, Tensor] = field(default_factory=dict)
    verify: Callable[[], None] = lambda: None  # deferred FRAMER NaN/Inf check; call before stepping


def readout_kind(cfg: Config) -> str | None:
    """What the model must read out per block for the configured FRAMER feature (None = off)."""
    if not cfg.framer.enabled:
        return None
    return "hidden" if cfg.framer.feature == "hidden" else "velocity"


def framer_features(out_features: Tensor, x_t: Tensor, sigma: Tensor, feature: str) -> Tensor:
    """The per-block readout -> F^(i) of FRAMER_SPEC.md section 1 (x0_i = x_t - sigma v_i)."""
    if feature == "x0":
        return flow.x0_from_velocity(x_t, out_features, sigma)
    return out_features


def micro_batch_loss(model: Callable, batch: dict[str, Tensor], sigma: Tensor, noise: Tensor,
                     cfg: Config, students: list[int], teacher: int,
                     generator: torch.Generator, gather: Callable[[Tensor], Tensor] | None = None,
                     rank: int = 0,
                     autocast: contextlib.AbstractContextManager | None = None) -> MicroBatchLoss:
    """Noise the clean latent, run the model once (with the per-block readout when FRAMER is on),
    and return the losses. ``batch`` holds latents: hr_latent, lr_latent, prompt_embeds, pooled.

    The FRAMER NaN/Inf check is deferred where it can be (see ``framer_objective``): call
    ``.verify()`` after backward and before the optimizer step."""
    x0, f_cfg = batch["hr_latent"].float(), cfg.framer
    x_t = flow.add_noise(x0, noise, sigma)
    with autocast or contextlib.nullcontext():
        out = model(hidden_states=x_t, lr_latent=batch["lr_latent"],
                    timestep=flow.timesteps(sigma),
                    encoder_hidden_states=batch["prompt_embeds"],
                    pooled_projections=batch["pooled"], readout=readout_kind(cfg))
    loss_noise = flow.noise_loss(out.sample, x_t, x0, noise, sigma, cfg.flow.precondition_outputs)
    if not f_cfg.enabled:
        return MicroBatchLoss(loss_noise, loss_noise, torch.zeros((), device=x0.device))
    feats = framer_features(out.features, x_t, sigma, f_cfg.feature)
    res = framer_objective(feats[students], feats[teacher], f_cfg, generator,
                           gather=gather, rank=rank, defer_check=True)
    return MicroBatchLoss(loss_noise + f_cfg.weight * res.loss, loss_noise, res.loss, res.metrics,
                          res.verify)
