"""DiT4SR's sampler: FlowMatch Euler with classifier-free guidance on the text only.

The sampler is written against a *denoiser*: any callable ``(z, lr_latent, sigma) -> velocity``.
The model adapter, CFG and latent tiling (``framer_dist.infer.tiling``) are each such a callable
wrapping the next one, so each piece is testable on its own. ``sample`` is the family's
``InferenceSpec.sample`` (framer-sr's step on the latent grid).

Conventions (SD3 rectified flow, docs/specs/framer.md section 7):
``x_t = (1 - sigma) x0 + sigma eps``, the model predicts ``v = eps - x0`` and takes
``timestep = sigma * 1000``. Sampling integrates ``dx/dsigma = v`` from sigma = 1 (pure noise) to
0 with explicit Euler steps.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from framer_dist.infer.tiling import Denoiser, tiled_denoiser
from framer_dist.models import Prompt


class VelocityModel(Protocol):
    def __call__(self, hidden_states: Tensor, lr_latent: Tensor, timestep: Tensor,
                 encoder_hidden_states: Tensor, pooled_projections: Tensor): ...


def flow_sigmas(num_steps: int, shift: float = 3.0, scheduler_config: dict | None = None) -> Tensor:
    """The sigma schedule of diffusers' FlowMatchEulerDiscreteScheduler (SD3's), plus the final 0.

    Taken from the real scheduler (or a local ``scheduler_config.json`` of the base model) so the
    steps match what SD3/DiT4SR use exactly. Returns float32 ``[num_steps + 1]``, decreasing to 0.
    """
    if num_steps < 1:
        raise ValueError(f"steps must be >= 1, got {num_steps}")
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = dict(scheduler_config or {})
    cfg.pop("_class_name", None)
    cfg.pop("_diffusers_version", None)
    if scheduler_config is None:
        cfg["shift"] = shift
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    sched.set_timesteps(num_steps)
    return sched.sigmas.detach().to(torch.float32).cpu()


def euler_sample(denoise: Callable[[Tensor, Tensor], Tensor], noise: Tensor, sigmas: Tensor,
                 callback: Callable[[int], None] | None = None) -> Tensor:
    """Integrate from ``noise`` (at ``sigmas[0]``) to ``sigmas[-1]``; ``denoise(x, sigma) -> v``.

    The state is kept in float32 whatever dtype the model runs in.
    """
    x = noise.float()
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = denoise(x, s).float()
        x = x + (s_next - s).to(x.device) * v
        if callback is not None:
            callback(i)
    return x


def model_denoiser(model: VelocityModel, prompt_embeds: Tensor, pooled: Tensor,
                   dtype: torch.dtype | None = None) -> Denoiser:
    """Adapt the DiT4SR transformer to a denoiser for one set of text embeddings.

    ``prompt_embeds``/``pooled`` have batch 1 or the latent batch; they are broadcast.
    The timestep stays float32 whatever ``dtype`` (as in SD3's pipeline and in training,
    ``flow.timesteps``): a bf16 cast would round it to a multiple of 4 above 500.
    """
    def fn(z: Tensor, lr: Tensor, sigma: Tensor) -> Tensor:
        b = z.shape[0]
        dt = dtype or z.dtype
        e, p = _expand(prompt_embeds, b), _expand(pooled, b)
        t = (sigma.float() * 1000.0).expand(b).to(z.device)
        out = model(hidden_states=z.to(dt), lr_latent=lr.to(dt), timestep=t,
                    encoder_hidden_states=e.to(z.device, dt), pooled_projections=p.to(z.device, dt))
        return getattr(out, "sample", out).float()
    return fn


def guided_denoiser(model: VelocityModel, cond: tuple[Tensor, Tensor],
                    uncond: tuple[Tensor, Tensor] | None, guidance: float,
                    dtype: torch.dtype | None = None) -> Denoiser:
    """Classifier-free guidance on the text: ``v = v_u + g (v_c - v_u)``.

    The LR latent goes to *both* branches (DiT4SR): only the prompt differs. When the two
    prompt embeddings have the same shape both branches run as one batch of 2B.
    """
    if uncond is None or guidance == 1.0:
        return model_denoiser(model, cond[0], cond[1], dtype)

    c_e, c_p = cond
    u_e, u_p = uncond
    if c_e.shape[1:] == u_e.shape[1:]:
        def fn(z: Tensor, lr: Tensor, sigma: Tensor) -> Tensor:
            b = z.shape[0]
            e = torch.cat([_expand(u_e, b), _expand(c_e, b)])
            p = torch.cat([_expand(u_p, b), _expand(c_p, b)])
            v = model_denoiser(model, e, p, dtype)(torch.cat([z, z]), torch.cat([lr, lr]), sigma)
            v_u, v_c = v.chunk(2)
            return v_u + guidance * (v_c - v_u)
        return fn

    f_c = model_denoiser(model, c_e, c_p, dtype)
    f_u = model_denoiser(model, u_e, u_p, dtype)

    def fn2(z: Tensor, lr: Tensor, sigma: Tensor) -> Tensor:
        v_u = f_u(z, lr, sigma)
        return v_u + guidance * (f_c(z, lr, sigma) - v_u)
    return fn2


def _expand(t: Tensor, b: int) -> Tensor:
    """Broadcast per-image embeddings ``[n, ...]`` to a latent batch of ``b``.

    ``b`` may be a multiple of ``n``: stacked tiles (``tiling.py``) are ``[tile0 images, tile1
    images, ...]``, so the embeddings repeat in that order.
    """
    n = t.shape[0]
    if n == b:
        return t
    if n == 1:
        return t.expand(b, *t.shape[1:])
    if b % n:
        raise ValueError(f"prompt embedding batch {n} does not match latent batch {b}")
    return t.repeat(b // n, *([1] * (t.ndim - 1)))


def sample(model: VelocityModel, lr_latent: Tensor, cond: Prompt, uncond: Prompt | None, opts: Any, *,
           seed: int, dtype: torch.dtype | None = None,
           progress: Callable[[int], None] | None = None) -> Tensor:
    """The SR latent for ``lr_latent`` (on the model's device): noise seeded by ``seed`` (one
    generator per image, so an image's result does not depend on the batch it is in), then
    ``opts.steps`` FlowMatch Euler steps (``opts.shift``, or the base folder's
    ``opts.scheduler_config``), CFG ``opts.guidance`` on the text with the LR latent in both
    branches, and latent tiles (``opts.tile``/``overlap``/``tile_std``/``tile_batch``, multiples of
    the patch size) blended with Gaussian weights."""
    noise = torch.stack([torch.randn(lr_latent.shape[1:], generator=torch.Generator().manual_seed(seed))
                         for _ in range(lr_latent.shape[0])]).to(lr_latent.device)
    fn = guided_denoiser(model, cond, uncond, opts.guidance, dtype=dtype)
    fn = tiled_denoiser(fn, opts.tile, opts.overlap, rel_std=opts.tile_std, tile_batch=opts.tile_batch,
                        multiple=int(model.config.patch_size))
    sigmas = flow_sigmas(opts.steps, opts.shift, opts.scheduler_config)
    return euler_sample(lambda zz, sig: fn(zz, lr_latent, sig), noise, sigmas, callback=progress)
