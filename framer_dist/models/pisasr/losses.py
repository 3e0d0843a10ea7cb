"""PiSA-SR's stage losses, as functions of plain tensors and modules (docs/specs/framer_u.md,
"Backbone"; PiSA-SR's ``train_pisasr.py`` / ``pisasr.py`` @ 9c76e12).

- stage ``pix``: ``mse(x_pred, x_hr)`` on the decoded images (``x_pred = vae.decode(z_H /
  scaling).clamp(-1, 1)``, both in [-1, 1]).
- stage ``sem``: ``mse + 2 * LPIPS-VGG(x_pred, x_hr) + CSD(z_H)``.
- CSD: a frozen U-Net at ``t ~ U[20, 500)`` (``int(1000 * 0.02)``, ``int(1000 * 0.5)``) with
  CFG 7.5, the negative prompt as the unconditional branch:
  ``x_cfg``, ``x_neg`` = the x0 predictions of the CFG and the negative branch,
  ``g = (x_neg - x_cfg) / mean|z_H - x_cfg|`` (per image), loss ``mse(z_H, sg(z_H - g))``.

Every random draw (the VAE posterior sample, the CSD timestep and noise, the null-prompt choice)
comes from a CPU ``torch.Generator`` per sample, seeded by the run seed, the sample's global
stream position and the draw's stream (:func:`sample_generator`): any world size, micro-batch
split or resume draws the same numbers for the same sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from framer_dist.flow import sample_seed

# One stream per kind of draw, mixed into the per-sample seed (never equal to flow's stream).
STREAMS = {"vae": 0x7A5E_0001, "csd": 0x7A5E_0002, "null": 0x7A5E_0003}

VAE_SCALING = 0.18215           # SD2.1's vae.config.scaling_factor
CSD_T_RANGE = (20, 500)         # int(1000 * min_dm_step_ratio 0.02), int(1000 * max_dm_step_ratio 0.5)
CSD_CFG = 7.5
NEG_PROMPT = ("painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, "
              "CG Style, 3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, "
              "frames, watermark, signature, jpeg artifacts, deformed, lowres, over-smooth")


def sample_generator(seed: int, position: int, stream: str) -> torch.Generator:
    """The CPU generator of one sample's draws of one kind (``STREAMS``)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; known: {sorted(STREAMS)}")
    return torch.Generator().manual_seed(sample_seed(int(seed) ^ STREAMS[stream], int(position)))


def sample_generators(seed: int, positions: Sequence[int], stream: str) -> list[torch.Generator]:
    return [sample_generator(seed, p, stream) for p in positions]


def _per_sample_randn(shape: Sequence[int], generators: Sequence[torch.Generator],
                      like: Tensor) -> Tensor:
    if len(generators) != like.shape[0]:
        raise ValueError(f"need one generator per sample: {len(generators)} for a batch of "
                         f"{like.shape[0]}")
    eps = torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
    return eps.to(device=like.device, dtype=torch.float32)


# ---------------------------------------------------------------------- VAE, prompts


def posterior_sample(mean: Tensor, logvar: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """``mean + std * eps`` (diffusers' ``DiagonalGaussianDistribution.sample``, logvar clamped to
    [-30, 20]) with ``eps`` drawn per sample."""
    std = torch.exp(0.5 * logvar.float().clamp(-30.0, 20.0))
    return mean.float() + std * _per_sample_randn(mean.shape[1:], generators, mean)


@torch.no_grad()
def encode_latents(vae: nn.Module, images: Tensor, generators: Sequence[torch.Generator],
                   scaling: float = VAE_SCALING) -> Tensor:
    """``z_L = vae.encode(x).sample() * scaling`` for images in [-1, 1], the sample keyed by the
    per-sample generators (stream ``vae``). fp32 out."""
    dist = vae.encode(images.to(next(vae.parameters()).dtype)).latent_dist
    return posterior_sample(dist.mean, dist.logvar, generators) * scaling


def decode_images(vae: nn.Module, z: Tensor, scaling: float = VAE_SCALING) -> Tensor:
    """``vae.decode(z / scaling).clamp(-1, 1)`` (with the graph: stage losses backpropagate
    through the frozen decoder)."""
    dt = next(vae.parameters()).dtype
    return vae.decode((z / scaling).to(dt)).sample.clamp(-1, 1)


def null_prompt_mask(generators: Sequence[torch.Generator], prob: float = 0.5) -> Tensor:
    """Which samples train with the null prompt (PiSA-SR's ``null_text_ratio`` 0.5, drawn here per
    sample from stream ``null``): bool ``[B]`` on the CPU."""
    return torch.tensor([bool(torch.rand((), generator=g) < prob) for g in generators],
                        dtype=torch.bool)


# ---------------------------------------------------------------------- CSD


def ddpm_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> Tensor:
    """SD2.1's DDPM schedule (``scaled_linear``): ``cumprod(1 - beta)``, fp64 -> fp32."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class CSDLoss(nn.Module):
    """PiSA-SR's classifier score distillation against a frozen U-Net (``unet(x, t, c).sample``
    predicts eps). The frozen U-Net stays outside any engine; this module holds no trainable
    parameter."""

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, cfg_scale: float = CSD_CFG,
                 t_range: tuple[int, int] = CSD_T_RANGE) -> None:
        super().__init__()
        lo, hi = int(t_range[0]), int(t_range[1])
        if not 0 <= lo < hi <= alphas_cumprod.numel():
            raise ValueError(f"CSD timestep range [{lo}, {hi}) must lie in [0, "
                             f"{alphas_cumprod.numel()})")
        self.unet = unet
        self.unet.requires_grad_(False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone(), persistent=False)
        self.cfg_scale = float(cfg_scale)
        self.t_range = (lo, hi)

    def draw(self, z: Tensor, generators: Sequence[torch.Generator]) -> tuple[Tensor, Tensor]:
        """Per sample: the timestep (first draw) and the noise (second) of the ``csd`` stream."""
        if len(generators) != z.shape[0]:
            raise ValueError(f"CSD needs one generator per sample: {len(generators)} for a batch "
                             f"of {z.shape[0]}")
        lo, hi = self.t_range
        t, noise = [], []
        for g in generators:
            t.append(torch.randint(lo, hi, (1,), generator=g))
            noise.append(torch.randn(tuple(z.shape[1:]), generator=g))
        return torch.cat(t).to(z.device), torch.stack(noise).to(z.device)

    def forward(self, z_h: Tensor, prompt_embeds: Tensor, negative_embeds: Tensor,
                generators: Sequence[torch.Generator]) -> Tensor:
        z = z_h.float()
        t, noise = self.draw(z, generators)
        ab = self.alphas_cumprod.to(z.device)[t].view(-1, 1, 1, 1)
        with torch.no_grad():
            noisy = ab.sqrt() * z + (1 - ab).sqrt() * noise
            dt = next(self.unet.parameters()).dtype
            eps = self.unet(torch.cat([noisy, noisy]).to(dt), torch.cat([t, t]),
                            encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]).to(dt)
                            ).sample.float()
            eps_neg, eps_text = eps.chunk(2)
            eps_cfg = eps_neg + self.cfg_scale * (eps_text - eps_neg)
            x_cfg = (noisy - (1 - ab).sqrt() * eps_cfg) / ab.sqrt()
            x_neg = (noisy - (1 - ab).sqrt() * eps_neg) / ab.sqrt()
        weight = (z - x_cfg).abs().mean(dim=(1, 2, 3), keepdim=True)
        g = (x_neg - x_cfg) / weight
        return F.mse_loss(z, (z - g).detach())


# ---------------------------------------------------------------------- stage losses


def pixel_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Stage 1's loss (and stage 2's first term): MSE of the decoded images, fp32."""
    return F.mse_loss(pred.float(), target.float())


@dataclass(frozen=True)
class StageWeights:
    """PiSA-SR's ``lambda_l2``, ``lambda_lpips``, ``lambda_csd`` (stage 2)."""

    l2: float = 1.0
    lpips: float = 2.0
    csd: float = 1.0


@dataclass
class StageLoss:
    total: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)   # detached, unweighted


def stage_loss(stage: str, pred: Tensor, target: Tensor, *, z_h: Tensor | None = None,
               lpips: nn.Module | None = None, csd: CSDLoss | None = None,
               prompt_embeds: Tensor | None = None, negative_embeds: Tensor | None = None,
               generators: Sequence[torch.Generator] | None = None,
               weights: StageWeights = StageWeights()) -> StageLoss:
    """The stage's loss on decoded images ``pred`` / ``target`` ([-1, 1]) and, in stage ``sem``,
    LPIPS and CSD (``z_h``, the prompts and the per-sample ``csd`` generators). Stage ``pix``
    computes no CSD (the release computes it and weights it by 0)."""
    mse = pixel_mse(pred, target)
    if stage == "pix":
        return StageLoss(weights.l2 * mse, {"mse": mse.detach()})
    if stage != "sem":
        raise ValueError(f"config key 'train.mode': {stage!r} is not allowed; allowed values: 'pix', 'sem'")
    if lpips is None or csd is None or z_h is None or prompt_embeds is None \
            or negative_embeds is None or generators is None:
        raise ValueError("stage 'sem' needs lpips, csd, z_h, prompt_embeds, negative_embeds and "
                         "generators")
    lp = lpips(pred.float(), target.float()).float().mean()
    c = csd(z_h, prompt_embeds, negative_embeds, generators)
    total = weights.l2 * mse + weights.lpips * lp + weights.csd * c
    return StageLoss(total, {"mse": mse.detach(), "lpips": lp.detach(), "csd": c.detach()})
