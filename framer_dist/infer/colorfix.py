"""Colour correction of a super-resolved image against its (bicubic-upsampled) LR input.

Diffusion SR drifts in global colour; both fixes borrow the colour from the reference:

- ``adain_color_fix``: per-channel mean/std of the result are set to the reference's (AdaIN).
  This is DiT4SR's default.
- ``wavelet_color_fix``: an a-trous (dilated) wavelet split ``x = low(x) + high(x)``; the result
  keeps its own high band and takes the reference's low band: ``high(result) + low(reference)``.

Images are ``[B, 3, H, W]`` float tensors of the same size; values are not clamped here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(image: Tensor, reference: Tensor) -> None:
    if image.ndim != 4 or image.shape != reference.shape:
        raise ValueError(f"colour fix needs two [B, C, H, W] tensors of the same shape, got "
                         f"{tuple(image.shape)} and {tuple(reference.shape)}")


def channel_mean_std(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per-image, per-channel mean and ``sqrt(var + eps)``, shapes ``[B, C, 1, 1]``; the variance
    is the unbiased one and eps 1e-5, as in StableSR's ``calc_mean_std`` that DiT4SR uses."""
    flat = x.flatten(2)
    mean = flat.mean(-1)[..., None, None]
    std = (flat.var(-1, unbiased=True) + eps).sqrt()[..., None, None]
    return mean, std


def adain_color_fix(image: Tensor, reference: Tensor, eps: float = 1e-5) -> Tensor:
    """Give ``image`` the channel means and stds of ``reference``."""
    _check(image, reference)
    x = image.float()
    m_x, s_x = channel_mean_std(x, eps)
    m_r, s_r = channel_mean_std(reference.float(), eps)
    return ((x - m_x) / s_x * s_r + m_r).to(image.dtype)


def _blur(x: Tensor, dilation: int) -> Tensor:
    """3x3 binomial blur with holes (a-trous), replicate padding, per channel."""
    k = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    k = (k[:, None] * k[None, :]) / 16.0
    c = x.shape[1]
    w = k.expand(c, 1, 3, 3)
    xp = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(xp, w, groups=c, dilation=dilation)


def wavelet_decompose(x: Tensor, levels: int = 5) -> tuple[Tensor, Tensor]:
    """``(high, low)`` with ``x == high + low``; ``low`` is the residual after ``levels`` blurs."""
    if levels < 1:
        raise ValueError(f"wavelet levels must be >= 1, got {levels}")
    low = x
    high = torch.zeros_like(x)
    for i in range(levels):
        blurred = _blur(low, 2 ** i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(image: Tensor, reference: Tensor, levels: int = 5) -> Tensor:
    """Keep ``image``'s high band, replace its low band by ``reference``'s."""
    _check(image, reference)
    high, _ = wavelet_decompose(image.float(), levels)
    _, ref_low = wavelet_decompose(reference.float(), levels)
    return (high + ref_low).to(image.dtype)


def color_fix(image: Tensor, reference: Tensor, method: str) -> Tensor:
    """Dispatch on ``method`` in {"adain", "wavelet", "none"}."""
    if method == "adain":
        return adain_color_fix(image, reference)
    if method == "wavelet":
        return wavelet_color_fix(image, reference)
    if method == "none":
        return image
    raise ValueError(f"colour fix must be 'adain', 'wavelet' or 'none', got {method!r}")
