"""The pisasr family's stage losses (docs/specs/framer_u.md): LPIPS-VGG in plain torch from local
files (random weights here), CSD against a frozen unet-tiny, the per-sample keyed draws."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from framer_dist.models.pisasr import losses as Ls  # noqa: E402
from framer_dist.models.pisasr.lpips import CHANNELS, LPIPS, LPIPSWeightsError, load_lpips  # noqa: E402


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    net = LPIPS()
    vgg = {k: v for k, v in net.state_dict().items() if k.startswith("features.")}
    # torchvision's file also holds the classifier: ignored
    vgg["classifier.0.weight"] = torch.zeros(2, 2)
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(CHANNELS)}
    torch.save(vgg, d / "vgg16.pth")
    torch.save(lin, d / "vgg.pth")
    return d / "vgg16.pth", d / "vgg.pth", vgg, lin


@pytest.fixture(scope="module")
def lpips(lpips_files):
    return load_lpips(lpips_files[0], lpips_files[1])


def _images(b=2, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------------- LPIPS


def test_lpips_identical_is_zero_and_symmetric(lpips):
    x, y = _images(seed=0), _images(seed=1)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(lpips(y, x), d)
    torch.testing.assert_close(lpips(x[1:], y[1:]), d[1:])  # per image, batch-independent
    assert not any(p.requires_grad for p in lpips.parameters()) and not lpips.training


def test_lpips_matches_the_lpips_formula(lpips_files):
    """Only layer 0 weighted (all ones): the mean over space of sum_c (n_x - n_y)^2 at relu1_2,
    computed here directly from the files' weights and lpips' scaling constants."""
    vgg_path, _, vgg, _ = lpips_files
    lin = {f"lin{k}.model.1.weight": (torch.ones if k == 0 else torch.zeros)(1, c, 1, 1)
           for k, c in enumerate(CHANNELS)}
    p = vgg_path.parent / "lin_one.pth"
    torch.save(lin, p)
    net = load_lpips(vgg_path, p)
    x, y = _images(seed=2), _images(seed=3)

    def relu1_2(t):
        t = (t - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / torch.tensor(
            [0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        t = F.relu(F.conv2d(t, vgg["features.0.weight"], vgg["features.0.bias"], padding=1))
        t = F.relu(F.conv2d(t, vgg["features.2.weight"], vgg["features.2.bias"], padding=1))
        return t / (t.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)

    want = (relu1_2(x) - relu1_2(y)).pow(2).sum(1).mean(dim=(1, 2))
    torch.testing.assert_close(net(x, y), want, rtol=1e-5, atol=1e-7)


def test_lpips_gradient_reaches_the_prediction(lpips):
    x = _images(seed=4).requires_grad_(True)
    lpips(x, _images(seed=5)).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_missing_or_unfitting_file_is_one_line(lpips_files, tmp_path):
    vgg_path, lin_path, vgg, lin = lpips_files
    for args, name in (((tmp_path / "none.pth", lin_path), "none.pth"),
                       ((vgg_path, tmp_path / "nolin.pth"), "nolin.pth"),
                       (("", lin_path), "VGG16")):
        with pytest.raises(LPIPSWeightsError, match="not found") as e:
            load_lpips(*args)
        assert name in str(e.value) and "\n" not in str(e.value)
    bad = dict(lin)
    del bad["lin3.model.1.weight"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(LPIPSWeightsError, match="'lin3.model.1.weight'"):
        load_lpips(vgg_path, tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(LPIPSWeightsError, match="cannot be read") as e:
        load_lpips(tmp_path / "junk.pth", lin_path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------- keyed draws


def test_sample_generators_are_keyed_by_position_and_stream():
    a = torch.randn(3, generator=Ls.sample_generator(7, 11, "csd"))
    assert torch.equal(a, torch.randn(3, generator=Ls.sample_generator(7, 11, "csd")))
    for other in (Ls.sample_generator(7, 12, "csd"), Ls.sample_generator(7, 11, "vae"),
                  Ls.sample_generator(8, 11, "csd")):
        assert not torch.equal(a, torch.randn(3, generator=other))
    m = Ls.null_prompt_mask(Ls.sample_generators(0, range(400), "null"), 0.5)
    assert m.dtype == torch.bool and 150 < int(m.sum()) < 250
    assert torch.equal(Ls.null_prompt_mask(Ls.sample_generators(0, range(3, 5), "null")), m[3:5])
    with pytest.raises(ValueError, match="stream"):
        Ls.sample_generator(0, 0, "noise")


def test_vae_posterior_sample_is_per_sample():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                        latent_channels=4, norm_num_groups=4, layers_per_block=1)
    x = _images(b=3, size=8)
    z = Ls.encode_latents(vae, x, Ls.sample_generators(1, [4, 5, 6], "vae"))
    z1 = Ls.encode_latents(vae, x[1:2], Ls.sample_generators(1, [5], "vae"))
    assert z.shape == (3, 4, 8, 8) and z.dtype == torch.float32
    torch.testing.assert_close(z[1:2], z1, atol=1e-6, rtol=0)
    out = Ls.decode_images(vae, z)
    assert out.shape == (3, 3, 8, 8) and out.abs().max() <= 1


# ---------------------------------------------------------------------- CSD and the stages


@pytest.fixture(scope="module")
def csd():
    from diffusers import UNet2DConditionModel

    from framer_dist.models.pisasr.presets import preset_config

    torch.manual_seed(1)
    return Ls.CSDLoss(UNet2DConditionModel(**preset_config("unet-tiny")).eval(), Ls.ddpm_alphas_cumprod())


def _csd_inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 16, 16, generator=g), torch.randn(b, 5, 16, generator=g),
            torch.randn(b, 5, 16, generator=g))


def test_ddpm_schedule_equals_diffusers():
    from diffusers import DDPMScheduler

    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(Ls.ddpm_alphas_cumprod(), s.alphas_cumprod.float())


def test_csd_value_gradient_and_draws(csd):
    z, pos, neg = _csd_inputs()
    z.requires_grad_(True)
    loss = csd(z, pos, neg, Ls.sample_generators(0, [3, 4], "csd"))
    # the same draws, the release's formula, written out
    t, noise = csd.draw(z.detach(), Ls.sample_generators(0, [3, 4], "csd"))
    assert ((t >= 20) & (t < 500)).all()
    ab = csd.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        noisy = ab.sqrt() * z + (1 - ab).sqrt() * noise
        e_neg = csd.unet(noisy, t, encoder_hidden_states=neg).sample
        e_pos = csd.unet(noisy, t, encoder_hidden_states=pos).sample
        e_cfg = e_neg + 7.5 * (e_pos - e_neg)
        x_cfg = (noisy - (1 - ab).sqrt() * e_cfg) / ab.sqrt()
        x_neg = (noisy - (1 - ab).sqrt() * e_neg) / ab.sqrt()
        g = (x_neg - x_cfg) / (z - x_cfg).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(loss, g.pow(2).mean(), rtol=1e-4, atol=1e-6)
    loss.backward()
    want = 2 * g / g.numel()  # d mse(z, sg(z - g)) / dz; z - (z - g) rounds in fp32
    torch.testing.assert_close(z.grad, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    # keyed by position: a batch equals its halves
    with torch.no_grad():
        both = csd(z, pos, neg, Ls.sample_generators(0, [3, 4], "csd"))
        a = csd(z[:1], pos[:1], neg[:1], Ls.sample_generators(0, [3], "csd"))
        b = csd(z[1:], pos[1:], neg[1:], Ls.sample_generators(0, [4], "csd"))
    torch.testing.assert_close(both, (a + b) / 2, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="one generator per sample"):
        csd(z, pos, neg, Ls.sample_generators(0, [3], "csd"))


def test_stage_losses(lpips, csd):
    pred, hr = _images(seed=6, size=16), _images(seed=7, size=16)
    pix = Ls.stage_loss("pix", pred, hr)
    torch.testing.assert_close(pix.total, F.mse_loss(pred, hr))
    assert set(pix.parts) == {"mse"}
    z, pos, neg = _csd_inputs()
    sem = Ls.stage_loss("sem", pred, hr, z_h=z, lpips=lpips, csd=csd, prompt_embeds=pos,
                        negative_embeds=neg, generators=Ls.sample_generators(0, [0, 1], "csd"))
    p = sem.parts
    assert set(p) == {"mse", "lpips", "csd"}
    torch.testing.assert_close(sem.total, p["mse"] + 2 * p["lpips"] + p["csd"])
    torch.testing.assert_close(p["lpips"], lpips(pred, hr).mean())
    with pytest.raises(ValueError, match="needs lpips"):
        Ls.stage_loss("sem", pred, hr)
    with pytest.raises(ValueError, match="train.mode"):
        Ls.stage_loss("both", pred, hr)
