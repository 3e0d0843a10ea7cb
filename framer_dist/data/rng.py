"""Counter-based Gaussian noise for a whole canvas batch in a few tensor ops.

Each value is a SplitMix64 hash of (sample key, channel, y, x) in the sample's own geometry,
turned into a standard normal through a quantile table. So a sample's noise depends only on its key and its
own size, never on the batch or the canvas, and a batch needs ~30 element-wise ops instead of a
generator and several launches per sample. (64-bit integer arithmetic wraps in torch on CPU and
CUDA; logical right shifts are emulated with a mask since int64 shifts are arithmetic.)
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _lsr(z: Tensor, s: int) -> Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)


def hash_normal(keys: list[int], hs: list[int], ws: list[int], mono: list[bool], channels: int,
                hc: int, wc: int, device: torch.device) -> Tensor:
    """``[B, channels, hc, wc]`` standard normals; sample b's values at (c, y, x) with y < hs[b],
    x < ws[b] depend only on (keys[b], c, y, x, hs[b], ws[b]); ``mono[b]`` repeats channel 0."""
    b = len(keys)
    meta = torch.tensor([[k & ((1 << 63) - 1), h, w, m] for k, h, w, m in zip(keys, hs, ws, mono)],
                        dtype=torch.int64).to(device, non_blocking=True)
    key, hh, ww, m = (meta[:, i].view(b, 1, 1, 1) for i in range(4))
    ch = torch.arange(channels, device=device).view(1, channels, 1, 1) * (1 - m)
    y = torch.arange(hc, device=device).view(1, 1, hc, 1)
    x = torch.arange(wc, device=device).view(1, 1, 1, wc)
    z = key + ((ch * hh + y) * ww + x + 1) * _GOLDEN
    z = (z ^ _lsr(z, 30)) * _M1
    z = (z ^ _lsr(z, 27)) * _M2
    z = z ^ _lsr(z, 31)
    return _normal_table(str(device))[_lsr(z, 64 - _TABLE_BITS)]


_TABLE_BITS = 20


@functools.lru_cache(maxsize=4)
def _normal_table(device: str) -> Tensor:
    """Normal quantiles at the 2^20 cell mid-points (tails to +-4.9 sigma). A table look-up instead
    of Box-Muller: log/cos give position-dependent last bits on CPU (SIMD body vs scalar tail), a
    gather is exact, so a sample's noise is bit-identical alone or in any batch."""
    n = 1 << _TABLE_BITS
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.special.ndtri(q).float().to(device)
