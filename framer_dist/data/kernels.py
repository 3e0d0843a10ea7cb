"""Blur and sinc kernels of the Real-ESRGAN degradation, built batched in torch.

Every builder takes per-sample parameter tensors of shape ``[B]`` and returns ``[B, K, K]`` kernels
on the parameters' device, each summing to 1. ``K`` (odd) is the padded size of a stage (Table 6:
21 for the first stage and the final sinc, 11 for the second); a sample's own support ``size`` (odd,
<= K) is centred and zero-padded to ``K``, as in Real-ESRGAN.

Kernel types (codes used in the parameter tensors), with the quadratic form
``q(x) = x^T Sigma^-1 x`` where ``Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T``:

====  ===================  ======================================================
code  name                 unnormalised kernel
====  ===================  ======================================================
0     iso                  exp(-q/2), sx == sy, theta = 0
1     aniso                exp(-q/2)
2     generalized_iso      exp(-q^beta / 2), sx == sy
3     generalized_aniso    exp(-q^beta / 2)
4     plateau_iso          1 / (1 + q^beta), sx == sy
5     plateau_aniso        1 / (1 + q^beta)
====  ===================  ======================================================

The sinc (circular low-pass) kernel is ``omega * J1(omega r) / (2 pi r)`` with the centre value
``omega^2 / (4 pi)``; the "pulse" kernel is a delta (identity filter).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KERNEL_TYPES: tuple[str, ...] = (
    "iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def _grid(k: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    ax = torch.arange(k, device=device, dtype=dtype) - (k - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _support_mask(size: Tensor, k: int) -> Tensor:
    """[B, K, K] bool: inside each sample's centred odd ``size`` x ``size`` window."""
    ax = (torch.arange(k, device=size.device) - (k - 1) // 2).abs()
    half = (size.to(ax.dtype) // 2)[:, None]
    inside = ax[None, :] <= half                              # [B, K]
    return inside[:, :, None] & inside[:, None, :]


def _normalise(kernel: Tensor) -> Tensor:
    return kernel / kernel.sum(dim=(-2, -1), keepdim=True)


def mixed_kernels(kind: Tensor, size: Tensor, sigma_x: Tensor, sigma_y: Tensor, theta: Tensor,
                  beta: Tensor, k: int) -> Tensor:
    """The six Gaussian-family kernels, one per sample, ``[B, k, k]``, each summing to 1.

    ``kind`` holds the codes of the module docstring; for the iso types ``sigma_y`` and ``theta``
    are ignored (sx is used on both axes, no rotation); ``beta`` is ignored by types 0 and 1.
    """
    if k % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {k}")
    dtype = torch.float32
    dev = sigma_x.device
    kind = kind.to(dev)
    iso = (kind % 2) == 0
    sx = sigma_x.to(dtype)
    sy = torch.where(iso, sx, sigma_y.to(dtype))
    th = torch.where(iso, torch.zeros_like(sx), theta.to(dtype))
    xx, yy = _grid(k, dev, dtype)
    c, s = torch.cos(th)[:, None, None], torch.sin(th)[:, None, None]
    # rotate coordinates into the kernel's principal axes: q = u^2/sx^2 + v^2/sy^2
    u = c * xx + s * yy
    v = -s * xx + c * yy
    q = (u / sx[:, None, None]) ** 2 + (v / sy[:, None, None]) ** 2
    b = beta.to(dtype)[:, None, None]
    family = (kind // 2)[:, None, None]
    gauss = torch.exp(-0.5 * q)
    generalized = torch.exp(-0.5 * q.clamp_min(0).pow(b))
    plateau = 1.0 / (1.0 + q.clamp_min(0).pow(b))
    kern = torch.where(family == 0, gauss, torch.where(family == 1, generalized, plateau))
    kern = kern * _support_mask(size.to(dev), k)
    return _normalise(kern)


def sinc_kernels(omega: Tensor, size: Tensor, k: int) -> Tensor:
    """Circular low-pass (sinc) kernels with cut-off ``omega`` (rad/pixel), ``[B, k, k]``, sum 1."""
    if k % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {k}")
    dtype = torch.float32
    dev = omega.device
    xx, yy = _grid(k, dev, dtype)
    r = torch.sqrt(xx ** 2 + yy ** 2)[None]                          # [1, K, K]
    w = omega.to(dtype)[:, None, None]
    r_safe = torch.where(r == 0, torch.ones_like(r), r)
    kern = w * torch.special.bessel_j1(w * r_safe) / (2 * math.pi * r_safe)
    kern = torch.where(r == 0, w ** 2 / (4 * math.pi), kern)
    kern = kern * _support_mask(size.to(dev), k)
    return _normalise(kern)


def pulse_kernels(batch: int, k: int, device: torch.device | str = "cpu") -> Tensor:
    """Identity (delta) kernels ``[B, k, k]``."""
    kern = torch.zeros(batch, k, k, device=device)
    kern[:, k // 2, k // 2] = 1.0
    return kern


def gaussian_kernel_1d(size: int, sigma: float, device: torch.device | str = "cpu") -> Tensor:
    """A normalised 1-D Gaussian of odd ``size``; ``sigma <= 0`` uses OpenCV's rule from the size."""
    if sigma <= 0:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    ax = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-0.5 * (ax / sigma) ** 2)
    return g / g.sum()
