"""Batched image operations on a padded "canvas" where every sample has its own valid size.

Size tensors (``h``, ``w``, new sizes, modes) are small and live on the CPU; index and weight
tables are computed there and sent to the images' device in one copy each, so the device only
runs the pixel work and nothing waits on a device-to-host read.

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
    # index tables from the (CPU) sizes, then one small transfer each
    iy = border_index(h.cpu(), oh, pad, mode).to(x.device, non_blocking=True)   # [B, Hp]
    ix = border_index(w.cpu(), ow, pad, mode).to(x.device, non_blocking=True)   # [B, Wp]
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


def resize_taps(n_in: Tensor, n_out: Tensor, mode: Tensor, len_in: int, len_out: int,
                max_ratio: float | None = None) -> tuple[Tensor, Tensor]:
    """Sparse per-sample resize weights along one axis, ``idx, w`` ``[B, len_out, K]`` (CPU).

    Unused taps and rows past each sample's ``n_out`` point at the spare column ``len_in`` with
    weight 0; see :func:`taps_1d` for the kernels."""
    rows = [taps_1d(int(a), int(b), int(m)) for a, b, m in zip(n_in.tolist(), n_out.tolist(), mode.tolist())]
    k = max(r[0].shape[1] for r in rows)
    idx = np.full((len(rows), len_out, k), len_in, dtype=np.int64)
    w = np.zeros((len(rows), len_out, k), dtype=np.float32)
    for b, (ri, rw) in enumerate(rows):
        n, kk = ri.shape
        idx[b, :n, :kk] = np.where(ri < 0, len_in, ri)
        w[b, :n, :kk] = rw
    return torch.from_numpy(idx), torch.from_numpy(w)


def resize_matrix(n_in: Tensor, n_out: Tensor, mode: Tensor, len_in: int, len_out: int,
                  max_ratio: float | None = None, device: torch.device | None = None) -> Tensor:
    """Dense ``[B, len_out, len_in]`` resize matrices on ``device`` from :func:`resize_taps`
    (one deterministic scatter: indices are unique per row)."""
    idx, w = resize_taps(n_in, n_out, mode, len_in, len_out, max_ratio)
    dev = device or n_in.device
    idx, w = idx.to(dev, non_blocking=True), w.to(dev, non_blocking=True)
    mat = torch.zeros(idx.shape[0], len_out, len_in + 1, device=dev)
    return mat.scatter_(2, idx, w)[..., :len_in]


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
    cpu = torch.device("cpu")
    h, w, new_h, new_w, mode = (t.to(cpu) for t in (h, w, new_h, new_w, mode))
    my = resize_matrix(h, new_h, mode, x.shape[2], oh, ry, x.device).to(x.dtype)   # [B, oh, Hc]
    mx = resize_matrix(w, new_w, mode, x.shape[3], ow, rx, x.device).to(x.dtype)   # [B, ow, Wc]
    return torch.matmul(torch.matmul(my[:, None], x), mx[:, None].transpose(-1, -2))


def valid_mask(h: Tensor, w: Tensor, hc: int, wc: int, device: torch.device | None = None) -> Tensor:
    """``[B, 1, Hc, Wc]`` bool mask of each sample's valid region, on ``device``."""
    dev = device or h.device
    ys = (torch.arange(hc)[None, :] < h.cpu()[:, None]).to(dev, non_blocking=True)
    xs = (torch.arange(wc)[None, :] < w.cpu()[:, None]).to(dev, non_blocking=True)
    return (ys[:, :, None] & xs[:, None, :])[:, None]
