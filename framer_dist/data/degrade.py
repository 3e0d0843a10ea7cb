"""The two-stage Real-ESRGAN degradation (FRAMER supplement, Table 6), batched in torch.

Only the parameter draws run on the CPU, from one ``numpy`` generator per sample seeded by that
sample's seed: kernels, noise, resizing and JPEG then run on the batch's device for the whole
batch at once (the noise itself is a counter hash of the sample's key and pixel position, :mod:`.rng`).
A sample's output depends only on its image and its seed, never on its batch-mates, so a batch
is reproducible bit for bit on the same device type and a resumed run sees the same pairs.

Pipeline per sample (HR ``[3, H, W]`` in [0, 1], H and W divisible by ``scale``):

1. USM-sharpen the HR target (optional); the degradation starts from the sharpened HR.
2. Stage 1: blur (21x21: one of six kernel types, or a sinc with p=0.1) -> random resize
   (up/down/keep, area/bilinear/bicubic) -> Gaussian (p=0.5, colour or gray) or Poisson noise
   -> JPEG (q in [30, 95]).
3. Stage 2: blur (p=0.8; 11x11) -> resize to (H/scale * s2) -> noise -> in random order either
   [resize to H/scale + final sinc (p=0.8)] then JPEG, or JPEG then [resize + final sinc].
4. LR rounded to 8 bits; LR bicubic-upsampled back to H x W (the DiT4SR conditioning input).

This module is the entry point (:func:`degrade`: per image, batched, or graphed); the work lives in
:mod:`.degrade_plan` (parameters, draws and the batch's plan, CPU), :mod:`.degrade_run` (the pixel
work on the batch's device) and :mod:`.degrade_graph` (the device side replayed from a CUDA graph).
Their public names are importable from here too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .degrade_graph import default_degrader
from .degrade_plan import (DegradeParams, DegradePlan, StageParams, check_inputs,
                           params_from_config, plan_degradation, sample_params, seed_list,
                           stage_kernels)
from .degrade_run import blur_matrix, full_fp32, prepare_device, run_plan, usm_sharp

__all__ = ["DegradeParams", "DegradePlan", "StageParams", "check_inputs", "degrade", "degrade_loop",
           "params_from_config", "plan_degradation", "prepare_device", "run_plan", "sample_params",
           "stage_kernels", "usm_sharp"]

# Names tests/test_data_degrade.py and tests/test_data_degrade_cuda.py import from here, from
# before the plan and the device side had modules of their own (the move left those tests as
# they were).
_blur_matrix, _full_fp32 = blur_matrix, full_fp32


def degrade(hr: Tensor, seeds: list[int] | Tensor, p: DegradeParams | None = None,
            batched: bool | None = None, graph: bool | None = None) -> dict[str, Tensor]:
    """Degrade a batch of HR images (see :func:`_degrade`).

    ``batched=None`` picks the faster path for the device: one batched call on accelerators, one
    call per image on the CPU (the padded canvas wastes FLOPs that only GPUs can spare). Both give
    bit-identical results on the CPU (tested). ``graph`` (default: batched on CUDA) replays a
    cached CUDA graph of the batched call (:class:`~.degrade_graph.GraphedDegrader`); its outputs
    equal the eager batched call's on the same device."""
    if batched is None:
        batched = hr.device.type != "cpu"
    if not batched and hr.shape[0] > 1:
        return degrade_loop(hr, seed_list(seeds), p)
    if graph is None:
        graph = batched and hr.device.type == "cuda"
    if graph:
        return default_degrader()(hr, seeds, p)
    with full_fp32():
        return _degrade(hr, seeds, p)


def _degrade(hr: Tensor, seeds: list[int] | Tensor, p: DegradeParams | None = None,
             static_canvas: bool | None = None) -> dict[str, Tensor]:
    """Degrade a batch of HR images: :func:`plan_degradation` on the CPU, then :func:`run_plan`.

    Args:
        hr: ``[B, 3, H, W]`` float in [0, 1] on any device; H and W divisible by ``p.scale``.
        seeds: one integer per sample; equal seeds and images give equal outputs.
        static_canvas: see :func:`plan_degradation`; default: static on CUDA (so the eager and
            the graphed path run the same shapes and give the same bits), dynamic elsewhere.
    Returns:
        ``hr``: the target (USM-sharpened if ``p.usm``) ``[B, 3, H, W]``;
        ``lr``: ``[B, 3, H/scale, W/scale]`` 8-bit-quantised LR;
        ``lr_up``: ``lr`` bicubic-upsampled to ``[B, 3, H, W]`` and clamped to [0, 1]. All in [0, 1].
    """
    p, seeds = check_inputs(hr, seeds, p)
    if static_canvas is None:
        static_canvas = hr.device.type == "cuda"
    plan = plan_degradation(seeds, p, tuple(hr.shape[2:]), static_canvas).to(hr.device)
    prepare_device(hr.device, p, tuple(hr.shape[2:]))
    return run_plan(hr, plan)


def degrade_loop(hr: Tensor, seeds: list[int], p: DegradeParams | None = None) -> dict[str, Tensor]:
    """The same degradation one image at a time, eager, each on its own (dynamic) canvas (the
    benchmark's baseline; equal results on the CPU)."""
    if len(seeds) != hr.shape[0]:
        raise ValueError(f"degrade got {len(seeds)} seeds for a batch of {hr.shape[0]}")
    with full_fp32():
        outs = [_degrade(hr[i:i + 1], [s], p, static_canvas=False) for i, s in enumerate(seeds)]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

