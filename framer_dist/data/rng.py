"""Counter-based noise for a whole canvas batch in a few tensor ops: Gaussian and Poisson.

Each value is a SplitMix64 hash of (sample key, channel, y, x) in the sample's own geometry,
turned into a standard normal through a quantile table, or into a 51-bit uniform and then a
Poisson count by an exact inversion of a CDF table (one binary search). So a sample's noise depends
only on its key and its own size, never on the batch or the canvas, a batch needs a few dozen
element-wise ops instead of a generator and several launches per sample, and nothing here reads
the device back (CUDA-graph safe).
(64-bit integer arithmetic wraps in torch on CPU and CUDA; logical right shifts are emulated with a
mask since int64 shifts are arithmetic.)
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
# XORed into a sample's key for its Poisson stream, so Poisson and Gaussian noise of the same key
# are different streams of the same hash
POISSON_SALT = 0x2545F4914F6CDD1D
KEY_MASK = (1 << 63) - 1


def _lsr(z: Tensor, s: int) -> Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)


def counter_hash(key: Tensor, h: Tensor, w: Tensor, mono: Tensor, channels: int, hc: int,
                 wc: int) -> Tensor:
    """``[B, channels, hc, wc]`` int64 SplitMix64 words of (key, c, y, x) in each sample's own
    ``h x w`` geometry. ``key``, ``h``, ``w``, ``mono`` are int64 ``[B]`` on the output device;
    ``mono[b] == 1`` gives every channel channel 0's words (gray noise)."""
    b = key.shape[0]
    dev = key.device
    key, hh, ww, m = (t.view(b, 1, 1, 1) for t in (key, h, w, mono))
    ch = torch.arange(channels, device=dev).view(1, channels, 1, 1) * (1 - m)
    y = torch.arange(hc, device=dev).view(1, 1, hc, 1)
    x = torch.arange(wc, device=dev).view(1, 1, 1, wc)
    # key + ((c h + y) w + x + 1) * golden, wrapping: the row part [B, C, hc, 1] and the column
    # part [1, 1, 1, wc] are summed separately, so only one op runs at full size
    z = (key + ((ch * hh + y) * ww + 1) * _GOLDEN) + x * _GOLDEN
    z = (z ^ _lsr(z, 30)) * _M1
    z = (z ^ _lsr(z, 27)) * _M2
    return z ^ _lsr(z, 31)


def normal_from_hash(z: Tensor) -> Tensor:
    """Standard normals (float32) from hash words: the top 20 bits index the quantile table."""
    return normal_table(str(z.device))[_lsr(z, 64 - _TABLE_BITS)]


def hash_normal(keys: list[int], hs: list[int], ws: list[int], mono: list[bool], channels: int,
                hc: int, wc: int, device: torch.device) -> Tensor:
    """``[B, channels, hc, wc]`` standard normals; sample b's values at (c, y, x) with y < hs[b],
    x < ws[b] depend only on (keys[b], c, y, x, hs[b], ws[b]); ``mono[b]`` repeats channel 0."""
    meta = torch.tensor([[k & KEY_MASK, h, w, m] for k, h, w, m in zip(keys, hs, ws, mono)],
                        dtype=torch.int64).to(device, non_blocking=True)
    return normal_from_hash(counter_hash(*meta.unbind(1), channels, hc, wc))


_TABLE_BITS = 20


@functools.lru_cache(maxsize=4)
def normal_table(device: str) -> Tensor:
    """Normal quantiles at the 2^20 cell mid-points (tails to +-4.9 sigma). A table look-up instead
    of Box-Muller: log/cos give position-dependent last bits on CPU (SIMD body vs scalar tail), a
    gather is exact, so a sample's noise is bit-identical alone or in any batch."""
    n = 1 << _TABLE_BITS
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.special.ndtri(q).float().to(device)


# ----------------------------------------------------------------------------------------------
# Poisson noise, Real-ESRGAN's rule: rate = (q / 255) * vals with q an 8-bit value (0..255) and
# vals = 2^ceil(log2(#distinct 8-bit values)) in {1, 2, ..., 256}: at most 9 * 256 distinct rates,
# so the exact CDF of every possible rate fits one table and sampling is an exact inversion.

POISSON_VALS = 9             # vals = 2^0 .. 2^8
POISSON_KMAX = 512           # counts 0..511; rate <= 256, so P(X > 511) < 1e-50 (folded into 511)
U_BITS = 51                  # uniform resolution: 2304 rows * 2^51 still fits a signed int64


@functools.lru_cache(maxsize=4)
def poisson_cdf_table(device: str) -> Tensor:
    """float64 ``cdf[v, q, k] = P(X <= k)`` ``[9, 256, 512]`` for ``X ~ Poisson(q / 255 * 2^v)``,
    computed in float64 in log space (lgamma); the last entry of every row is exactly 1."""
    lam = (torch.arange(256, dtype=torch.float64) / 255.0)[None, :] * \
        (2.0 ** torch.arange(POISSON_VALS, dtype=torch.float64))[:, None]        # [9, 256]
    k = torch.arange(POISSON_KMAX, dtype=torch.float64)
    lam3 = lam[..., None]
    logp = k * torch.log(lam3.clamp_min(1e-300)) - lam3 - torch.lgamma(k + 1)
    pmf = torch.where(lam3 > 0, torch.exp(logp), (k == 0).to(torch.float64))   # rate 0: X = 0
    cdf = torch.cumsum(pmf, -1).clamp_max(1.0)
    cdf[..., -1] = 1.0
    return cdf.to(device)


@functools.lru_cache(maxsize=4)
def poisson_search_table(device: str) -> Tensor:
    """All CDF rows in one sorted int64 sequence: entry (r, k) = r * 2^51 + ceil(cdf[r, k] * 2^51)
    (exact: scaling by a power of 2, then an integer ceiling). Row r's entries lie in
    (r * 2^51, (r + 1) * 2^51], so one global binary search finds a value's row and its place."""
    cdf = poisson_cdf_table("cpu").reshape(-1, POISSON_KMAX)
    rows = torch.arange(cdf.shape[0], dtype=torch.int64)[:, None]
    scaled = torch.ceil(torch.ldexp(cdf, torch.tensor(U_BITS))).to(torch.int64)
    return ((rows << U_BITS) + scaled).reshape(-1).to(device)


def poisson_index(z: Tensor, row: Tensor) -> Tensor:
    """Global index ``row * 512 + k`` of the Poisson count k drawn from hash words ``z`` for CDF
    rows ``row = vals_index * 256 + q`` (int64, broadcastable to ``z``), by exact inversion: with
    the 51-bit uniform ``u = U / 2^51`` (U the top 51 bits of the hash word), k is the smallest
    count with ``cdf[row, k] > u``. Since U is an integer, ``cdf * 2^51 > U`` iff
    ``ceil(cdf * 2^51) > U``, so one ``searchsorted`` of ``row * 2^51 + U`` in
    :func:`poisson_search_table` counts the entries <= it: all ``row * 512`` entries of earlier
    rows plus the k entries of its own row with ``cdf <= u``. One kernel, no data-dependent
    control flow, integer-exact on every device."""
    table = poisson_search_table(str(z.device))
    return torch.searchsorted(table, (row << U_BITS) + _lsr(z, 64 - U_BITS), right=True)


def poisson_from_hash(z: Tensor, vals_index: Tensor, q: Tensor) -> Tensor:
    """Poisson counts (int64) for rate ``q / 255 * 2^vals_index`` (see :func:`poisson_index`)."""
    row = vals_index * 256 + q
    return poisson_index(z, row) - row * POISSON_KMAX


@functools.lru_cache(maxsize=4)
def poisson_noise_table(device: str) -> Tensor:
    """float32 ``k / vals - q / 255`` at every global index ``(v * 256 + q) * 512 + k`` of
    :func:`poisson_index` (vals = 2^v): Real-ESRGAN's unscaled Poisson noise as one gather instead
    of five full-size ops (the same float32 operations, done once per table entry)."""
    g = torch.arange(POISSON_VALS * 256 * POISSON_KMAX)
    k, row = g % POISSON_KMAX, g // POISSON_KMAX
    vals = (2 ** (row // 256)).to(torch.float32)
    return (k.to(torch.float32) / vals - (row % 256).to(torch.float32) / 255.0).to(device)


def log2_ceil_index(count: Tensor) -> Tensor:
    """``ceil(log2(count))`` as int64 for integer-valued counts >= 1 (exact: a count c needs k
    with 2^(k-1) < c <= 2^k; computed by comparisons, no floating log)."""
    c = count.to(torch.int64)
    k = torch.zeros_like(c)
    for s in range(1, POISSON_VALS):
        k = k + (c > (1 << (s - 1))).to(torch.int64)
    return k
