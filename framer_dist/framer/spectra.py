"""Spectra, frequency masks and band vectors (docs/specs/framer.md section 2).

All spectral work is done in fp32 whatever the feature dtype (float64 stays float64), on the un-shifted FFT layout: the
spec's ``fftshift`` only permutes bins, and every quantity FRAMER needs (norms, dot products, sums
over bins, quantiles) is invariant under a permutation applied to all tensors alike, so no shift
is ever materialised.

Half-spectrum shortcut (``framer.use_rfft``): for real input ``|S(k)| = |S(-k)|`` and both masks
are symmetric under ``k -> -k``, so every full-spectrum sum equals a sum over the ``rfft2`` half
where each interior column (neither DC nor, for even W, Nyquist) counts twice. Band vectors get a
``sqrt(2)`` weight on those columns (so norms and dot products are exact) and the FAW sums a
weight of 2. The result matches the plain ``fft2`` definition to float rounding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor


class _HalfSpectrumMagnitude(torch.autograd.Function):
    """``|rfft2|`` of the student stack and the (gradient-free) teacher into one ``[L+1, ...]`` tensor.

    Why a custom Function: autograd's own ``rfft2`` backward zero-pads the gradient to the full
    spectrum and runs a full complex FFT, and ``abs`` saves and rebuilds the complex phase; here
    the backward is one ``irfft2`` (half the work) with the phase folded into a single multiply.
    With ``G`` the gradient w.r.t. the half spectrum, ``dL/dx = Re(sum_k G_k e^{+i k.x})`` over the
    half, which equals ``H W irfft2(G * c)`` with ``c = 1`` on self-mirrored columns (DC, and
    Nyquist for even W) and ``1/2`` on interior ones (``irfft2`` doubles those).
    """

    @staticmethod
    def forward(ctx, students: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        s = torch.fft.rfft2(students)  # [L, B, C, H, Wr], one call for all layers
        out = s.new_empty((students.shape[0] + 1, *s.shape[1:]), dtype=students.dtype)
        torch.abs(s, out=out[:-1])
        torch.abs(torch.fft.rfft2(teacher), out=out[-1])
        ctx.save_for_backward(s, out)
        ctx.w = students.shape[-1]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        s, mag = ctx.saved_tensors
        h, w = s.shape[-2], ctx.w
        ratio = torch.div(grad[:-1], mag[:-1])
        ratio.nan_to_num_(0.0, 0.0, 0.0)  # |S| = 0: gradient 0, as torch's abs (sgn(0) = 0)
        count, _ = column_weights(w, True, s.device)
        ratio.mul_((h * w) / count.to(ratio.dtype))  # irfft2 normalisation and column correction
        return torch.fft.irfft2(s * ratio, s=(h, w)), None


def spectrum_magnitude(students: Tensor, teacher: Tensor, half: bool) -> Tensor:
    """``|FFT2|`` of ``students`` ``[L, B, C, H, W]`` and ``teacher`` ``[B, C, H, W]`` stacked to
    ``[L+1, B, C, H, Wk]`` (teacher last), in fp32 whatever the input dtype (float64 input stays
    float64, which only the gradient checks use); the teacher gets no
    gradient. ``half=True``: the ``rfft2`` half (``Wk = W // 2 + 1``) with one FFT call for all
    student layers (the teacher is transformed separately rather than concatenated, which would
    copy the whole student stack); else the full ``fft2`` (plain autograd, for checking).
    """
    dtype = torch.float64 if students.dtype == torch.float64 else torch.float32
    xs, xt = students.to(dtype), teacher.detach().to(dtype)
    if half:
        return _HalfSpectrumMagnitude.apply(xs, xt)
    return torch.fft.fft2(torch.cat([xs, xt.unsqueeze(0)], dim=0)).abs()


@functools.lru_cache(maxsize=64)
def column_weights(w: int, half: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """(count weight, sqrt weight) per spectrum column, shape ``[W // 2 + 1]`` (half) or ``[W]``.

    In the rfft2 half, column 0 (DC) and, for even ``w``, column ``w // 2`` (Nyquist) are their own
    mirror images and count once; every other column stands for itself and its mirror: count 2.
    """
    n = w // 2 + 1 if half else w
    count = torch.ones(n, dtype=torch.float32)
    if half:
        last = n - 1 if w % 2 == 0 else n  # even w: the last column is Nyquist, self-mirrored
        count[1:last] = 2.0
    count = count.to(device)
    return count, count.sqrt()


def normalized_frequencies(n: int, *, rfft: bool = False) -> Tensor:
    """Frequencies of the un-shifted FFT layout in units of Nyquist (float64): values in [-1, 1).

    ``2 k / n`` for the integer bin index ``k`` of the ``fftfreq`` layout (``0 .. ceil(n/2)-1``, then
    ``-floor(n/2) .. -1``): for even ``n`` the Nyquist bin is -1. ``rfft=True`` gives the
    non-negative half (``rfftfreq``, ``k = 0 .. n//2``), where the even-``n`` Nyquist bin reads +1
    (same ``|f|``). Computed as one correctly rounded division, not as ``fftfreq(n) * 2``
    (``k * (1/n) * 2`` rounds twice: ``3 * 0.1 * 2 = 0.6000000000000001``), so a bin whose exact
    frequency equals the radius satisfies ``rho <= radius`` as the spec's ``M_LF`` says.
    """
    k = torch.arange(n // 2 + 1) if rfft else torch.cat([torch.arange((n + 1) // 2), torch.arange(-(n // 2), 0)])
    return (2.0 * k.to(torch.float64)) / n


@functools.lru_cache(maxsize=64)
def radial_lf_mask(h: int, w: int, radius: float, half: bool, device: torch.device) -> Tensor:
    """Boolean LF mask ``rho <= radius`` on the un-shifted layout, ``[h, w//2+1]`` (half) or ``[h, w]``.

    ``rho = sqrt(fy^2 + fx^2)`` with ``fy, fx`` in units of Nyquist (1 = Nyquist), so
    ``radius`` is a fraction of Nyquist. The seed document prints "r = 0.2%"; we read it as the
    fraction 0.2 of Nyquist (0.2% of Nyquist would leave only the DC bin at any latent size up to
    1000 px). Boundary cases: ``radius = 0`` keeps exactly the DC bin (``rho = 0 <= 0``) as LF;
    ``radius >= sqrt(2)`` (the corner of the normalised square) makes every bin LF and the HF
    band empty. Cached per (shape, radius, layout, device); never modify the returned tensor.
    """
    fy = normalized_frequencies(h)
    fx = normalized_frequencies(w, rfft=half)
    rho = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return (rho <= radius).to(device)


def quantile_lastdim(x: Tensor, q: float) -> Tensor:
    """Linear-interpolation quantile along the last axis, like ``torch.quantile`` (same rank
    arithmetic) but without its 2**24-element input limit. ``x``: ``[N, M]`` -> ``[N]``."""
    m = x.shape[-1]
    xs, _ = torch.sort(x, dim=-1)
    rank = torch.tensor(q, dtype=x.dtype, device=x.device) * (m - 1)
    below = rank.long().clamp(max=m - 1)
    above = (below + 1).clamp(max=m - 1)
    frac = rank - below.to(x.dtype)
    lo = xs.index_select(-1, below.reshape(1)).squeeze(-1)
    hi = xs.index_select(-1, above.reshape(1)).squeeze(-1)
    return torch.lerp(lo, hi, frac)


def teacher_quantile_lf_mask(teacher_mag: Tensor, cutoff: float, half: bool, w: int) -> Tensor:
    """Per-sample LF mask of the authors' code: ``|S_teacher| < q_b``, ``q_b`` = the ``cutoff``
    quantile of the teacher's full-spectrum magnitudes over (C, H, W).

    This selects the *weakest* bins; for natural (and latent) spectra those are mostly high
    spatial frequencies, so this "LF" band is not a low-pass band. ``teacher_mag``: ``[B, C, H, Wk]``
    (half or full layout). For the half layout the full multiset of magnitudes is rebuilt exactly
    by counting every interior column twice (its mirror has the same magnitude), and mirror twins
    always fall on the same side (the plain full-``fft2`` mask can split a twin pair by one rounding
    ulp when the quantile lands on it; tests compare on inputs where it does not).
    """
    b = teacher_mag.shape[0]
    if half:
        wr = teacher_mag.shape[-1]
        last = wr - 1 if w % 2 == 0 else wr
        # The DC (and even-W Nyquist) column holds both (ky, .) and (-ky, .), equal in exact
        # arithmetic but rounded differently by the FFT; average them so a mirror pair can never be
        # split by 1 ulp when the quantile lands on it (interior columns stand for their mirror).
        rows = (-torch.arange(teacher_mag.shape[-2], device=teacher_mag.device)) % teacher_mag.shape[-2]
        teacher_mag = teacher_mag.clone()
        for c in {0, wr - 1} if w % 2 == 0 else {0}:
            col = teacher_mag[..., c]
            teacher_mag[..., c] = 0.5 * (col + col[..., rows])
        flat = torch.cat([teacher_mag.reshape(b, -1), teacher_mag[..., 1:last].reshape(b, -1)], dim=1)
    else:
        flat = teacher_mag.reshape(b, -1)
    q = quantile_lastdim(flat, cutoff)
    return teacher_mag < q.view(b, 1, 1, 1)


@dataclass
class BandFeatures:
    """One band for all layers (students then teacher last).

    vec:    ``[L+1, B, K]`` weighted magnitude vectors (not yet normalised); dot products and norms
            of these equal those of ``vec(|S * M_band|)`` over the full spectrum.
    norm:   ``[L+1, B]`` L2 norms of ``vec``.
    energy: ``[L+1, B]`` FAW energy ``E_band`` (detached): mean over channels of
            ``sum_hw |S| M / (sum_hw M + eps)``.
    """

    vec: Tensor
    norm: Tensor
    energy: Tensor


@functools.lru_cache(maxsize=64)
def _radial_plan(h: int, w: int, radius: float, half: bool, dtype: torch.dtype,
                 device: torch.device) -> tuple[tuple[Tensor | None, Tensor], tuple[Tensor | None, Tensor], Tensor]:
    """Per band ``(bin indices or None, weights)`` and the ``[P, 2]`` FAW selector, built once per
    shape/device (no per-step host sync for ``nonzero``). A band covering fewer than half the bins
    (LF at the default radius, ~3%) is gathered by index; a larger one is weighted in place."""
    lf = radial_lf_mask(h, w, radius, half, device).flatten()
    count_w, sqrt_w = column_weights(w, half, device)
    wk = w // 2 + 1 if half else w
    sw = sqrt_w.expand(h, wk).flatten().to(dtype)
    bands = []
    for band in (lf, ~lf):
        idx = band.nonzero().squeeze(1)
        if idx.numel() * 2 < band.numel():
            bands.append((idx, sw.index_select(0, idx)))
        else:
            bands.append((None, sw * band))
    cw = count_w.expand(h, wk).flatten()
    sel = torch.stack([cw * lf, cw * ~lf], dim=1).to(dtype)  # [P, 2]
    return bands[0], bands[1], sel


def radial_bands(mag: Tensor, radius: float, eps: float, half: bool, w: int) -> tuple[BandFeatures, BandFeatures]:
    """LF and HF band features for the radial mask. ``mag``: ``[L+1, B, C, H, Wk]``."""
    h = mag.shape[-2]
    lf_plan, hf_plan, sel = _radial_plan(h, w, float(radius), half, mag.dtype, mag.device)
    flat = mag.flatten(3)  # [L+1, B, C, P], a view
    out = []
    for idx, weight in (lf_plan, hf_plan):
        vec = flat.index_select(-1, idx) * weight if idx is not None else flat * weight
        out.append(vec.flatten(2))
    # FAW energies for both bands with one mat-vec pass over the magnitudes.
    with torch.no_grad():
        sums = flat @ sel  # [L+1, B, C, 2]
        energy = (sums / (sel.sum(0) + eps)).mean(dim=2)  # [L+1, B, 2]
    return tuple(
        BandFeatures(v, torch.linalg.vector_norm(v, dim=-1), energy[..., k])
        for k, v in enumerate(out))  # type: ignore[return-value]


def quantile_bands(mag: Tensor, cutoff: float, eps: float, half: bool, w: int) -> tuple[BandFeatures, BandFeatures]:
    """LF and HF band features for the teacher-quantile mask (shared by all layers of a sample)."""
    count_w, sqrt_w = column_weights(w, half, mag.device)
    with torch.no_grad():
        lf = teacher_quantile_lf_mask(mag[-1], cutoff, half, w)  # [B, C, H, Wk]
    out = []
    for band in (lf, ~lf):
        bandf = band.to(mag.dtype)
        vec = (mag * (bandf * sqrt_w)).flatten(2)
        with torch.no_grad():
            cnt = bandf * count_w  # [B, C, H, Wk]
            sums = torch.einsum("lbchw,bchw->lbc", mag, cnt)
            energy = (sums / (cnt.sum(dim=(-2, -1)) + eps)).mean(dim=2)
        out.append(BandFeatures(vec, torch.linalg.vector_norm(vec, dim=-1), energy))
    return out[0], out[1]


def band_features(mag: Tensor, mask: str, radius: float, cutoff: float, eps: float, half: bool,
                  w: int) -> tuple[BandFeatures, BandFeatures]:
    """Dispatch on ``framer.mask``: returns (LF, HF) band features."""
    if mask == "radial":
        return radial_bands(mag, radius, eps, half, w)
    if mask == "teacher_quantile":
        return quantile_bands(mag, cutoff, eps, half, w)
    raise ValueError(f"framer.mask: {mask!r} is not allowed; allowed values: 'radial', 'teacher_quantile'")

