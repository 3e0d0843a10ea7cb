"""Rectified-flow noising and the noise loss (docs/specs/framer.md section 7, the SD3/DiT4SR
objective).

    sigma  ~ shift(sigmoid(N(logit_mean, logit_std)))      shift(t) = s t / (1 + (s - 1) t)
    x_t    = (1 - sigma) x0 + sigma eps
    target = v = eps - x0
    loss   = mean((x_t - sigma v_hat - x0)^2)   with precondition_outputs (= sigma^2-weighted v-loss)
           = mean((v_hat - v)^2)                otherwise

Randomness is drawn per sample from a CPU generator seeded by (seed, sample position in the global
stream), so a sample gets the same sigma and noise whatever the world size, micro-batch split or
device: distributed runs match a single-process run, and a resumed run draws what the uninterrupted
one would have. The 20% empty-prompt drop is the data pipeline's job (``data.null_prompt_prob``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from framer_dist.models.dit4sr.config import FlowConfig

# Mixed into per-sample seeds so the flow stream never coincides with another seeded stream.
_FLOW_STREAM = 0x5EED_F10A


def shift_sigma(t: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift: maps t in (0, 1) to sigma, pushing mass to high noise for shift > 1."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_seed(seed: int, position: int) -> int:
    """A 63-bit seed for one sample from the run seed and its position in the global sample stream."""
    # splitmix64-style mixing: nearby positions give unrelated streams.
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + _FLOW_STREAM) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & (2**63 - 1)


def sample_sigma_and_noise(positions: list[int], latent_shape: tuple[int, ...], cfg: FlowConfig,
                           seed: int, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Per-sample (sigma [B], noise [B, *latent_shape]) from (seed, global position) only."""
    sigmas, noises = [], []
    for pos in positions:
        g = torch.Generator().manual_seed(sample_seed(seed, pos))
        u = torch.randn((), generator=g) * cfg.logit_std + cfg.logit_mean
        sigmas.append(shift_sigma(torch.sigmoid(u), cfg.shift))
        noises.append(torch.randn(latent_shape, generator=g))
    sigma = torch.stack(sigmas).to(device=device, dtype=torch.float32)
    noise = torch.stack(noises).to(device=device, dtype=dtype)
    return sigma, noise


def _bcast(sigma: Tensor, like: Tensor) -> Tensor:
    return sigma.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_t = (1 - sigma) x0 + sigma eps."""
    s = _bcast(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """v = eps - x0 (d x_t / d sigma)."""
    return noise - x0


def x0_from_velocity(x_t: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    """Clean-latent estimate x0 = x_t - sigma v in fp32 (a bf16 readout would lose the small
    difference); ``v`` may carry leading layer dims ([L, B, ...])."""
    s = sigma.reshape(-1, *([1] * (x_t.dim() - 1))).float()
    return x_t.float() - s * v.float()


def timesteps(sigma: Tensor) -> Tensor:
    """The model's timestep input, SD3 convention: sigma * 1000."""
    return sigma * 1000.0


def noise_loss(v_hat: Tensor, x_t: Tensor, x0: Tensor, noise: Tensor, sigma: Tensor,
               precondition_outputs: bool = True) -> Tensor:
    """The rectified-flow loss in fp32, averaged over every element of the micro-batch."""
    v_hat, x_t, x0, noise = v_hat.float(), x_t.float(), x0.float(), noise.float()
    if precondition_outputs:
        return torch.mean((x0_from_velocity(x_t, v_hat, sigma) - x0) ** 2)
    return torch.mean((v_hat - velocity_target(x0, noise)) ** 2)
