"""The two-stage Real-ESRGAN degradation (FRAMER supplement, Table 6), batched in torch.

Only the parameter draws run on the CPU, from one ``numpy`` generator per sample seeded by that
sample's seed: kernels, noise, resizing and JPEG then run on the batch's device for the whole
batch at once (the noise itself is a counter hash of the sample's key and pixel position, :mod:`.rng`).
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
from .jpeg import _dct2, jpeg_with_tables, quant_tables
from .noise import add_noise
from .rng import KEY_MASK, POISSON_SALT, _normal_table, _poisson_search_table, poisson_noise_table
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
# planning (CPU): every draw and every small table derived from it, for the whole batch


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


@dataclass
class DegradePlan:
    """Everything a batch's degradation needs besides the HR pixels (see :func:`plan_degradation`).

    ``tensors`` holds per-sample tables (kernels, sizes, resize taps, JPEG tables, noise
    parameters), on the CPU until :meth:`to`; the rest are Python values fixed at planning time:
    canvas sizes and which noise kinds / final orders occur (all of them on a static canvas)."""

    p: DegradeParams
    hw: tuple[int, int]                   # HR size
    canvas1: tuple[int, int]              # canvas after the stage-1 resize
    canvas2: tuple[int, int]              # canvas after the stage-2 resize
    noise_kinds: tuple[tuple[bool, bool], tuple[bool, bool]]   # per stage: (Gaussian, Poisson) used
    orders: tuple[bool, bool]             # final step: (resize first, JPEG first) used
    tensors: dict[str, Tensor]

    def packed(self, pin: bool = False) -> tuple[dict[torch.dtype, Tensor],
                                                 list[tuple[str, torch.dtype, int, torch.Size]]]:
        """All tensors as one flat buffer per dtype (written straight into pinned memory with
        ``pin``, ready for an asynchronous copy) plus the layout to cut them out again."""
        groups: dict[torch.dtype, list[Tensor]] = {}
        layout = []
        offsets: dict[torch.dtype, int] = {}
        for name, t in self.tensors.items():
            off = offsets.get(t.dtype, 0)
            layout.append((name, t.dtype, off, t.shape))
            groups.setdefault(t.dtype, []).append(t.reshape(-1))
            offsets[t.dtype] = off + t.numel()
        return {d: torch.cat(ts, out=torch.empty(offsets[d], dtype=d, pin_memory=pin))
                for d, ts in groups.items()}, layout

    def with_buffers(self, buffers: dict[torch.dtype, Tensor],
                     layout: list[tuple[str, torch.dtype, int, torch.Size]]) -> "DegradePlan":
        """The same plan with its tensors as views into ``buffers`` (e.g. a CUDA graph's static
        input buffers: copying a new plan's packed buffers into them updates every view)."""
        views = {name: buffers[d][off:off + math.prod(shape)].view(shape) for name, d, off, shape in layout}
        return dataclasses.replace(self, tensors=views)

    def to(self, device: torch.device | str) -> "DegradePlan":
        """The plan on ``device`` in one copy per dtype (four), from pinned memory on CUDA."""
        device = torch.device(device)
        if all(t.device == device for t in self.tensors.values()):
            return self
        buffers, layout = self.packed(pin=device.type == "cuda")
        return self.with_buffers({d: b.to(device, non_blocking=True) for d, b in buffers.items()}, layout)


def _canvas_len(n: int, hi: float) -> int:
    """The largest size ``max(1, int(n * f))`` any factor f <= max(hi, 1) can give."""
    return max(1, int(n * max(hi, 1.0)))


def _min_len(n: int, lo: float) -> int:
    return max(1, int(n * min(lo, 1.0)))


def _targets(draws: list[dict], name: str, hw: tuple[int, int]) -> tuple[list[int], list[int]]:
    f = [d[name]["resize"]["factor"] for d in draws]
    return [max(1, int(hw[0] * v)) for v in f], [max(1, int(hw[1] * v)) for v in f]


def _taps_plan(prefix: str, n_in: tuple[list[int], list[int]], n_out: tuple[list[int], list[int]],
               mode: list[int], canvas_in: tuple[int, int], canvas_out: tuple[int, int],
               k: tuple[int | None, int | None]) -> dict[str, Tensor]:
    out = {}
    for axis, i in (("y", 0), ("x", 1)):
        idx, w = cv.resize_taps(n_in[i], n_out[i], mode, canvas_in[i], canvas_out[i], k[i])
        # int32 halves the plan's largest part (indices < canvas sizes); widened on the device
        out[f"{prefix}{axis}_idx"], out[f"{prefix}{axis}_w"] = idx.to(torch.int32), w
    return out


def _noise_plan(prefix: str, noise: list[dict]) -> dict[str, Tensor]:
    """Noise parameters; ``key`` is the hash key of the kind the sample uses (Poisson keys are
    salted), so one counter hash per pixel serves both kinds."""
    cpu = torch.device("cpu")
    key = [(d["seed"] ^ (0 if d["gaussian"] else POISSON_SALT)) & KEY_MASK for d in noise]
    return {f"{prefix}gauss": _t([d["gaussian"] for d in noise], cpu, torch.bool),
            f"{prefix}sigma": _t([d["sigma"] / 255.0 for d in noise], cpu),
            f"{prefix}scale": _t([d["poisson_scale"] for d in noise], cpu),
            f"{prefix}mono": _t([int(d["gray"]) for d in noise], cpu, torch.long),
            f"{prefix}key": _t(key, cpu, torch.long)}


def _jpeg_plan(prefix: str, quality: list[int]) -> dict[str, Tensor]:
    luma, chroma = quant_tables(torch.tensor(quality))
    return {f"{prefix}luma": luma, f"{prefix}chroma": chroma}


def _kinds(noise: list[dict], static: bool) -> tuple[bool, bool]:
    if static:
        return True, True
    return any(d["gaussian"] for d in noise), not all(d["gaussian"] for d in noise)


def plan_degradation(seeds: list[int], p: DegradeParams, hw: tuple[int, int],
                     static_canvas: bool) -> DegradePlan:
    """The host side of a batch's degradation: draws and every table derived from them (CPU).

    ``static_canvas=True`` sizes the canvases and resize tap counts for the largest draw the
    ranges allow, so every batch of the same (B, H, W, p) has the same tensor shapes (what a CUDA
    graph needs); ``False`` uses the batch's largest (less padding: the CPU and per-image path).
    A sample's result is the same either way (tested bit for bit on the CPU)."""
    H, W = hw
    b = len(seeds)
    draws = [sample_params(s, p) for s in seeds]
    lhw = (H // p.scale, W // p.scale)
    cpu = torch.device("cpu")
    t: dict[str, Tensor] = {"h0": _t([H] * b, cpu, torch.long), "w0": _t([W] * b, cpu, torch.long),
                            "hl": _t([lhw[0]] * b, cpu, torch.long), "wl": _t([lhw[1]] * b, cpu, torch.long)}
    # stage 1: HR size -> its own random size
    s1 = _targets(draws, "stage1", hw)
    if static_canvas:
        c1 = (_canvas_len(H, p.stage1.resize_range[1]), _canvas_len(W, p.stage1.resize_range[1]))
        k1 = tuple(cv.max_taps(n, _min_len(n, p.stage1.resize_range[0])) for n in hw)
    else:
        c1, k1 = (max(s1[0]), max(s1[1])), (None, None)
    t["k1"] = _stage_kernels_cpu([d["stage1"]["blur"] for d in draws], p.stage1.kernel_size)
    t.update(_taps_plan("r1", ([H] * b, [W] * b), s1, [d["stage1"]["resize"]["mode"] for d in draws],
                        hw, c1, k1))
    t["h1"], t["w1"] = _t(s1[0], cpu, torch.long), _t(s1[1], cpu, torch.long)
    t.update(_noise_plan("n1", [d["stage1"]["noise"] for d in draws]))
    t.update(_jpeg_plan("q1", [d["stage1"]["jpeg"] for d in draws]))
    # stage 2: -> (H / scale) * its own factor
    s2 = _targets(draws, "stage2", lhw)
    if static_canvas:
        c2 = (_canvas_len(lhw[0], p.stage2.resize_range[1]), _canvas_len(lhw[1], p.stage2.resize_range[1]))
        k2 = tuple(cv.max_taps(c1[i], _min_len(lhw[i], p.stage2.resize_range[0])) for i in range(2))
        kf = tuple(cv.max_taps(c2[i], lhw[i]) for i in range(2))
    else:
        c2, k2, kf = (max(s2[0]), max(s2[1])), (None, None), (None, None)
    t["k2"] = _stage_kernels_cpu([d["stage2"]["blur"] for d in draws], p.stage2.kernel_size)
    t.update(_taps_plan("r2", s1, s2, [d["stage2"]["resize"]["mode"] for d in draws], c1, c2, k2))
    t["h2"], t["w2"] = _t(s2[0], cpu, torch.long), _t(s2[1], cpu, torch.long)
    t.update(_noise_plan("n2", [d["stage2"]["noise"] for d in draws]))
    # final: resize to H / scale (+ sinc) and JPEG, in each sample's order
    fin = [d["final"] for d in draws]
    k = p.final_kernel_size
    sinc = sinc_kernels(_t([f["omega"] for f in fin], cpu), _t([f["size"] for f in fin], cpu, torch.long), k)
    t["kf"] = torch.where(_t([f["sinc"] for f in fin], cpu, torch.bool)[:, None, None], sinc,
                          pulse_kernels(b, k, cpu))
    t.update(_taps_plan("rf", s2, ([lhw[0]] * b, [lhw[1]] * b), [f["resize_mode"] for f in fin],
                        c2, lhw, kf))
    t.update(_jpeg_plan("qf", [f["jpeg"] for f in fin]))
    t["jpeg_first"] = _t([f["jpeg_first"] for f in fin], cpu, torch.bool)
    first = [f["jpeg_first"] for f in fin]
    orders = (True, True) if static_canvas else (not all(first), any(first))
    kinds = tuple(_kinds([d[n]["noise"] for d in draws], static_canvas) for n in ("stage1", "stage2"))
    return DegradePlan(p=p, hw=hw, canvas1=c1, canvas2=c2, noise_kinds=kinds, orders=orders, tensors=t)


# ----------------------------------------------------------------------------------------------
# execution (device only: no host reads, no host-to-device copies, no per-sample Python branches)


def _taps(t: dict[str, Tensor], prefix: str) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    return (t[prefix + "y_idx"], t[prefix + "y_w"]), (t[prefix + "x_idx"], t[prefix + "x_w"])


def _run_stage(x: Tensor, t: dict[str, Tensor], s: str, h: Tensor, w: Tensor,
               kinds: tuple[bool, bool]) -> Tensor:
    """Blur at the current sizes ``h, w``, resize to the stage's sizes, add noise."""
    x = cv.filter2d(x, h, w, t["k" + s])
    x = cv.resize_with_taps(x, *_taps(t, "r" + s))
    return add_noise(x, t["h" + s], t["w" + s], t, "n" + s, kinds)


def _run_final(x: Tensor, t: dict[str, Tensor], orders: tuple[bool, bool]) -> Tensor:
    """Resize to the LR size + final sinc, and JPEG, in each sample's order: each order the plan
    uses is computed for the whole batch and selected per sample (branch-free batching)."""
    hl, wl, h2, w2 = t["hl"], t["wl"], t["h2"], t["w2"]
    taps = _taps(t, "rf")
    outs = []
    if orders[0]:
        a = cv.filter2d(cv.resize_with_taps(x, *taps), hl, wl, t["kf"])
        outs.append(jpeg_with_tables(a.clamp(0, 1), t["qfluma"], t["qfchroma"], hl, wl))
    if orders[1]:
        bb = jpeg_with_tables(x.clamp(0, 1), t["qfluma"], t["qfchroma"], h2, w2)
        outs.append(cv.filter2d(cv.resize_with_taps(bb, *taps), hl, wl, t["kf"]))
    if len(outs) == 1:
        return outs[0]
    return torch.where(t["jpeg_first"].view(-1, 1, 1, 1), outs[1], outs[0])


def run_plan(hr: Tensor, plan: DegradePlan) -> dict[str, Tensor]:
    """The device side of :func:`_degrade`: pixel work only, with the plan's tensors on ``hr``'s
    device. No host reads, host-to-device copies or per-sample Python branches (capturable in a
    CUDA graph; tested with a dispatch mode that records such ops)."""
    p, t = plan.p, plan.tensors
    x = hr.float().clamp(0, 1)
    if p.usm:
        x = usm_sharp(x, p)
    target = x
    x = _run_stage(x, t, "1", t["h0"], t["w0"], plan.noise_kinds[0])
    x = jpeg_with_tables(x, t["q1luma"], t["q1chroma"], t["h1"], t["w1"])
    x = _run_stage(x, t, "2", t["h1"], t["w1"], plan.noise_kinds[1])
    lr = _run_final(x, t, plan.orders)
    lr = torch.clamp(torch.round(lr * 255.0), 0, 255) / 255.0
    lr_up = F.interpolate(lr, size=tuple(hr.shape[2:]), mode="bicubic", align_corners=False).clamp(0, 1)
    return {"hr": target.to(hr.dtype), "lr": lr.to(hr.dtype), "lr_up": lr_up.to(hr.dtype)}


def prepare_device(device: torch.device | str, p: DegradeParams, hw: tuple[int, int]) -> None:
    """Build the cached device tables (DCT, USM kernel, normal and Poisson tables) now, so
    :func:`run_plan` only reads them (required before a CUDA graph capture)."""
    dev = str(torch.device(device))
    _dct2(dev)
    _normal_table(dev)
    _poisson_search_table(dev)
    poisson_noise_table(dev)
    if p.usm and torch.device(device).type == "cpu":
        for n in hw:
            _blur_matrix(n, _usm_size(p), dev)
    elif p.usm:
        _usm_kernel(_usm_size(p), dev)


@functools.lru_cache(maxsize=16)
def _blur_matrix(n: int, size: int, device: str) -> Tensor:
    """``[n, n]`` matrix of a 1-D Gaussian blur with reflect-101 borders (OpenCV's default), so
    a separable blur is two GEMMs ``T @ X @ T^T`` (much faster on GPUs than a 51-tap conv)."""
    g = gaussian_kernel_1d(size, 0.0).double()
    pad = size // 2
    src = cv.border_index(torch.full((1,), n), n, pad, "reflect")[0]      # [n + 2 pad]
    rows = torch.arange(n)[:, None]
    taps = torch.arange(size)[None, :]
    mat = torch.zeros(n, n, dtype=torch.float64)
    mat.index_put_((rows.expand(n, size), src[rows + taps]), g.expand(n, size), accumulate=True)
    return mat.float().to(device)


@functools.lru_cache(maxsize=8)
def _usm_kernel(size: int, device: str) -> Tensor:
    """``[1, size, size]``: the separable Gaussian of USM (OpenCV's sigma rule from the size), as
    one 2-D kernel for the FFT filter (reflect-101 borders, OpenCV's default)."""
    g = gaussian_kernel_1d(size, 0.0).double()
    return (g[:, None] * g[None, :]).float()[None].to(device)


def _usm_size(p: DegradeParams) -> int:
    return p.usm_radius + 1 if p.usm_radius % 2 == 0 else p.usm_radius     # 50 -> 51, as BasicSR


def usm_sharp(img: Tensor, p: DegradeParams) -> Tensor:
    """BasicSR's USMSharp on a uniform batch ``[B, 3, H, W]`` in [0, 1]."""
    size = _usm_size(p)
    dev = str(img.device)
    if img.device.type == "cpu":  # two GEMMs: exact and batch-independent on the CPU
        ty, tx = _blur_matrix(img.shape[2], size, dev), _blur_matrix(img.shape[3], size, dev)

        def blur(t: Tensor) -> Tensor:
            return torch.matmul(torch.matmul(ty, t), tx.T)
    else:                         # FFT on GPUs: ~3x cheaper than the dense GEMMs at 512 px
        kernel = _usm_kernel(size, dev).to(img.dtype)
        full = (torch.full((img.shape[0],), img.shape[2], device=img.device),
                torch.full((img.shape[0],), img.shape[3], device=img.device))

        def blur(t: Tensor) -> Tensor:
            return cv.filter2d(t, *full, kernel)

    residual = img - blur(img)
    mask = (residual.abs() * 255 > p.usm_threshold).to(img.dtype)
    soft = blur(mask)
    sharp = (img + p.usm_weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * img


@contextlib.contextmanager
def _full_fp32():
    """Exact fp32 for the pixel maths whatever the trainer set (TF32 matmuls/convs or an enclosing
    autocast would change 8-bit roundings and make a sample's pair depend on the device's algorithm
    choice, and a graph captured under them would bake that in)."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.backends.cudnn.flags(enabled=True, benchmark=False,
                                                           deterministic=True, allow_tf32=False))
            for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(dev, enabled=False))
            yield
    finally:
        torch.set_float32_matmul_precision(prev)


def degrade(hr: Tensor, seeds: list[int] | Tensor, p: DegradeParams | None = None,
            batched: bool | None = None, graph: bool | None = None) -> dict[str, Tensor]:
    """Degrade a batch of HR images (see :func:`_degrade`).

    ``batched=None`` picks the faster path for the device: one batched call on accelerators, one
    call per image on the CPU (the padded canvas wastes FLOPs that only GPUs can spare). Both give
    bit-identical results on the CPU (tested). ``graph`` (default: batched on CUDA) replays a
    cached CUDA graph of the batched call (:class:`~.degrade_graph.GraphedDegrader`); its outputs
    equal the eager batched call's on the same device."""
    if batched is None:
        batched = hr.device.type != "cpu"
    if not batched and hr.shape[0] > 1:
        return degrade_loop(hr, _seed_list(seeds), p)
    if graph is None:
        graph = batched and hr.device.type == "cuda"
    if graph:
        from .degrade_graph import default_degrader
        return default_degrader()(hr, seeds, p)
    with _full_fp32():
        return _degrade(hr, seeds, p)


def _seed_list(seeds: list[int] | Tensor) -> list[int]:
    return [int(s) for s in (seeds.tolist() if isinstance(seeds, Tensor) else seeds)]


def check_inputs(hr: Tensor, seeds: list[int] | Tensor,
                 p: DegradeParams | None) -> tuple[DegradeParams, list[int]]:
    """Validate a degradation call; returns the parameters (default Table 6) and the seed list."""
    p = p or DegradeParams()
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"degrade expects HR images [B, 3, H, W], got shape {tuple(hr.shape)}")
    b, _, H, W = hr.shape
    if H % p.scale or W % p.scale:
        raise ValueError(f"HR size {H}x{W} is not divisible by the scale {p.scale}")
    seeds = _seed_list(seeds)
    if len(seeds) != b:
        raise ValueError(f"degrade got {len(seeds)} seeds for a batch of {b}")
    return p, seeds


def _degrade(hr: Tensor, seeds: list[int] | Tensor, p: DegradeParams | None = None,
             static_canvas: bool | None = None) -> dict[str, Tensor]:
    """Degrade a batch of HR images: :func:`plan_degradation` on the CPU, then :func:`run_plan`.

    Args:
        hr: ``[B, 3, H, W]`` float in [0, 1] on any device; H and W divisible by ``p.scale``.
        seeds: one integer per sample; equal seeds and images give equal outputs.
        static_canvas: see :func:`plan_degradation`; default: static on CUDA (so the eager and
            the graphed path run the same shapes and give the same bits), dynamic elsewhere.
    Returns:
        ``hr``: the target (USM-sharpened if ``p.usm``) ``[B, 3, H, W]``;
        ``lr``: ``[B, 3, H/scale, W/scale]`` 8-bit-quantised LR;
        ``lr_up``: ``lr`` bicubic-upsampled to ``[B, 3, H, W]`` and clamped to [0, 1]. All in [0, 1].
    """
    p, seeds = check_inputs(hr, seeds, p)
    if static_canvas is None:
        static_canvas = hr.device.type == "cuda"
    plan = plan_degradation(seeds, p, tuple(hr.shape[2:]), static_canvas).to(hr.device)
    prepare_device(hr.device, p, tuple(hr.shape[2:]))
    return run_plan(hr, plan)


def degrade_loop(hr: Tensor, seeds: list[int], p: DegradeParams | None = None) -> dict[str, Tensor]:
    """The same degradation one image at a time, eager, each on its own (dynamic) canvas (the
    benchmark's baseline; equal results on the CPU)."""
    if len(seeds) != hr.shape[0]:
        raise ValueError(f"degrade got {len(seeds)} seeds for a batch of {hr.shape[0]}")
    with _full_fp32():
        outs = [_degrade(hr[i:i + 1], [s], p, static_canvas=False) for i, s in enumerate(seeds)]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def params_from_config(scale: int, usm: bool) -> DegradeParams:
    """Table 6 defaults with the config's scale and USM switch."""
    return dataclasses.replace(DegradeParams(), scale=scale, usm=usm)
