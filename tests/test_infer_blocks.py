"""Inference building blocks: sigma schedule, Euler sampler, CFG, tiling, colour fixes."""

from __future__ import annotations

import pytest
import torch

from framer_dist.infer.colorfix import (adain_color_fix, channel_mean_std, color_fix,
                                        wavelet_color_fix, wavelet_decompose)
from framer_dist.models.dit4sr.sampler import euler_sample, flow_sigmas, guided_denoiser
from framer_dist.infer.tiling import (gaussian_weight, num_tiles, seam_score, tile_borders,
                                      tile_starts, tiled_denoiser)


def test_sigma_schedule_is_sd3_flow_match():
    s = flow_sigmas(40, shift=3.0)
    assert s.shape == (41,)
    assert s[0].item() == pytest.approx(1.0)
    assert s[-1].item() == 0.0
    assert bool((s[1:] < s[:-1]).all())
    # shift 3 pushes sigmas up: the midpoint of the unshifted schedule maps above it
    u = flow_sigmas(40, shift=1.0)
    assert bool((s[1:-1] > u[1:-1]).all())
    with pytest.raises(ValueError, match="steps"):
        flow_sigmas(0)


def test_euler_is_exact_on_a_straight_flow():
    # True velocity of the straight path x_t = (1-s) x0 + s eps is (x_t - x0)/s: Euler is exact.
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 6, 5, generator=g)
    eps = torch.randn(2, 4, 6, 5, generator=g)
    out = euler_sample(lambda x, s: (x - x0) / s, eps, flow_sigmas(7))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


class _ToyModel(torch.nn.Module):
    """A small text- and LR-dependent velocity model that records what it was called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, hidden_states, lr_latent, timestep, encoder_hidden_states, pooled_projections):
        self.calls.append((hidden_states.shape[0], lr_latent.clone()))
        e = encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]
        p = pooled_projections.mean(dim=1)[:, None, None, None]
        return hidden_states * e + lr_latent * p + timestep[:, None, None, None] / 1000


def test_cfg_guides_text_only_and_feeds_lr_to_both_branches():
    g = torch.Generator().manual_seed(1)
    z, lr = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    cond = (torch.randn(1, 5, 8, generator=g), torch.randn(1, 3, generator=g))
    uncond = (torch.randn(1, 5, 8, generator=g), torch.randn(1, 3, generator=g))
    model = _ToyModel()
    sigma = torch.tensor(0.7)
    v = guided_denoiser(model, cond, uncond, guidance=8.0)(z, lr, sigma)
    assert model.calls[0][0] == 4                       # one batched call, 2B
    torch.testing.assert_close(model.calls[0][1], torch.cat([lr, lr]))
    from framer_dist.models.dit4sr.sampler import model_denoiser
    v_c = model_denoiser(model, *cond)(z, lr, sigma)
    v_u = model_denoiser(model, *uncond)(z, lr, sigma)
    torch.testing.assert_close(v, v_u + 8.0 * (v_c - v_u))
    # guidance 1 = the conditional branch alone
    torch.testing.assert_close(guided_denoiser(model, cond, uncond, 1.0)(z, lr, sigma), v_c)
    # unequal text lengths: two calls, same result formula
    uncond_short = (uncond[0][:, :3], uncond[1])
    v2 = guided_denoiser(model, cond, uncond_short, 8.0)(z, lr, sigma)
    v_u2 = model_denoiser(model, *uncond_short)(z, lr, sigma)
    torch.testing.assert_close(v2, v_u2 + 8.0 * (v_c - v_u2))


def test_stacked_tiles_keep_each_images_prompt():
    # two images with different prompts; tiles stacked 3 per call must see their own image's text
    g = torch.Generator().manual_seed(6)
    z, lr = torch.randn(2, 4, 12, 20, generator=g), torch.randn(2, 4, 12, 20, generator=g)
    cond = (torch.randn(2, 5, 8, generator=g), torch.randn(2, 3, generator=g))
    uncond = (torch.randn(1, 5, 8, generator=g), torch.randn(1, 3, generator=g))
    fn = guided_denoiser(_ToyModel(), cond, uncond, 3.0)
    one = tiled_denoiser(fn, 8, 4, multiple=2, tile_batch=1)(z, lr, torch.tensor(0.4))
    three = tiled_denoiser(fn, 8, 4, multiple=2, tile_batch=3)(z, lr, torch.tensor(0.4))
    torch.testing.assert_close(three, one)
    torch.testing.assert_close(tiled_denoiser(fn, 64, 4)(z, lr, torch.tensor(0.4)), fn(z, lr, torch.tensor(0.4)))


def test_tile_starts_cover_and_overlap():
    assert tile_starts(50, 64, 24) == [0]
    s = tile_starts(150, 64, 24)
    assert s[0] == 0 and s[-1] == 150 - 64
    assert all(b - a <= 64 - 24 for a, b in zip(s, s[1:]))
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(150, 16, 16)
    w = gaussian_weight(8, 12)
    assert w.shape == (8, 12) and float(w.min()) > 0


def test_tiling_is_exact_for_a_pointwise_denoiser_and_passthrough_for_one_tile():
    g = torch.Generator().manual_seed(2)
    z, lr = torch.randn(1, 4, 22, 38, generator=g), torch.randn(1, 4, 22, 38, generator=g)
    sigma = torch.tensor(0.5)
    calls = []

    def pointwise(a, b, s):
        calls.append(a.shape)
        return torch.tanh(a) * 2 + b * s

    want = pointwise(z, lr, sigma)
    calls.clear()
    got = tiled_denoiser(pointwise, tile=16, overlap=6, multiple=2, tile_batch=3)(z, lr, sigma)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)   # blending weights sum to 1
    assert num_tiles(22, 38, 16, 6) == 2 * 4     # rows start 0, 6; columns 0, 10, 20, 22
    assert [c[0] for c in calls] == [3, 3, 2]    # 8 tiles in batches of 3
    # one tile: the wrapped function is called once on the full latent, bit-identical
    small = z[..., :16, :14]
    calls.clear()
    out = tiled_denoiser(pointwise, tile=16, overlap=6, multiple=2)(small, lr[..., :16, :14], sigma)
    assert calls == [small.shape]
    assert torch.equal(out, pointwise(small, lr[..., :16, :14], sigma))
    with pytest.raises(ValueError, match="multiple"):
        tiled_denoiser(pointwise, tile=15, overlap=6, multiple=2)


def test_seam_score_sees_hard_seams_and_gaussian_blend_removes_them():
    # A position-dependent denoiser: each tile sees its own coordinate frame (like a DiT's
    # positional embedding), so tiles disagree where they overlap.
    def positional(a, b, s):
        h, w = a.shape[-2:]
        yy = torch.linspace(-1, 1, h)[:, None]
        xx = torch.linspace(-1, 1, w)[None, :]
        return a * 0 + torch.sin(3 * xx + 2 * yy) + 0.3 * b

    g = torch.Generator().manual_seed(3)
    z, lr = torch.randn(1, 4, 40, 72, generator=g), torch.randn(1, 4, 40, 72, generator=g)
    bh, bw = tile_borders(40, 16, 6), tile_borders(72, 16, 6)
    hard = tiled_denoiser(positional, 16, 6, blend="hard")(z, lr, torch.tensor(0.5)) - 0.3 * lr
    soft = tiled_denoiser(positional, 16, 6)(z, lr, torch.tensor(0.5)) - 0.3 * lr
    assert seam_score(hard, bh, bw) > 3.0
    assert seam_score(soft, bh, bw) < 1.5


def test_adain_matches_reference_channel_statistics():
    g = torch.Generator().manual_seed(4)
    img = torch.rand(2, 3, 20, 28, generator=g) * 0.5
    ref = torch.rand(2, 3, 20, 28, generator=g) * torch.tensor([0.2, 0.9, 0.5])[:, None, None] + 0.1
    out = adain_color_fix(img, ref)
    m_o, s_o = channel_mean_std(out, eps=0)
    m_r, s_r = channel_mean_std(ref, eps=0)
    torch.testing.assert_close(m_o, m_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(s_o, s_r, atol=1e-4, rtol=1e-4)
    # structure is the image's: correlation with the input stays 1 per channel
    c = torch.corrcoef(torch.stack([out[0, 0].flatten(), img[0, 0].flatten()]))[0, 1]
    assert c.item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        adain_color_fix(img, ref[..., :10])
    # exactly StableSR's adaptive_instance_normalization (unbiased variance, eps 1e-5), as DiT4SR
    def stats(f):
        b, ch = f.shape[:2]
        return (f.reshape(b, ch, -1).mean(2).reshape(b, ch, 1, 1),
                (f.reshape(b, ch, -1).var(dim=2) + 1e-5).sqrt().reshape(b, ch, 1, 1))
    (m_i, s_i), (m_f, s_f) = stats(img), stats(ref)
    torch.testing.assert_close(out, (img - m_i) / s_i * s_f + m_f, rtol=0, atol=1e-6)


def test_wavelet_fix_keeps_reference_low_band_and_image_high_band():
    g = torch.Generator().manual_seed(5)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 48), indexing="ij")
    ref = torch.stack([0.3 + 0.4 * xx, 0.6 - 0.3 * yy, 0.5 + 0.2 * xx * yy])[None]
    img = torch.rand(1, 3, 64, 48, generator=g) * 0.3 + 0.1          # textured, wrong colours
    high, low = wavelet_decompose(img)
    torch.testing.assert_close(high + low, img, atol=1e-6, rtol=0)
    out = wavelet_color_fix(img, ref)
    out_high, out_low = wavelet_decompose(out)
    _, ref_low = wavelet_decompose(ref)
    # exactly: result = high(image) + low(reference)
    torch.testing.assert_close(out - high, ref_low, atol=1e-6, rtol=0)
    # and its own low band is the reference's up to the re-blur of the image's texture
    err_out = (out_low - ref_low).abs().mean().item()
    err_img = (low - ref_low).abs().mean().item()
    assert err_out < 0.05 * err_img
    # the image's texture survives (the high band correlates with the input's)
    c = torch.corrcoef(torch.stack([out_high.flatten(), high.flatten()]))[0, 1].item()
    assert c > 0.95
    # an image that already is the reference is unchanged
    torch.testing.assert_close(wavelet_color_fix(ref, ref), ref, atol=1e-6, rtol=0)
    assert torch.equal(color_fix(img, ref, "none"), img)
    with pytest.raises(ValueError, match="colour fix"):
        color_fix(img, ref, "histogram")


def test_model_gets_fp32_timesteps_whatever_the_compute_dtype():
    # SD3's pipeline (and training, flow.timesteps) feed the transformer float32 timesteps =
    # sigma * 1000; a bf16 cast would round them to multiples of 4 above 512 (857.7 -> 856),
    # a conditioning the model never saw in training.
    from framer_dist.models.dit4sr.sampler import model_denoiser

    seen = []

    def model(hidden_states, lr_latent, timestep, encoder_hidden_states, pooled_projections):
        seen.append(timestep)
        assert hidden_states.dtype == torch.bfloat16  # the compute dtype still applies to the rest
        return hidden_states

    sigmas = flow_sigmas(40)
    e, p = torch.randn(1, 5, 8), torch.randn(1, 3)
    z = torch.randn(2, 4, 6, 6)
    for s in sigmas[:-1]:
        model_denoiser(model, e, p, dtype=torch.bfloat16)(z, z, s)
    for s, t in zip(sigmas[:-1], seen):
        assert t.dtype == torch.float32 and t.shape == (2,)
        assert torch.equal(t, (s.float() * 1000.0).expand(2))
