"""Batched image operations on a padded "canvas" where every sample has its own valid size.

Resize taps (sparse index/weight tables) are computed on the CPU from the sizes (numpy, cached)
and travel to the device with the rest of a degradation plan; everything else (border index
tables, valid masks, dense resize matrices) is computed on the images' device from size tensors
that live there, so the pixel work never waits on a host read or a host-to-device copy (the
degradation's CUDA graph relies on this).

Real-ESRGAN draws a resize factor per image, so after the first resize the images of a batch have
different sizes. Instead of looping, a batch is kept as one tensor ``x [B, C, Hc, Wc]`` plus the
valid sizes ``h [B]``, ``w [B]`` (top-left aligned); what lies outside a sample's valid region is
undefined. Border handling (reflect for filters, replicate for JPEG blocks) is rebuilt per sample
with one gather, so every sample's result equals processing it alone at its own size.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# resize modes (codes used in parameter tensors)
RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")


def border_index(n_valid: Tensor, length: int, pad: int, mode: str) -> Tensor:
    """``[B, length + 2 pad]`` source index for padded coordinate ``i - pad`` of each sample.

    ``mode='reflect'`` mirrors without repeating the edge (OpenCV BORDER_REFLECT_101, torch
    'reflect'), also for pads larger than the image; ``'replicate'`` repeats the edge pixel.
    """
    i = torch.arange(-pad, length + pad, device=n_valid.device)[None, :]
    n = n_valid[:, None].to(i.dtype)
    if mode == "replicate":
        return torch.minimum(i.clamp_min(0), n - 1)
    if mode != "reflect":
        raise ValueError(f"unknown border mode {mode!r}")
    period = (2 * (n - 1)).clamp_min(1)
    m = torch.remainder(i, period)
    m = torch.where(m >= n, period - m, m)
    return torch.where(n == 1, torch.zeros_like(m), m)


def pad_canvas(x: Tensor, h: Tensor, w: Tensor, pad: int, mode: str,
               out_h: int | None = None, out_w: int | None = None) -> Tensor:
    """Pad each sample's valid region by ``pad`` on all sides with its own border rule.

    The result has spatial size ``(out_h or Hc) + 2 pad`` by ``(out_w or Wc) + 2 pad``.
    """
    b, c, hc, wc = x.shape
    oh = hc if out_h is None else out_h
    ow = wc if out_w is None else out_w
    # index tables computed where the images are (a no-op move when the sizes live there already)
    iy = border_index(h.to(x.device), oh, pad, mode)   # [B, Hp]
    ix = border_index(w.to(x.device), ow, pad, mode)   # [B, Wp]
    rows = x.gather(2, iy[:, None, :, None].expand(b, c, iy.shape[1], wc))
    return rows.gather(3, ix[:, None, None, :].expand(b, c, iy.shape[1], ix.shape[1]))


def filter2d(x: Tensor, h: Tensor, w: Tensor, kernels: Tensor) -> Tensor:
    """Per-sample 2-D filtering with reflect borders. ``kernels [B or 1, k, k]`` (k odd).

    On GPUs by FFT (:func:`correlate_fft`): the same correlation to ~1e-6 and several times
    faster for these large kernels (the direct depthwise kernel was 3.8 of 17.8 ms of GPU time
    per H100 batch; bench/results/degrade.md). On the CPU the direct filter, whose arithmetic
    does not depend on the batch (CPU FFTs vectorise across transforms, so a sample's last bits
    could depend on how many share its call)."""
    b, c, hc, wc = x.shape
    k = kernels.shape[-1]
    p = k // 2
    xp = pad_canvas(x, h, w, p, "reflect")
    if x.device.type != "cpu":
        return correlate_fft(xp, kernels)
    weight = kernels.to(x.dtype).expand(b, k, k)[:, None].expand(b, c, k, k).reshape(b * c, 1, k, k)
    out = F.conv2d(xp.reshape(1, b * c, hc + 2 * p, wc + 2 * p), weight, groups=b * c)
    return out.view(b, c, hc, wc)


def correlate_fft(xp: Tensor, kernels: Tensor) -> Tensor:
    """Valid correlation of padded images ``xp [B, C, H + k - 1, W + k - 1]`` with ``kernels
    [B or 1, k, k]`` by FFT -> ``[B, C, H, W]``."""
    k = kernels.shape[-1]
    hc, wc = xp.shape[2] - k + 1, xp.shape[3] - k + 1
    size = (_fft_size(xp.shape[2]), _fft_size(xp.shape[3]))
    # correlation = convolution with the flipped kernel; output o of the correlation is linear
    # convolution index o + k - 1, which never wraps since the FFT is at least the padded size
    spectrum = torch.fft.rfft2(xp, s=size) * torch.fft.rfft2(kernels.flip(-2, -1).to(xp.dtype), s=size)[:, None]
    y = torch.fft.irfft2(spectrum, s=size)
    return y[..., k - 1: k - 1 + hc, k - 1: k - 1 + wc]


@functools.lru_cache(maxsize=64)
def _fft_size(n: int) -> int:
    """The smallest m >= n with no prime factor above 5 (fast for every FFT library)."""
    m = n
    while True:
        r = m
        for f in (2, 3, 5):
            while r % f == 0:
                r //= f
        if r == 1:
            return m
        m += 1


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weight (torch's bicubic uses a = -0.75)."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


@functools.lru_cache(maxsize=8192)
def taps_1d(n_in: int, n_out: int, mode: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample's resize along one axis: ``idx, w`` ``[n_out, k]`` (numpy, cached).

    Matches ``F.interpolate(size=...)`` (no antialias, ``align_corners=False``) for 'bilinear' and
    'bicubic', and 'area' (adaptive average pooling). Border taps clamped onto the same index are
    merged, so indices are unique within a row; unused taps have weight 0 and index -1.
    """
    i = np.arange(n_out, dtype=np.float64)[:, None]
    ratio = n_in / n_out
    if mode == 1:                                   # bilinear: two taps
        src = np.maximum((i + 0.5) * ratio - 0.5, 0)
        i0 = np.floor(src)
        lam = src - i0
        idx = np.concatenate([i0, i0 + 1], 1)
        w = np.concatenate([1 - lam, lam], 1)
    elif mode == 2:                                 # bicubic: four taps
        src = (i + 0.5) * ratio - 0.5
        i0 = np.floor(src)
        t = src - i0
        idx = np.concatenate([i0 - 1, i0, i0 + 1, i0 + 2], 1)
        w = np.concatenate([_cubic(t + 1), _cubic(t), _cubic(1 - t), _cubic(2 - t)], 1)
    elif mode == 0:                                 # area: windows [floor(i n/m), ceil((i+1) n/m))
        il = np.arange(n_out)[:, None]
        start = (il * n_in) // n_out
        end = ((il + 1) * n_in + n_out - 1) // n_out
        k = int(math.ceil(ratio)) + 1
        idx = (start + np.arange(k)[None, :]).astype(np.float64)
        w = (idx < end) / (end - start)
    else:
        raise ValueError(f"unknown resize mode code {mode}")
    idx = np.clip(idx, 0, n_in - 1).astype(np.int64)
    w = w.astype(np.float64)
    # clamped taps repeat an index in consecutive runs: carry each run's weight to its last tap
    for t in range(1, idx.shape[1]):
        same = idx[:, t] == idx[:, t - 1]
        w[:, t] += np.where(same, w[:, t - 1], 0.0)
        w[:, t - 1] = np.where(same, 0.0, w[:, t - 1])
    idx = np.where(w == 0, -1, idx)
    return idx, w


def max_taps(len_in: int, min_out: int) -> int:
    """An upper bound on :func:`taps_1d`'s tap count for any input <= ``len_in`` and output
    >= ``min_out``, any mode (area needs ceil(in/out) + 1, bicubic 4): a static K for CUDA graphs."""
    return max(4, math.ceil(len_in / max(1, min_out)) + 1)


def resize_taps(n_in: list[int], n_out: list[int], mode: list[int], len_in: int, len_out: int,
                k: int | None = None) -> tuple[Tensor, Tensor]:
    """Sparse per-sample resize weights along one axis, ``idx, w`` ``[B, len_out, K]`` (CPU).

    Unused taps and rows past each sample's ``n_out`` point at the spare column ``len_in`` with
    weight 0; see :func:`taps_1d` for the kernels. ``K`` is ``k`` (a static bound, see
    :func:`max_taps`) or the batch's largest tap count."""
    rows = [taps_1d(int(a), int(b), int(m)) for a, b, m in zip(n_in, n_out, mode)]
    widest = max(r[0].shape[1] for r in rows)
    if k is None:
        k = widest
    elif widest > k:
        raise ValueError(f"resize needs {widest} taps, more than the static bound {k}")
    idx = np.full((len(rows), len_out, k), len_in, dtype=np.int64)
    w = np.zeros((len(rows), len_out, k), dtype=np.float32)
    for b, (ri, rw) in enumerate(rows):
        n, kk = ri.shape
        idx[b, :n, :kk] = np.where(ri < 0, len_in, ri)
        w[b, :n, :kk] = rw
    return torch.from_numpy(idx), torch.from_numpy(w)


def taps_matrix(idx: Tensor, w: Tensor, len_in: int) -> Tensor:
    """Dense ``[B, len_out, len_in]`` resize matrices from :func:`resize_taps` tables, on their
    device (one deterministic scatter: indices are unique per row; the spare column is cut off)."""
    mat = torch.zeros(idx.shape[0], idx.shape[1], len_in + 1, device=idx.device)
    return mat.scatter_(2, idx.long(), w)[..., :len_in]


def resize_with_taps(x: Tensor, taps_y: tuple[Tensor, Tensor], taps_x: tuple[Tensor, Tensor]) -> Tensor:
    """Resize every sample with its own taps (on ``x``'s device): two batched matrix products."""
    my = taps_matrix(*taps_y, x.shape[2]).to(x.dtype)       # [B, oh, Hc]
    mx = taps_matrix(*taps_x, x.shape[3]).to(x.dtype)       # [B, ow, Wc]
    return torch.matmul(torch.matmul(my[:, None], x), mx[:, None].transpose(-1, -2))


def resize(x: Tensor, h: Tensor, w: Tensor, new_h: Tensor, new_w: Tensor, mode: Tensor,
           out_h: int | None = None, out_w: int | None = None) -> Tensor:
    """Resize every sample from its (h, w) to its own (new_h, new_w) with its own mode.

    The canvas of the result is ``out_h x out_w`` (default: the largest new size). A convenience
    for sizes on the CPU (taps built there and copied); the degradation builds its taps in its plan.
    """
    h, w, new_h, new_w, mode = (t.cpu().tolist() for t in (h, w, new_h, new_w, mode))
    oh = max(new_h) if out_h is None else out_h
    ow = max(new_w) if out_w is None else out_w
    ty = resize_taps(h, new_h, mode, x.shape[2], oh)
    tx = resize_taps(w, new_w, mode, x.shape[3], ow)
    move = lambda t: tuple(v.to(x.device, non_blocking=True) for v in t)  # noqa: E731
    return resize_with_taps(x, move(ty), move(tx))


def valid_mask(h: Tensor, w: Tensor, hc: int, wc: int, device: torch.device | None = None) -> Tensor:
    """``[B, 1, Hc, Wc]`` bool mask of each sample's valid region, on ``device`` (computed there)."""
    dev = device or h.device
    ys = torch.arange(hc, device=dev)[None, :] < h.to(dev)[:, None]
    xs = torch.arange(wc, device=dev)[None, :] < w.to(dev)[:, None]
    return (ys[:, :, None] & xs[:, None, :])[:, None]
