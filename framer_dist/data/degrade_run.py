"""The device side of the degradation: the pixel work of a :class:`~.degrade_plan.DegradePlan`
(no host reads, no host-to-device copies, no per-sample Python branches: capturable in a CUDA
graph), USM sharpening, and the exact-fp32 context every caller runs it in.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import canvas as cv
from .degrade_plan import DegradeParams, DegradePlan
from .jpeg import dct2, jpeg_with_tables
from .kernels import gaussian_kernel_1d
from .noise import add_noise
from .rng import normal_table, poisson_noise_table, poisson_search_table


def _taps(t: dict[str, Tensor], prefix: str) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    return (t[prefix + "y_idx"], t[prefix + "y_w"]), (t[prefix + "x_idx"], t[prefix + "x_w"])


def _run_stage(x: Tensor, t: dict[str, Tensor], s: str, h: Tensor, w: Tensor,
               kinds: tuple[bool, bool]) -> Tensor:
    """Blur at the current sizes ``h, w``, resize to the stage's sizes, add noise."""
    x = cv.filter2d(x, h, w, t["k" + s])
    x = cv.resize_with_taps(x, *_taps(t, "r" + s))
    return add_noise(x, t["h" + s], t["w" + s], t, "n" + s, kinds)


def _run_final(x: Tensor, t: dict[str, Tensor], orders: tuple[bool, bool]) -> Tensor:
    """Resize to the LR size + final sinc, and JPEG, in each sample's order: each order the plan
    uses is computed for the whole batch and selected per sample (branch-free batching)."""
    hl, wl, h2, w2 = t["hl"], t["wl"], t["h2"], t["w2"]
    taps = _taps(t, "rf")
    outs = []
    if orders[0]:
        a = cv.filter2d(cv.resize_with_taps(x, *taps), hl, wl, t["kf"])
        outs.append(jpeg_with_tables(a.clamp(0, 1), t["qfluma"], t["qfchroma"], hl, wl))
    if orders[1]:
        bb = jpeg_with_tables(x.clamp(0, 1), t["qfluma"], t["qfchroma"], h2, w2)
        outs.append(cv.filter2d(cv.resize_with_taps(bb, *taps), hl, wl, t["kf"]))
    if len(outs) == 1:
        return outs[0]
    return torch.where(t["jpeg_first"].view(-1, 1, 1, 1), outs[1], outs[0])


def run_plan(hr: Tensor, plan: DegradePlan) -> dict[str, Tensor]:
    """The device side of :func:`~.degrade._degrade`: pixel work only, with the plan's tensors on
    ``hr``'s device. No host reads, host-to-device copies or per-sample Python branches (capturable
    in a CUDA graph; tested with a dispatch mode that records such ops)."""
    p, t = plan.p, plan.tensors
    x = hr.float().clamp(0, 1)
    if p.usm:
        x = usm_sharp(x, p)
    target = x
    x = _run_stage(x, t, "1", t["h0"], t["w0"], plan.noise_kinds[0])
    x = jpeg_with_tables(x, t["q1luma"], t["q1chroma"], t["h1"], t["w1"])
    x = _run_stage(x, t, "2", t["h1"], t["w1"], plan.noise_kinds[1])
    lr = _run_final(x, t, plan.orders)
    lr = torch.clamp(torch.round(lr * 255.0), 0, 255) / 255.0
    lr_up = F.interpolate(lr, size=tuple(hr.shape[2:]), mode="bicubic", align_corners=False).clamp(0, 1)
    return {"hr": target.to(hr.dtype), "lr": lr.to(hr.dtype), "lr_up": lr_up.to(hr.dtype)}


def prepare_device(device: torch.device | str, p: DegradeParams, hw: tuple[int, int]) -> None:
    """Build the cached device tables (DCT, USM kernel, normal and Poisson tables) now, so
    :func:`run_plan` only reads them (required before a CUDA graph capture)."""
    dev = str(torch.device(device))
    dct2(dev)
    normal_table(dev)
    poisson_search_table(dev)
    poisson_noise_table(dev)
    if p.usm and torch.device(device).type == "cpu":
        for n in hw:
            blur_matrix(n, _usm_size(p), dev)
    elif p.usm:
        _usm_kernel(_usm_size(p), dev)


@functools.lru_cache(maxsize=16)
def blur_matrix(n: int, size: int, device: str) -> Tensor:
    """``[n, n]`` matrix of a 1-D Gaussian blur with reflect-101 borders (OpenCV's default), so
    a separable blur is two GEMMs ``T @ X @ T^T`` (much faster on GPUs than a 51-tap conv)."""
    g = gaussian_kernel_1d(size, 0.0).double()
    pad = size // 2
    src = cv.border_index(torch.full((1,), n), n, pad, "reflect")[0]      # [n + 2 pad]
    rows = torch.arange(n)[:, None]
    taps = torch.arange(size)[None, :]
    mat = torch.zeros(n, n, dtype=torch.float64)
    mat.index_put_((rows.expand(n, size), src[rows + taps]), g.expand(n, size), accumulate=True)
    return mat.float().to(device)


@functools.lru_cache(maxsize=8)
def _usm_kernel(size: int, device: str) -> Tensor:
    """``[1, size, size]``: the separable Gaussian of USM (OpenCV's sigma rule from the size), as
    one 2-D kernel for the FFT filter (reflect-101 borders, OpenCV's default)."""
    g = gaussian_kernel_1d(size, 0.0).double()
    return (g[:, None] * g[None, :]).float()[None].to(device)


def _usm_size(p: DegradeParams) -> int:
    return p.usm_radius + 1 if p.usm_radius % 2 == 0 else p.usm_radius     # 50 -> 51, as BasicSR


def usm_sharp(img: Tensor, p: DegradeParams) -> Tensor:
    """BasicSR's USMSharp on a uniform batch ``[B, 3, H, W]`` in [0, 1]."""
    size = _usm_size(p)
    dev = str(img.device)
    if img.device.type == "cpu":  # two GEMMs: exact and batch-independent on the CPU
        ty, tx = blur_matrix(img.shape[2], size, dev), blur_matrix(img.shape[3], size, dev)

        def blur(t: Tensor) -> Tensor:
            return torch.matmul(torch.matmul(ty, t), tx.T)
    else:                         # FFT on GPUs: ~3x cheaper than the dense GEMMs at 512 px
        kernel = _usm_kernel(size, dev).to(img.dtype)
        full = (torch.full((img.shape[0],), img.shape[2], device=img.device),
                torch.full((img.shape[0],), img.shape[3], device=img.device))

        def blur(t: Tensor) -> Tensor:
            return cv.filter2d(t, *full, kernel)

    residual = img - blur(img)
    mask = (residual.abs() * 255 > p.usm_threshold).to(img.dtype)
    soft = blur(mask)
    sharp = (img + p.usm_weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * img


@contextlib.contextmanager
def full_fp32():
    """Exact fp32 for the pixel maths whatever the trainer set (TF32 matmuls/convs or an enclosing
    autocast would change 8-bit roundings and make a sample's pair depend on the device's algorithm
    choice, and a graph captured under them would bake that in)."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.backends.cudnn.flags(enabled=True, benchmark=False,
                                                           deterministic=True, allow_tf32=False))
            for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(dev, enabled=False))
            yield
    finally:
        torch.set_float32_matmul_precision(prev)

