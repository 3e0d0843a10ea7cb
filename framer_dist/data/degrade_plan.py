"""The host side of the degradation: Table 6's parameters, each sample's draws from its seed, and
the batch's plan (every small table derived from the draws, on the CPU).

:func:`plan_degradation` gives a :class:`DegradePlan`; :func:`~.degrade_run.run_plan` does the
pixel work from it on the batch's device (:mod:`.degrade` calls both; :mod:`.degrade_graph`
replays the device side from a CUDA graph).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from . import canvas as cv
from .jpeg import quant_tables
from .kernels import mixed_kernels, pulse_kernels, sinc_kernels
from .rng import KEY_MASK, POISSON_SALT
from .stream import splitmix64


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


def seed_list(seeds: list[int] | Tensor) -> list[int]:
    """The per-sample seeds as Python ints (a list or a tensor of them)."""
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
    seeds = seed_list(seeds)
    if len(seeds) != b:
        raise ValueError(f"degrade got {len(seeds)} seeds for a batch of {b}")
    return p, seeds


def params_from_config(scale: int, usm: bool) -> DegradeParams:
    """Table 6 defaults with the config's scale and USM switch."""
    return dataclasses.replace(DegradeParams(), scale=scale, usm=usm)
