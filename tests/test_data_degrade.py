"""The Real-ESRGAN degradation: kernels, Table 6 ranges, determinism, sizes, torch JPEG."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from _host_traffic import HostTrafficRecorder

from framer_dist.data import canvas as cv
from framer_dist.data.degrade import DegradeParams, degrade, degrade_loop, sample_params, stage_kernels
from framer_dist.data.jpeg import jpeg
from framer_dist.data.kernels import KERNEL_TYPES, mixed_kernels, pulse_kernels, sinc_kernels

JPEG_PSNR_VS_PILLOW_DB = 40.0  # documented in docs/data.md; measured 46-48 dB on skimage photos


def _photo(h: int = 128, w: int = 160) -> np.ndarray:
    from skimage import data
    return data.astronaut()[100:100 + h, 150:150 + w].copy()


def test_every_kernel_type_sums_to_one_with_documented_shape():
    b = len(KERNEL_TYPES)
    for k in (21, 11):
        kind = torch.arange(b)
        size = torch.full((b,), k)
        kern = mixed_kernels(kind, size, torch.full((b,), 1.5), torch.full((b,), 0.7),
                             torch.full((b,), 0.6), torch.full((b,), 1.7), k)
        assert kern.shape == (b, k, k)
        torch.testing.assert_close(kern.sum((1, 2)), torch.ones(b))
        assert (kern >= 0).all()
        # aniso types are rotated ellipses: not symmetric under transposition; iso ones are
        for t in range(b):
            sym = torch.allclose(kern[t], kern[t].T, atol=1e-6)
            assert sym == (t % 2 == 0), KERNEL_TYPES[t]
        sinc = sinc_kernels(torch.tensor([math.pi / 3, 2.0]), torch.tensor([k, 7]), k)
        assert sinc.shape == (2, k, k)
        torch.testing.assert_close(sinc.sum((1, 2)), torch.ones(2))
        # a smaller support is zero-padded to the stage size
        assert sinc[1, 0].abs().sum() == 0 and sinc[1, k // 2 - 3: k // 2 + 4, k // 2].abs().sum() > 0
        torch.testing.assert_close(pulse_kernels(3, k).sum((1, 2)), torch.ones(3))
    # kernels built from real draws too (both stages)
    p = DegradeParams()
    draws = [sample_params(s, p) for s in range(40)]
    for name, st in (("stage1", p.stage1), ("stage2", p.stage2)):
        kern = stage_kernels([d[name]["blur"] for d in draws], st.kernel_size, torch.device("cpu"))
        assert kern.shape == (40, st.kernel_size, st.kernel_size)
        torch.testing.assert_close(kern.sum((1, 2)), torch.ones(40))


def test_sampled_parameters_stay_in_table6_ranges():
    p = DegradeParams()
    kinds, sincs, gauss, finals = set(), 0, 0, 0
    n = 3000
    for s in range(n):
        d = sample_params(s, p)
        for name, st, sig in (("stage1", p.stage1, (0.2, 3.0)), ("stage2", p.stage2, (0.2, 1.5))):
            blur = d[name]["blur"]
            assert blur["size"] % 2 == 1 and 7 <= blur["size"] <= st.kernel_size
            assert sig[0] <= blur["sigma_x"] <= sig[1] and sig[0] <= blur["sigma_y"] <= sig[1]
            assert -math.pi <= blur["theta"] <= math.pi
            lo = math.pi / 3 if blur["size"] < 13 else math.pi / 5
            assert lo <= blur["omega"] <= math.pi
            if blur["kind"] in (2, 3):
                assert 0.5 <= blur["beta"] <= 4.0
            if blur["kind"] in (4, 5):
                assert 1.0 <= blur["beta"] <= 2.0
            f = d[name]["resize"]["factor"]
            assert st.resize_range[0] <= f <= st.resize_range[1]
            nz = d[name]["noise"]
            assert st.gauss_sigma[0] <= nz["sigma"] <= st.gauss_sigma[1]
            assert st.poisson_scale[0] <= nz["poisson_scale"] <= st.poisson_scale[1]
            assert 30 <= d[name]["jpeg"] <= 95
            kinds.add(blur["kind"])
            sincs += blur["sinc"]
            gauss += nz["gaussian"]
        assert 30 <= d["final"]["jpeg"] <= 95
        finals += d["final"]["sinc"]
    assert p.stage1.kernel_size == 21 and p.stage2.kernel_size == 11
    assert kinds == set(range(6))
    # probabilities (Table 6: sinc 0.1 per stage, Gaussian 0.5, final sinc 0.8), 2n draws each
    assert abs(sincs / (2 * n) - 0.1) < 0.02
    assert abs(gauss / (2 * n) - 0.5) < 0.03
    assert abs(finals / n - 0.8) < 0.03


def test_same_seed_same_lr_bit_for_bit_other_seed_differs():
    img = torch.from_numpy(_photo(48, 48)).permute(2, 0, 1).float() / 255
    hr = torch.stack([img, img.flip(-1), img])
    a = degrade(hr, [5, 6, 7], batched=True)
    b = degrade(hr, [5, 6, 7], batched=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = degrade(hr, [5, 6, 8], batched=True)
    assert torch.equal(c["lr"][:2], a["lr"][:2])            # batch-mates do not matter
    assert not torch.equal(c["lr"][2], a["lr"][2])
    # a sample's result does not depend on its batch either: per-image loop gives the same LR
    # (six seeds: Poisson and Gaussian, different canvas sizes, both final orders)
    hr6 = torch.cat([hr, hr.flip(-2)])
    seeds = [5, 6, 7, 8, 9, 10]
    assert torch.equal(degrade_loop(hr6, seeds)["lr"], degrade(hr6, seeds, batched=True)["lr"])


def test_sizes_512_to_128_to_512_for_mixed_batch():
    from skimage import data
    imgs = [data.coffee(), np.stack([data.camera()] * 3, -1)]   # different sizes and content
    hr = []
    for im in imgs:
        t = torch.from_numpy(im).permute(2, 0, 1).float()[None] / 255
        t = F.interpolate(t, size=(512, 512), mode="bilinear", antialias=True, align_corners=False)
        hr.append(t[0])
    out = degrade(torch.stack(hr), [1, 2])
    assert out["hr"].shape == (2, 3, 512, 512)
    assert out["lr"].shape == (2, 3, 128, 128)
    assert out["lr_up"].shape == (2, 3, 512, 512)
    for k in out:
        assert out[k].min() >= 0 and out[k].max() <= 1 and torch.isfinite(out[k]).all()
    # LR is 8-bit and degraded (not a copy of the downsampled HR)
    assert torch.equal(out["lr"], torch.round(out["lr"] * 255) / 255)
    down = F.interpolate(out["hr"], size=(128, 128), mode="area")
    assert (out["lr"] - down).abs().mean() > 1e-3


def test_non_square_and_bad_inputs():
    out = degrade(torch.rand(2, 3, 48, 64), [0, 1])
    assert out["lr"].shape == (2, 3, 12, 16) and out["lr_up"].shape == (2, 3, 48, 64)
    with pytest.raises(ValueError, match="divisible by the scale"):
        degrade(torch.rand(1, 3, 50, 64), [0])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        degrade(torch.rand(1, 1, 64, 64), [0])
    with pytest.raises(ValueError, match="seeds"):
        degrade(torch.rand(2, 3, 64, 64), [0])


def test_per_sample_resize_matches_torch_interpolate():
    x = torch.rand(3, 3, 40, 56)
    h = torch.tensor([40, 33, 40])
    w = torch.tensor([56, 56, 21])
    nh = torch.tensor([17, 50, 9])
    nw = torch.tensor([23, 70, 30])
    modes = ["area", "bilinear", "bicubic"]
    for code, m in enumerate(modes):
        out = cv.resize(x, h, w, nh, nw, torch.full((3,), code))
        for i in range(3):
            ref = F.interpolate(x[i:i + 1, :, :h[i], :w[i]], size=(int(nh[i]), int(nw[i])), mode=m,
                                **({} if m == "area" else {"align_corners": False}))
            torch.testing.assert_close(out[i:i + 1, :, :nh[i], :nw[i]], ref, atol=2e-5, rtol=0)


def test_canvas_filter_equals_single_image_reflect_filter():
    x = torch.rand(2, 3, 30, 30)
    h, w = torch.tensor([30, 17]), torch.tensor([25, 30])
    kern = mixed_kernels(torch.tensor([1, 3]), torch.tensor([21, 21]), torch.tensor([2.0, 1.0]),
                         torch.tensor([1.0, 2.5]), torch.tensor([0.3, -1.0]), torch.tensor([1, 2.0]), 21)
    out = cv.filter2d(x, h, w, kern)
    for i in range(2):
        xi = x[i:i + 1, :, :h[i], :w[i]]
        ref = F.conv2d(F.pad(xi, (10, 10, 10, 10), mode="reflect"), kern[i].expand(3, 1, 21, 21), groups=3)
        torch.testing.assert_close(out[i:i + 1, :, :h[i], :w[i]], ref, atol=1e-5, rtol=0)


def test_fft_filter_of_full_images_equals_direct_reflect_filter():
    x = torch.rand(3, 3, 37, 52)
    kern = mixed_kernels(torch.tensor([1, 3, 4]), torch.tensor([21, 15, 21]), torch.tensor([2.0, 1.0, 3.0]),
                         torch.tensor([1.0, 2.5, 0.5]), torch.tensor([0.3, -1.0, 2.0]),
                         torch.tensor([1, 2.0, 1.5]), 21)
    full = (torch.full((3,), 37), torch.full((3,), 52))
    xp = cv.pad_canvas(x, *full, 10, "reflect")
    torch.testing.assert_close(cv.correlate_fft(xp, kern), cv.filter2d(x, *full, kern), atol=2e-6, rtol=0)
    # per-sample valid sizes on one canvas (the stage-2 blur), as the GPU path runs it
    h, w = torch.tensor([37, 20, 9]), torch.tensor([52, 33, 40])
    xp = cv.pad_canvas(x, h, w, 10, "reflect")
    fft, direct = cv.correlate_fft(xp, kern), cv.filter2d(x, h, w, kern)
    for i in range(3):
        torch.testing.assert_close(fft[i, :, :h[i], :w[i]], direct[i, :, :h[i], :w[i]], atol=2e-6, rtol=0)
    assert [cv._fft_size(n) for n in (532, 59, 1, 7)] == [540, 60, 1, 8]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_torch_jpeg_close_to_pillow_and_monotone_in_quality():
    img = _photo(120, 136)                     # not a multiple of 16: exercises MCU padding
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    prev = None
    for q in (30, 60, 95):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=q)
        pil = np.asarray(Image.open(buf).convert("RGB")) / 255.0
        ours = jpeg(x, torch.tensor([q]))[0].permute(1, 2, 0).numpy()
        assert _psnr(ours, pil) > JPEG_PSNR_VS_PILLOW_DB, q
        to_input = _psnr(ours, img / 255.0)
        if prev is not None:
            assert to_input > prev + 0.5, (q, to_input, prev)
        prev = to_input
    # batched with per-sample qualities = one by one
    xb = torch.cat([x, x.flip(-1)])
    both = jpeg(xb, torch.tensor([40, 90]))
    assert torch.equal(both[1:], jpeg(xb[1:], torch.tensor([90])))
    assert torch.equal(both[:1], jpeg(xb[:1], torch.tensor([40])))


def test_bench_tiny_mode(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_degrade", root / "bench" / "degrade.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    assert mod.main(["--tiny", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["batched_equals_loop"] is True and r["batch"] == 4 and r["resolution"] == 64
    assert r["batched_images_per_s"] > 0 and r["loop_images_per_s"] > 0


def test_usm_blur_equals_separable_reflect_convolution():
    from framer_dist.data.kernels import gaussian_kernel_1d

    x = torch.rand(2, 3, 40, 56)
    g = gaussian_kernel_1d(11, 0.0)
    ref = F.pad(x, (5, 5, 5, 5), mode="reflect")
    ref = F.conv2d(ref.reshape(6, 1, 50, 66), g.view(1, 1, 1, 11))
    ref = F.conv2d(ref, g.view(1, 1, 11, 1)).view(2, 3, 40, 56)
    from framer_dist.data.degrade import _blur_matrix
    ours = _blur_matrix(40, 11, "cpu") @ x @ _blur_matrix(56, 11, "cpu").T   # usm_sharp on CPU
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    ours = cv.correlate_fft(F.pad(x, (5, 5, 5, 5), mode="reflect"), (g[:, None] * g[None, :])[None])  # on GPUs
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_hash_normal_is_standard_normal_and_canvas_independent():
    from framer_dist.data.rng import hash_normal

    n = hash_normal([7, 8], [64, 40], [64, 50], [False, True], 3, 64, 64, torch.device("cpu"))
    a = n[0].flatten()
    assert abs(a.mean()) < 0.02 and abs(a.std() - 1) < 0.02
    assert abs(float(((a - a.mean()) ** 4).mean() / a.var() ** 2) - 3) < 0.15   # Gaussian kurtosis
    assert torch.equal(n[1, 0, :40, :50], n[1, 2, :40, :50])                       # gray: one plane
    assert not torch.equal(n[0, 0], n[0, 1])
    alone = hash_normal([8], [40], [50], [True], 3, 40, 50, torch.device("cpu"))
    assert torch.equal(alone[0], n[1, :, :40, :50])                                # canvas-independent
    other = hash_normal([9], [40], [50], [True], 3, 40, 50, torch.device("cpu"))
    assert not torch.equal(other, alone)


def _hr(b: int = 4, size: int = 48) -> torch.Tensor:
    img = torch.from_numpy(_photo(size, size)).permute(2, 0, 1).float() / 255
    return torch.stack([img, img.flip(-1), img.flip(-2), img.transpose(1, 2)][:b])


# seeds 0..7 cover both noise kinds in both stages, gray and colour, both final orders
_SEEDS = list(range(8))


def test_seeds_cover_every_branch():
    from framer_dist.data.degrade import plan_degradation

    t = plan_degradation(_SEEDS, DegradeParams(), (48, 48), static_canvas=False).tensors
    for n in ("n1", "n2"):
        assert 0 < int(t[n + "gauss"].sum()) < len(_SEEDS), n
    assert 0 < int(t["n1mono"].sum() + t["n2mono"].sum())
    assert 0 < int(t["jpeg_first"].sum()) < len(_SEEDS)


def test_static_canvas_equals_dynamic_canvas_bit_for_bit():
    """A sample's result does not depend on the canvas it was computed on (what the CUDA graph's
    static canvas relies on): static and dynamic plans give the same bits."""
    from framer_dist.data.degrade import _full_fp32, plan_degradation, run_plan

    hr = torch.cat([_hr(), _hr().flip(-1)])
    p = DegradeParams()
    dyn = plan_degradation(_SEEDS, p, (48, 48), static_canvas=False)
    sta = plan_degradation(_SEEDS, p, (48, 48), static_canvas=True)
    assert sta.canvas1 == (72, 72) and sta.canvas2 == (14, 14)        # 1.5 x 48, 1.2 x 12
    assert dyn.canvas1 <= sta.canvas1 and dyn.canvas2 <= sta.canvas2
    assert sta.tensors["r2y_idx"].shape[-1] >= dyn.tensors["r2y_idx"].shape[-1]
    with _full_fp32():
        a, b = run_plan(hr, dyn), run_plan(hr, sta)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_plan_does_no_host_reads_or_transfers(monkeypatch):
    from framer_dist.data.degrade import _full_fp32, plan_degradation, prepare_device, run_plan

    hr = torch.cat([_hr(), _hr().flip(-1)])
    p = DegradeParams()
    plan = plan_degradation(_SEEDS, p, (48, 48), static_canvas=True)
    prepare_device("cpu", p, (48, 48))
    ref = None
    with _full_fp32():
        ref = run_plan(hr, plan)
        # .tolist()/.numpy() do not go through the dispatcher: make them fail outright
        for meth in ("tolist", "numpy", "item"):
            monkeypatch.setattr(torch.Tensor, meth, lambda *a, **k: pytest.fail(f"host read {meth}"))
        rec = HostTrafficRecorder()
        with rec:
            out = run_plan(hr, plan)
    assert rec.bad == []
    for k in out:
        assert torch.equal(out[k], ref[k]), k
    # the recorder does see what it is meant to catch
    rec = HostTrafficRecorder()
    with rec:
        torch.ones(3).sum().__int__()
        torch.tensor([1.0, 2.0])
    assert "aten._local_scalar_dense" in rec.bad and any("lift" in b for b in rec.bad)


def _poisson_draws(lam_index: int, q: int, n: int, key: int) -> torch.Tensor:
    from framer_dist.data.rng import counter_hash, poisson_from_hash

    side = int(math.isqrt(n))
    one = torch.ones(1, dtype=torch.long)
    z = counter_hash(torch.tensor([key]), one * side, one * side, one * 0, 1, side, side)
    return poisson_from_hash(z, torch.tensor(lam_index), torch.tensor(q))[0, 0].flatten()


@pytest.mark.parametrize("vals_index,q", [(0, 0), (0, 77), (2, 255), (7, 75), (8, 200)])
def test_poisson_sampler_is_exact_poisson(vals_index, q):
    """rate = q / 255 * 2^vals_index: 0, 0.30, 4, 37.6, 200.8; 1e5 draws each."""
    lam = q / 255 * 2 ** vals_index
    n = 316 ** 2
    k = _poisson_draws(vals_index, q, n, key=1234 + q).double()
    mean, var = float(k.mean()), float(k.var())
    if lam == 0:
        assert (k == 0).all()
        return
    se_mean = math.sqrt(lam / n)
    se_var = math.sqrt((lam + 2 * lam ** 2) / n)      # Var of the sample variance for Poisson
    assert abs(mean - lam) < 5 * se_mean, (mean, lam)
    assert abs(var - lam) < 5 * se_var, (var, lam)
    # pmf: chi-square over the bins with expected count >= 20 (plus both tails pooled)
    ks = torch.arange(0, 512, dtype=torch.float64)
    pmf = torch.exp(ks * math.log(lam) - lam - torch.lgamma(ks + 1))
    counts = torch.bincount(k.long(), minlength=512)[:512].double()
    keep = pmf * n >= 20
    exp_in, obs_in = pmf[keep] * n, counts[keep]
    exp_out, obs_out = n - exp_in.sum(), n - obs_in.sum()
    chi2 = float(((obs_in - exp_in) ** 2 / exp_in).sum())
    dof = int(keep.sum())
    if exp_out >= 20:
        chi2 += float((obs_out - exp_out) ** 2 / exp_out)
        dof += 1
    # chi-square with dof - 1 degrees of freedom: mean dof-1, sd sqrt(2 (dof-1)); 6 sd margin
    assert chi2 < dof - 1 + 6 * math.sqrt(2 * max(dof - 1, 1)), (chi2, dof)


def test_poisson_sampler_is_deterministic_per_key():
    a = _poisson_draws(5, 180, 1024, key=7)
    assert torch.equal(a, _poisson_draws(5, 180, 1024, key=7))
    assert not torch.equal(a, _poisson_draws(5, 180, 1024, key=8))


def test_log2_ceil_index_is_exact():
    from framer_dist.data.rng import log2_ceil_index

    c = torch.arange(1, 257)
    expect = torch.tensor([math.ceil(math.log2(v)) for v in range(1, 257)])
    assert torch.equal(log2_ceil_index(c.float()), expect)


def test_poisson_search_equals_brute_force_inversion():
    """The one-search sampler returns exactly min{k : cdf[k] > u}, also for u on a CDF value."""
    from framer_dist.data.rng import U_BITS, _lsr, poisson_cdf_table, poisson_from_hash

    cdf = poisson_cdf_table("cpu")
    g = torch.Generator().manual_seed(0)
    vi = torch.randint(0, 9, (4000,), generator=g)
    q = torch.randint(0, 256, (4000,), generator=g)
    U = torch.randint(0, 2 ** U_BITS, (4000,), generator=g)
    # put a quarter of the uniforms exactly on (or just below) a CDF entry of their own row
    kk = torch.randint(0, 40, (1000,), generator=g)
    on = (cdf[vi[:1000], q[:1000], kk] * 2 ** U_BITS).floor().to(torch.int64).clamp_max(2 ** U_BITS - 1)
    U[:1000] = (on - (torch.arange(1000) % 2)).clamp_min(0)
    z = U << (64 - U_BITS)                                # the hash word whose top bits are U
    assert torch.equal(_lsr(z, 64 - U_BITS), U)
    got = poisson_from_hash(z, vi, q)
    u = U.double() / 2 ** U_BITS
    ref = (cdf[vi, q] <= u[:, None]).sum(1)
    assert torch.equal(got, ref)


def test_degrade_ignores_an_enclosing_autocast():
    hr = _hr(2)
    ref = degrade(hr, [3, 4], batched=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = degrade(hr, [3, 4], batched=True)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k


def test_graphed_degrader_refuses_bad_settings_and_cpu_tensors():
    from framer_dist.data.degrade_graph import GraphedDegrader
    with pytest.raises(ValueError, match="max_graphs must be >= 1"):
        GraphedDegrader(max_graphs=0)
    with pytest.raises(ValueError, match="needs a CUDA tensor, got device cpu"):
        GraphedDegrader()(torch.rand(1, 3, 16, 16), [0])
