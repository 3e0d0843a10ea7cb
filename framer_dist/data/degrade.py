"""The two-stage Real-ESRGAN degradation (FRAMER supplement, Table 6), batched in torch.

Only the parameter draws run on the CPU, from one ``numpy`` generator per sample seeded by that
sample's seed: kernels, noise, resizing and JPEG then run on the batch's device for the whole
batch at once (the noise itself comes from a device generator seeded from the sample's draws).
A sample's output depends only on its image and its seed, never on its batch-mates, so a batch
is reproducible bit for bit on the same device type and a resumed run sees the same pairs.

Pipeline per sample (HR ``[3, H, W]`` in [0, 1], H and W divisible by ``scale``):

1. USM-sharpen the HR target (optional); the degradation starts from the sharpened HR.
2. Stage 1: blur (21x21: one of six kernel types, or a sinc with p=0.1) -> random resize
   (up/down/keep, area/bilinear/bicubic) -> Gaussian (p=0.5, colour or gray) or Poisson noise
   -> JPEG (q in [30, 95]).
3. Stage 2: blur (p=0.8; 11x11) -> resize to (H/scale * s2) -> noise -> in random order either
   [resize to H/scale + final sinc (p=0.8)] then JPEG, or JPEG then [resize + final sinc].
4. LR rounded to 8 bits; LR bicubic-upsampled back to H x W (the DiT4SR conditioning input).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import canvas as cv
from .jpeg import jpeg
from .rng import hash_normal
from .stream import splitmix64
from .kernels import gaussian_kernel_1d, mixed_kernels, pulse_kernels, sinc_kernels


@dataclass(frozen=True)
class StageParams:
    """Table 6 settings of one degradation stage."""

    kernel_size: int                      # padded kernel size (Table 6: 21, then 11)
    sigma: tuple[float, float]            # blur sigma range
    resize_range: tuple[float, float]     # down factors from [lo, 1), up factors from (1, hi]
    gauss_sigma: tuple[float, float]      # Gaussian noise sigma range (8-bit units)
    poisson_scale: tuple[float, float]
    blur_prob: float = 1.0
    sinc_prob: float = 0.1
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    betag: tuple[float, float] = (0.5, 4.0)
    betap: tuple[float, float] = (1.0, 2.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)   # up, down, keep
    gauss_prob: float = 0.5               # else Poisson
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[int, int] = (30, 95)


@dataclass(frozen=True)
class DegradeParams:
    """Everything the degradation draws from; the defaults are Table 6 (and Real-ESRGAN where the
    table is silent: kernel-type probabilities, beta ranges, resize/gray-noise probabilities,
    second-blur probability 0.8, sinc cut-offs)."""

    stage1: StageParams = field(default_factory=lambda: StageParams(
        kernel_size=21, sigma=(0.2, 3.0), resize_range=(0.15, 1.5),
        gauss_sigma=(1.0, 30.0), poisson_scale=(0.05, 3.0)))
    stage2: StageParams = field(default_factory=lambda: StageParams(
        kernel_size=11, sigma=(0.2, 1.5), resize_range=(0.3, 1.2),
        gauss_sigma=(1.0, 25.0), poisson_scale=(0.05, 2.5), blur_prob=0.8))
    final_sinc_prob: float = 0.8
    final_kernel_size: int = 21
    scale: int = 4
    usm: bool = True
    usm_radius: int = 50                  # BasicSR USMSharp: 51x51 Gaussian, sigma from OpenCV rule
    usm_weight: float = 0.5
    usm_threshold: float = 10.0


def _odd_sizes(k: int) -> list[int]:
    return list(range(7, k + 1, 2)) if k >= 7 else [k]


@functools.lru_cache(maxsize=64)
def _cumulative(p: tuple[float, ...]) -> tuple[float, ...]:
    total = sum(p)
    return tuple(float(x) / total for x in np.cumsum(p))


class _Draws:
    """A sample's random numbers: one SeedSequence hash gives every uniform at once (about 20x
    faster than calling a numpy Generator per parameter), consumed in a fixed order."""

    def __init__(self, seed: int, n: int = 64) -> None:
        # hash the seed once, then a SplitMix64 stream (cheap: draws stay off the critical path)
        key = int(splitmix64(int(seed) ^ 0x5EED5EED, 1)[0])
        words = splitmix64(key, n)
        self.words = words
        self.u = ((words >> np.uint64(11)).astype(np.float64) * (1.0 / 2 ** 53)).tolist()  # [0, 1)
        self.i = 0

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        v = self.u[self.i]
        self.i += 1
        return lo + (hi - lo) * v

    def choice(self, n: int, p: tuple[float, ...] | None = None) -> int:
        u = self.uniform()
        if p is None:
            return min(int(u * n), n - 1)
        return min(bisect.bisect_right(_cumulative(tuple(p)), u), n - 1)

    def integer(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] inclusive."""
        return lo + self.choice(hi - lo + 1)

    def seed(self) -> int:
        v = int(self.words[self.i] >> np.uint64(1))
        self.i += 1
        return v


def _blur_draw(r: _Draws, st: StageParams) -> dict:
    """Draw one stage's blur kernel parameters (all fields always drawn: stable draw order)."""
    sizes = _odd_sizes(st.kernel_size)
    size = sizes[r.choice(len(sizes))]
    apply = r.uniform() < st.blur_prob
    sinc = r.uniform() < st.sinc_prob
    omega = r.uniform(math.pi / 3, math.pi) if size < 13 else r.uniform(math.pi / 5, math.pi)
    kind = r.choice(6, st.kernel_probs)
    sx = r.uniform(*st.sigma)
    sy = r.uniform(*st.sigma)
    theta = r.uniform(-math.pi, math.pi)
    lo_half = r.uniform() < 0.5
    bg = r.uniform(st.betag[0], 1.0) if lo_half else r.uniform(1.0, st.betag[1])
    bp = r.uniform(st.betap[0], 1.0) if lo_half else r.uniform(1.0, st.betap[1])
    return dict(size=size, apply=apply, sinc=sinc, omega=omega, kind=kind, sigma_x=sx,
                sigma_y=sy if kind % 2 else sx, theta=theta if kind % 2 else 0.0,
                beta=bg if kind in (2, 3) else (bp if kind in (4, 5) else 1.0))


def _resize_draw(r: _Draws, st: StageParams) -> dict:
    updown = r.choice(3, st.resize_probs)
    up = r.uniform(1.0, st.resize_range[1])
    down = r.uniform(st.resize_range[0], 1.0)
    return dict(factor=(up, down, 1.0)[updown], mode=r.choice(3))


def _noise_draw(r: _Draws, st: StageParams) -> dict:
    return dict(gaussian=r.uniform() < st.gauss_prob, sigma=r.uniform(*st.gauss_sigma),
                poisson_scale=r.uniform(*st.poisson_scale), gray=r.uniform() < st.gray_noise_prob,
                seed=r.seed())


def sample_params(seed: int, p: DegradeParams) -> dict:
    """All random choices of one sample's degradation, from its seed (CPU, cheap, deterministic)."""
    r = _Draws(seed)
    out: dict = {}
    for name, st in (("stage1", p.stage1), ("stage2", p.stage2)):
        out[name] = dict(blur=_blur_draw(r, st), resize=_resize_draw(r, st), noise=_noise_draw(r, st),
                         jpeg=r.integer(*st.jpeg_range))
    sizes = _odd_sizes(p.final_kernel_size)
    out["final"] = dict(sinc=r.uniform() < p.final_sinc_prob, size=sizes[r.choice(len(sizes))],
                        omega=r.uniform(math.pi / 3, math.pi), resize_mode=r.choice(3),
                        jpeg_first=r.uniform() < 0.5, jpeg=r.integer(*p.stage2.jpeg_range))
    return out


# ----------------------------------------------------------------------------------------------
# batched application


def _t(values: list, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def stage_kernels(draws: list[dict], k: int, device: torch.device) -> Tensor:
    """Blur kernels ``[B, k, k]`` of one stage (mixed or sinc per sample; pulse if not applied).

    Built on the CPU (a few KB from the draws) and sent to ``device`` in one copy."""
    out = _stage_kernels_cpu(draws, k)
    return out.to(device, non_blocking=True)


def _stage_kernels_cpu(draws: list[dict], k: int) -> Tensor:
    device = torch.device("cpu")
    size = _t([d["size"] for d in draws], device, torch.long)
    mixed = mixed_kernels(_t([d["kind"] for d in draws], device, torch.long), size,
                          _t([d["sigma_x"] for d in draws], device),
                          _t([d["sigma_y"] for d in draws], device),
                          _t([d["theta"] for d in draws], device),
                          _t([d["beta"] for d in draws], device), k)
    sinc = sinc_kernels(_t([d["omega"] for d in draws], device), size, k)
    use_sinc = _t([d["sinc"] for d in draws], device, torch.bool)[:, None, None]
    apply = _t([d["apply"] for d in draws], device, torch.bool)[:, None, None]
    kern = torch.where(use_sinc, sinc, mixed)
    return torch.where(apply, kern, pulse_kernels(len(draws), k, device))


def _add_noise(x: Tensor, h: Tensor, w: Tensor, draws: list[dict], hs: list[int], ws: list[int]) -> Tensor:
    """Gaussian or Poisson noise per sample, a function of the sample's own size and draws only
    (not of the canvas or batch): Gaussian from a counter-based hash (:mod:`.rng`), Poisson from a
    device generator seeded by the sample's draw."""
    dev = x.device
    noise = torch.zeros_like(x)
    q = torch.clamp(torch.round(x * 255.0), 0, 255)
    gray = (0.299 * q[:, 0] + 0.587 * q[:, 1] + 0.114 * q[:, 2]).round().clamp(0, 255)
    b = x.shape[0]
    vals_rgb = vals_gray = None
    if not all(d["gaussian"] for d in draws):
        # Poisson needs the number of distinct 8-bit values per sample (Real-ESRGAN's rule):
        # mark the values present (plain stores of 1: deterministic, no atomics); pixels outside
        # a sample's valid region go to the spare slot 256
        valid = cv.valid_mask(h, w, x.shape[2], x.shape[3], dev)
        vals = []
        for plane in (q, gray[:, None]):
            idx = torch.where(valid, plane.long(), torch.full_like(plane, 256, dtype=torch.long))
            present = torch.zeros(b, 257, device=dev).scatter_(1, idx.reshape(b, -1), 1.0)
            count = present[:, :256].sum(1).clamp_min(1).to(torch.float64)
            vals.append((2.0 ** torch.ceil(torch.log2(count))).to(x.dtype))
        vals_rgb, vals_gray = vals
    if any(d["gaussian"] for d in draws):
        # all Gaussian noise of the batch at once (counter-based: batch-independent)
        sig = torch.tensor([d["sigma"] / 255.0 if d["gaussian"] else 0.0 for d in draws],
                           dtype=x.dtype).to(dev, non_blocking=True).view(b, 1, 1, 1)
        noise = hash_normal([d["seed"] for d in draws], hs, ws, [d["gray"] for d in draws], 3,
                            x.shape[2], x.shape[3], dev) * sig
    pois = [i for i, d in enumerate(draws) if not d["gaussian"]]
    if pois:
        # rates for the whole batch in a few ops; only the draw itself is per sample (its own
        # generator and size), then one batched op turns counts into noise
        mono = torch.tensor([d["gray"] for d in draws]).to(dev, non_blocking=True).view(b, 1, 1, 1)
        v = torch.where(mono, vals_gray.view(b, 1, 1, 1), vals_rgb.view(b, 1, 1, 1))
        img = torch.where(mono, gray[:, None].expand_as(q), q) / 255.0
        rate = img * v
        counts = torch.zeros_like(x)
        for i in pois:
            d, hh, ww = draws[i], hs[i], ws[i]
            g = torch.Generator(device=dev)
            g.manual_seed(d["seed"])
            c = 1 if d["gray"] else 3
            counts[i, :c, :hh, :ww] = torch.poisson(rate[i, :c, :hh, :ww], generator=g)
        counts = torch.where(mono, counts[:, :1].expand_as(counts), counts)
        scale = torch.tensor([0.0 if d["gaussian"] else d["poisson_scale"] for d in draws],
                             dtype=x.dtype).to(dev, non_blocking=True).view(b, 1, 1, 1)
        is_p = scale > 0
        noise = torch.where(is_p, (counts / v - img) * scale, noise)
    return (x + noise).clamp(0, 1)


def _stage(x: Tensor, h: Tensor, w: Tensor, draws: list[dict], name: str, k: int,
           target: tuple[list[int], list[int]]) -> tuple[Tensor, Tensor, Tensor]:
    dev = x.device
    x = cv.filter2d(x, h, w, stage_kernels([d[name]["blur"] for d in draws], k, dev))
    hs, ws = target
    cpu = torch.device("cpu")
    nh, nw = _t(hs, cpu, torch.long), _t(ws, cpu, torch.long)
    mode = _t([d[name]["resize"]["mode"] for d in draws], cpu, torch.long)
    x = cv.resize(x, h, w, nh, nw, mode, max(hs), max(ws), (min(hs), min(ws)))
    x = _add_noise(x, nh, nw, [d[name]["noise"] for d in draws], hs, ws)
    return x, nh, nw


@functools.lru_cache(maxsize=16)
def _blur_matrix(n: int, size: int, device: str) -> Tensor:
    """``[n, n]`` matrix of a 1-D Gaussian blur with reflect-101 borders (OpenCV's default), so
    a separable blur is two GEMMs ``T @ X @ T^T`` (much faster on GPUs than a 51-tap conv)."""
    g = gaussian_kernel_1d(size, 0.0).double()
    pad = size // 2
    src = cv.border_index(torch.tensor([n]), n, pad, "reflect")[0]      # [n + 2 pad]
    rows = torch.arange(n)[:, None]
    taps = torch.arange(size)[None, :]
    mat = torch.zeros(n, n, dtype=torch.float64)
    mat.index_put_((rows.expand(n, size), src[rows + taps]), g.expand(n, size), accumulate=True)
    return mat.float().to(device)


def usm_sharp(img: Tensor, p: DegradeParams) -> Tensor:
    """BasicSR's USMSharp on a uniform batch ``[B, 3, H, W]`` in [0, 1]."""
    size = p.usm_radius + 1 if p.usm_radius % 2 == 0 else p.usm_radius     # 50 -> 51, as BasicSR
    _, _, hh, ww = img.shape
    ty = _blur_matrix(hh, size, str(img.device)).to(img.dtype)
    tx = _blur_matrix(ww, size, str(img.device)).to(img.dtype)

    def blur(t: Tensor) -> Tensor:
        return torch.matmul(torch.matmul(ty, t), tx.T)

    residual = img - blur(img)
    mask = (residual.abs() * 255 > p.usm_threshold).to(img.dtype)
    soft = blur(mask)
    sharp = (img + p.usm_weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * img


@contextlib.contextmanager
def _full_fp32():
    """Exact fp32 for the pixel maths whatever the trainer set (TF32 matmuls/convs would change
    8-bit roundings and make a sample's pair depend on the device's algorithm choice)."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                        allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(prev)


def degrade(hr: Tensor, seeds: list[int] | Tensor, p: DegradeParams | None = None,
            batched: bool | None = None) -> dict[str, Tensor]:
    """Degrade a batch of HR images (see :func:`_degrade`).

    ``batched=None`` picks the faster path for the device: one batched call on accelerators, one
    call per image on the CPU (the padded canvas wastes FLOPs that only GPUs can spare). Both give
    bit-identical results on the CPU (tested)."""
    if batched is None:
        batched = hr.device.type != "cpu"
    if not batched and hr.shape[0] > 1:
        if isinstance(seeds, Tensor):
            seeds = seeds.tolist()
        return degrade_loop(hr, list(seeds), p)
    with _full_fp32():
        return _degrade(hr, seeds, p)


def _degrade(hr: Tensor, seeds: list[int] | Tensor, p: DegradeParams | None = None) -> dict[str, Tensor]:
    """Degrade a batch of HR images.

    Args:
        hr: ``[B, 3, H, W]`` float in [0, 1] on any device; H and W divisible by ``p.scale``.
        seeds: one integer per sample; equal seeds and images give equal outputs.
    Returns:
        ``hr``: the target (USM-sharpened if ``p.usm``) ``[B, 3, H, W]``;
        ``lr``: ``[B, 3, H/scale, W/scale]`` 8-bit-quantised LR;
        ``lr_up``: ``lr`` bicubic-upsampled to ``[B, 3, H, W]`` and clamped to [0, 1]. All in [0, 1].
    """
    p = p or DegradeParams()
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"degrade expects HR images [B, 3, H, W], got shape {tuple(hr.shape)}")
    b, _, H, W = hr.shape
    if H % p.scale or W % p.scale:
        raise ValueError(f"HR size {H}x{W} is not divisible by the scale {p.scale}")
    seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, Tensor) else seeds)]
    if len(seeds) != b:
        raise ValueError(f"degrade got {len(seeds)} seeds for a batch of {b}")
    dev = hr.device
    x = hr.float().clamp(0, 1)
    if p.usm:
        x = usm_sharp(x, p)
    target = x
    draws = [sample_params(s, p) for s in seeds]
    lh, lw = H // p.scale, W // p.scale
    cpu = torch.device("cpu")                   # sizes, qualities, modes: small, kept on the CPU
    h = torch.full((b,), H, dtype=torch.long)
    w = torch.full((b,), W, dtype=torch.long)

    f1 = [d["stage1"]["resize"]["factor"] for d in draws]
    t1 = ([max(1, int(H * f)) for f in f1], [max(1, int(W * f)) for f in f1])
    x, h, w = _stage(x, h, w, draws, "stage1", p.stage1.kernel_size, t1)
    x = jpeg(x, _t([d["stage1"]["jpeg"] for d in draws], cpu, torch.long), h, w)

    f2 = [d["stage2"]["resize"]["factor"] for d in draws]
    t2 = ([max(1, int(lh * f)) for f in f2], [max(1, int(lw * f)) for f in f2])
    x, h, w = _stage(x, h, w, draws, "stage2", p.stage2.kernel_size, t2)

    fin = [d["final"] for d in draws]
    k = p.final_kernel_size
    sinc = sinc_kernels(_t([f["omega"] for f in fin], cpu), _t([f["size"] for f in fin], cpu, torch.long), k)
    use = _t([f["sinc"] for f in fin], cpu, torch.bool)[:, None, None]
    fkern = torch.where(use, sinc, pulse_kernels(b, k, cpu)).to(dev, non_blocking=True)
    fmode = _t([f["resize_mode"] for f in fin], cpu, torch.long)
    fq = _t([f["jpeg"] for f in fin], cpu, torch.long)
    jpeg_first = _t([f["jpeg_first"] for f in fin], cpu, torch.bool)[:, None, None, None].to(dev)
    lh_t = torch.full((b,), lh, dtype=torch.long)
    lw_t = torch.full((b,), lw, dtype=torch.long)

    # both orders are computed for the whole batch and selected per sample: branch-free batching
    a = cv.resize(x, h, w, lh_t, lw_t, fmode, lh, lw, (lh, lw))
    a = cv.filter2d(a, lh_t, lw_t, fkern)
    a = jpeg(a.clamp(0, 1), fq)
    bb = jpeg(x.clamp(0, 1), fq, h, w)
    bb = cv.resize(bb, h, w, lh_t, lw_t, fmode, lh, lw, (lh, lw))
    bb = cv.filter2d(bb, lh_t, lw_t, fkern)
    lr = torch.where(jpeg_first, bb, a)
    lr = torch.clamp(torch.round(lr * 255.0), 0, 255) / 255.0
    lr_up = F.interpolate(lr, size=(H, W), mode="bicubic", align_corners=False).clamp(0, 1)
    return {"hr": target.to(hr.dtype), "lr": lr.to(hr.dtype), "lr_up": lr_up.to(hr.dtype)}


def degrade_loop(hr: Tensor, seeds: list[int], p: DegradeParams | None = None) -> dict[str, Tensor]:
    """The same degradation one image at a time (the benchmark's baseline; equal results)."""
    if len(seeds) != hr.shape[0]:
        raise ValueError(f"degrade got {len(seeds)} seeds for a batch of {hr.shape[0]}")
    outs = [degrade(hr[i:i + 1], [s], p, batched=True) for i, s in enumerate(seeds)]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def params_from_config(scale: int, usm: bool) -> DegradeParams:
    """Table 6 defaults with the config's scale and USM switch."""
    return dataclasses.replace(DegradeParams(), scale=scale, usm=usm)
