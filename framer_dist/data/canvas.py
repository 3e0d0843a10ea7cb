"""Batched image operations on a padded "canvas" where every sample has its own valid size.

Real-ESRGAN draws a resize factor per image, so after the first resize the images of a batch have
different sizes. Instead of looping, a batch is kept as one tensor ``x [B, C, Hc, Wc]`` plus the
valid sizes ``h [B]``, ``w [B]`` (top-left aligned); what lies outside a sample's valid region is
undefined. Border handling (reflect for filters, replicate for JPEG blocks) is rebuilt per sample
with one gather, so every sample's result equals processing it alone at its own size.
"""

from __future__ import annotations

import math

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
    iy = border_index(h, oh, pad, mode)                         # [B, Hp]
    ix = border_index(w, ow, pad, mode)                         # [B, Wp]
    rows = x.gather(2, iy[:, None, :, None].expand(b, c, iy.shape[1], wc))
    return rows.gather(3, ix[:, None, None, :].expand(b, c, iy.shape[1], ix.shape[1]))


def filter2d(x: Tensor, h: Tensor, w: Tensor, kernels: Tensor) -> Tensor:
    """Per-sample 2-D filtering with reflect borders. ``kernels [B, k, k]`` (k odd)."""
    b, c, hc, wc = x.shape
    k = kernels.shape[-1]
    p = k // 2
    xp = pad_canvas(x, h, w, p, "reflect")
    weight = kernels.to(x.dtype)[:, None].expand(b, c, k, k).reshape(b * c, 1, k, k)
    out = F.conv2d(xp.reshape(1, b * c, hc + 2 * p, wc + 2 * p), weight, groups=b * c)
    return out.view(b, c, hc, wc)


def _cubic(t: Tensor, a: float = -0.75) -> Tensor:
    """Keys' cubic convolution weight (torch's bicubic uses a = -0.75)."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def resize_matrix(n_in: Tensor, n_out: Tensor, mode: Tensor, len_in: int, len_out: int,
                  max_ratio: float | None = None) -> Tensor:
    """``[B, len_out, len_in]`` matrices that resize each sample along one axis.

    Matches ``F.interpolate(size=...)`` (no antialias, ``align_corners=False``) for 'bilinear' and
    'bicubic', and 'area' (adaptive average pooling), per sample: ``n_in``/``n_out`` valid lengths,
    ``mode`` codes of ``RESIZE_MODES``. Rows past ``n_out`` are zero.
    """
    dev = n_in.device
    f64 = torch.float64
    b = n_in.shape[0]
    i = torch.arange(len_out, device=dev, dtype=f64)[None, :]          # [1, L]
    nin = n_in.to(f64)[:, None]
    nout = n_out.to(f64)[:, None]
    ratio = nin / nout
    last = (n_in - 1)[:, None, None]

    # bilinear: two taps
    src = ((i + 0.5) * ratio - 0.5).clamp_min(0)
    i0 = src.floor()
    lam = src - i0
    lin_idx = torch.stack([i0, i0 + 1], -1).long()
    lin_w = torch.stack([1 - lam, lam], -1)

    # bicubic: four taps, clamped indices
    src = (i + 0.5) * ratio - 0.5
    i0 = src.floor()
    t = src - i0
    cub_idx = torch.stack([i0 - 1, i0, i0 + 1, i0 + 2], -1).long()
    cub_w = torch.stack([_cubic(t + 1), _cubic(t), _cubic(1 - t), _cubic(2 - t)], -1)

    # area: adaptive average pooling windows [floor(i n/m), ceil((i+1) n/m))
    il = torch.arange(len_out, device=dev)[None, :]
    start = (il * n_in[:, None]) // n_out[:, None]
    end = ((il + 1) * n_in[:, None] + n_out[:, None] - 1) // n_out[:, None]
    # taps of the widest area window; from the caller's CPU-side sizes when given (no device sync)
    kmax = int(math.ceil(max_ratio) + 1) if max_ratio is not None else int((torch.ceil(ratio.max()) + 1).item())
    taps = torch.arange(kmax, device=dev)
    area_idx = start[..., None] + taps
    area_w = ((area_idx < end[..., None]).to(f64) / (end - start).clamp_min(1)[..., None].to(f64))

    k = max(4, kmax)

    def widen(idx: Tensor, wt: Tensor) -> tuple[Tensor, Tensor]:
        extra = k - idx.shape[-1]
        if extra:
            idx = torch.cat([idx, idx[..., -1:].expand(*idx.shape[:-1], extra)], -1)
            wt = torch.cat([wt, wt.new_zeros(*wt.shape[:-1], extra)], -1)
        return idx, wt

    mode = mode.to(dev)[:, None, None]
    idx = torch.zeros(b, len_out, k, dtype=torch.long, device=dev)
    wts = torch.zeros(b, len_out, k, dtype=f64, device=dev)
    for code, (ix, wt) in enumerate([widen(area_idx, area_w), widen(lin_idx, lin_w),
                                     widen(cub_idx, cub_w)]):
        sel = mode == code
        idx = torch.where(sel, ix.expand(b, -1, -1), idx)
        wts = torch.where(sel, wt.expand(b, -1, -1), wts)
    idx = torch.minimum(idx.clamp_min(0), last)
    wts = wts * (il < n_out[:, None])[..., None]
    mat = torch.zeros(b, len_out, len_in, dtype=f64, device=dev)
    mat.scatter_add_(2, idx, wts)
    return mat.to(torch.float32)


def resize(x: Tensor, h: Tensor, w: Tensor, new_h: Tensor, new_w: Tensor, mode: Tensor,
           out_h: int | None = None, out_w: int | None = None,
           min_out: tuple[int, int] | None = None) -> Tensor:
    """Resize every sample from its (h, w) to its own (new_h, new_w) with its own mode.

    The canvas of the result is ``out_h x out_w`` (default: the largest new size). ``min_out``
    (smallest new height and width, known on the CPU) avoids reading sizes back from the device.
    """
    oh = int(new_h.max()) if out_h is None else out_h
    ow = int(new_w.max()) if out_w is None else out_w
    # a bound on in/out over the batch without reading device tensors: canvas / smallest output
    ry = x.shape[2] / max(1, min_out[0]) if min_out else None
    rx = x.shape[3] / max(1, min_out[1]) if min_out else None
    my = resize_matrix(h, new_h, mode, x.shape[2], oh, ry).to(x.dtype)      # [B, oh, Hc]
    mx = resize_matrix(w, new_w, mode, x.shape[3], ow, rx).to(x.dtype)      # [B, ow, Wc]
    return torch.matmul(torch.matmul(my[:, None], x), mx[:, None].transpose(-1, -2))


def valid_mask(h: Tensor, w: Tensor, hc: int, wc: int) -> Tensor:
    """``[B, 1, Hc, Wc]`` bool mask of each sample's valid region."""
    ys = torch.arange(hc, device=h.device)[None, :, None] < h[:, None, None]
    xs = torch.arange(wc, device=w.device)[None, None, :] < w[:, None, None]
    return (ys & xs)[:, None]
