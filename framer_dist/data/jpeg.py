"""Baseline JPEG (encode + decode) in torch, batched, with a quality per sample.

Follows what libjpeg does for ``Image.save(..., quality=q)`` with Pillow's defaults: 8-bit RGB ->
JFIF YCbCr (rounded to integers), 4:2:0 chroma subsampling (2x2 mean), level shift, 8x8 DCT-II,
quantisation with the standard Annex K tables scaled by the IJG quality rule (clamped to [1, 255]),
then dequantisation, inverse DCT, "fancy" (triangular) chroma upsampling and YCbCr -> RGB, rounded
to 8 bits. Images are padded to whole 16x16 MCUs by edge replication, as libjpeg does. No entropy
coding (it is lossless and so changes nothing). Runs on whatever device the batch is on.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .canvas import pad_canvas

_LUMA = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
_CHROMA = [
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32


def quant_tables(quality: Tensor) -> tuple[Tensor, Tensor]:
    """IJG-scaled luma and chroma tables ``[B, 8, 8]`` for integer qualities 1..100 (CPU)."""
    pairs = [_tables_for(int(q)) for q in quality.cpu().round().clamp(1, 100).tolist()]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@functools.lru_cache(maxsize=128)
def _tables_for(quality: int) -> tuple[Tensor, Tensor]:
    lum, chrom = _scaled_tables(torch.tensor([quality]))
    return lum[0], chrom[0]


def _scaled_tables(quality: Tensor) -> tuple[Tensor, Tensor]:
    q = quality.to(torch.float64).clamp(1, 100)
    scale = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)[:, None, None]
    out = []
    for base in (_LUMA, _CHROMA):
        t = torch.tensor(base, dtype=torch.float64, device=quality.device).view(1, 8, 8)
        out.append(torch.floor((t * scale + 50) / 100).clamp(1, 255).float())
    return out[0], out[1]


def _dct_matrix(device: torch.device) -> Tensor:
    n = torch.arange(8, dtype=torch.float64, device=device)
    k = n[:, None]
    c = torch.cos((2 * n[None, :] + 1) * k * math.pi / 16) * 0.5
    c[0] = c[0] / math.sqrt(2)
    return c.float()                                   # orthonormal: C @ C.T == I


@functools.lru_cache(maxsize=8)
def dct2(device: str) -> Tensor:
    """kron(C, C): the 2-D 8x8 DCT as one 64x64 matrix, cached per device."""
    c = _dct_matrix(torch.device("cpu"))
    return torch.kron(c, c).to(device)


def _blocks(x: Tensor) -> Tensor:
    """[B, H, W] -> [B, H/8, W/8, 8, 8]."""
    b, h, w = x.shape
    return x.view(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)


def _unblocks(x: Tensor) -> Tensor:
    b, hb, wb = x.shape[:3]
    return x.permute(0, 1, 3, 2, 4).reshape(b, hb * 8, wb * 8)


def _code_plane(plane: Tensor, table: Tensor, dct: Tensor) -> Tensor:
    """Level-shifted plane [B, H, W] (multiples of 8) -> reconstructed plane (not yet rounded).

    The 2-D DCT of every 8x8 block is one GEMM with the 64x64 matrix kron(C, C)."""
    blk = _blocks(plane - 128.0)                         # [B, h, w, 8, 8]
    shape = blk.shape
    coef = blk.reshape(-1, 64) @ dct.T                   # row-major vec(C X C^T) = kron(C, C) vec(X)
    t = table.reshape(shape[0], 1, 64).expand(shape[0], shape[1] * shape[2], 64).reshape(-1, 64)
    coef = torch.round(coef / t) * t
    return _unblocks((coef @ dct).view(shape)) + 128.0


def jpeg(x: Tensor, quality: Tensor, h: Tensor | None = None, w: Tensor | None = None) -> Tensor:
    """JPEG-compress and decode ``x [B, 3, H, W]`` in [0, 1] at per-sample integer ``quality [B]``.

    ``h``/``w`` give per-sample valid sizes on a canvas (see :mod:`.canvas`); by default the whole
    image. Returns the decoded images in [0, 1], quantised to 8 bits, on the canvas of ``x``.
    """
    ql, qc = (t.to(x.device, non_blocking=True) for t in quant_tables(quality.cpu()))
    b, _, hc, wc = x.shape
    h = torch.full((b,), hc, device=x.device) if h is None else h.to(x.device)
    w = torch.full((b,), wc, device=x.device) if w is None else w.to(x.device)
    return jpeg_with_tables(x, ql, qc, h, w)


def jpeg_with_tables(x: Tensor, luma: Tensor, chroma_table: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """:func:`jpeg` with the quantisation tables ``[B, 8, 8]`` (:func:`quant_tables`) and the valid
    sizes ``[B]`` already on ``x``'s device: device work only (no host reads or copies)."""
    b, c, hc, wc = x.shape
    if c != 3:
        raise ValueError(f"jpeg expects RGB [B, 3, H, W], got shape {tuple(x.shape)}")
    ph, pw = -(-hc // 16) * 16, -(-wc // 16) * 16
    xp = pad_canvas(x.float(), h, w, 0, "replicate", ph, pw)
    rgb = torch.round(xp.clamp(0, 1) * 255.0)
    r, g, bl = rgb.unbind(1)
    y = torch.round(0.299 * r + 0.587 * g + 0.114 * bl)
    cb = torch.round(-0.168735892 * r - 0.331264108 * g + 0.5 * bl + 128.0).clamp(0, 255)
    cr = torch.round(0.5 * r - 0.418687589 * g - 0.081312411 * bl + 128.0).clamp(0, 255)
    cb = torch.round(F.avg_pool2d(cb[:, None], 2)[:, 0])
    cr = torch.round(F.avg_pool2d(cr[:, None], 2)[:, 0])
    # chroma planes are (ph/2, pw/2): pad to whole 8x8 blocks (ph/2 is a multiple of 8 already)
    dct = dct2(str(x.device))
    y = torch.round(_code_plane(y, luma, dct)).clamp(0, 255)
    cb = torch.round(_code_plane(cb, chroma_table, dct)).clamp(0, 255)
    cr = torch.round(_code_plane(cr, chroma_table, dct)).clamp(0, 255)
    # fancy upsampling = triangular filter = bilinear x2, replicating each sample's chroma edge
    # at ceil(h/2) x ceil(w/2) as libjpeg does (not the MCU padding, which depends on the canvas)
    chroma = pad_canvas(torch.stack([cb, cr], 1), (h + 1) // 2, (w + 1) // 2, 0, "replicate")
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    cb, cr = chroma[:, 0] - 128.0, chroma[:, 1] - 128.0
    r = y + 1.402 * cr
    g = y - 0.344136286 * cb - 0.714136286 * cr
    bl = y + 1.772 * cb
    out = torch.stack([r, g, bl], 1)
    out = torch.round(out).clamp(0, 255) / 255.0
    return out[:, :, :hc, :wc].to(x.dtype)
