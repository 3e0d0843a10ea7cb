"""A degradation stage's noise: Gaussian or Poisson per sample, from one counter hash per pixel.

Both kinds come from the same hash words (:mod:`.rng`); each kind a plan uses is computed for the
whole batch and selected per sample.

The hash is some fifteen full-size passes over int64 words: on an H100 about 3 ms of a 16 ms batch
at 512 px / 16 (issue 5). Fusing them with ``torch.compile`` is the obvious next step, but it
cannot be checked on a CPU: Inductor's C++ code multiplies int64 values that overflow (SplitMix64
relies on wrapping), which is undefined behaviour in C++, and GCC cut the generated loops short
(wrong words, heap corruption; torch 2.13). Triton's integer multiply wraps by definition, so a
CUDA-only compile is the experiment for a session with a GPU (docs/data.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import canvas as cv
from .rng import counter_hash, log2_ceil_index, normal_from_hash, poisson_index, poisson_noise_table

def _vals_index(plane: Tensor, valid: Tensor) -> Tensor:
    """``[B]`` log2 of Real-ESRGAN's ``vals`` = 2^ceil(log2(#distinct 8-bit values in the valid
    region)): the values present are marked with plain stores of 1 (deterministic, no atomics);
    pixels outside a sample's valid region go to the spare slot 256."""
    b = plane.shape[0]
    idx = torch.where(valid, plane.long(), 256)
    present = torch.zeros(b, 257, device=plane.device).scatter_(1, idx.reshape(b, -1), 1.0)
    return log2_ceil_index(present[:, :256].sum(1).clamp_min(1))


def _poisson_noise(x: Tensor, z: Tensor, h: Tensor, w: Tensor, mono: Tensor, scale: Tensor) -> Tensor:
    """Real-ESRGAN's Poisson noise ``(Poisson(img * vals) / vals - img) * scale`` for the whole
    batch, colour or gray (gray: the luma's counts on every channel, via the hash's mono key)."""
    b, _, hc, wc = x.shape
    q = torch.clamp(torch.round(x * 255.0), 0, 255)
    gray = (0.299 * q[:, 0] + 0.587 * q[:, 1] + 0.114 * q[:, 2]).round().clamp(0, 255)[:, None]
    valid = cv.valid_mask(h, w, hc, wc)
    m = mono.view(b, 1, 1, 1).bool()
    vi = torch.where(m, _vals_index(gray, valid).view(b, 1, 1, 1), _vals_index(q, valid).view(b, 1, 1, 1))
    img_q = torch.where(m, gray.expand_as(q), q)
    row = (img_q + (vi * 256).to(x.dtype)).long()        # CDF row v * 256 + q (exact integers)
    return poisson_noise_table(str(x.device))[poisson_index(z, row)] * scale.to(x.dtype).view(b, 1, 1, 1)


def add_noise(x: Tensor, h: Tensor, w: Tensor, t: dict[str, Tensor], prefix: str,
              kinds: tuple[bool, bool]) -> Tensor:
    """Noise of the stage whose plan tensors start with ``prefix`` on ``x`` (``[B, 3, Hc, Wc]``,
    sample b valid in its top-left ``h[b] x w[b]``), a function of the sample's own size and key
    only (not of the canvas or batch). ``kinds`` = (any Gaussian, any Poisson) in the plan; each
    kind it uses is computed for the whole batch from the same hash words."""
    b, _, hc, wc = x.shape
    mono = t[prefix + "mono"]
    z = counter_hash(t[prefix + "key"], h, w, mono, 3, hc, wc)
    gaussian, poisson = kinds
    if gaussian:
        gauss = normal_from_hash(z) * t[prefix + "sigma"].to(x.dtype).view(b, 1, 1, 1)
    if poisson:
        pois = _poisson_noise(x, z, h, w, mono, t[prefix + "scale"])
    if gaussian and poisson:
        noise = torch.where(t[prefix + "gauss"].view(b, 1, 1, 1), gauss, pois)
    else:
        noise = gauss if gaussian else pois
    return (x + noise).clamp(0, 1)
