"""One pisasr training micro-batch on plain tensors (models/pisasr/training.py): the stage losses
on decoded images, the keyed draws (a batch equals its halves, as two ranks equal one process),
the null prompt. unet-tiny, a tiny x2 VAE, random LPIPS, a tiny CSD U-Net; 32 px images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from framer_dist.models.pisasr import lora as L  # noqa: E402
from framer_dist.models.pisasr import losses as Ls  # noqa: E402
from framer_dist.models.pisasr.loading import build_model, build_unet  # noqa: E402
from framer_dist.models.pisasr.lpips import LPIPS  # noqa: E402
from framer_dist.models.pisasr.training import Helpers, train_step  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = build_model("unet-tiny")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.02)
    vae = AutoencoderKL(in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                        latent_channels=4, norm_num_groups=4, layers_per_block=1).eval()
    vae.requires_grad_(False)
    lp = LPIPS().requires_grad_(False)
    csd = Ls.CSDLoss(build_unet("unet-tiny").eval(), Ls.ddpm_alphas_cumprod())
    g = torch.Generator().manual_seed(9)
    helpers = Helpers(vae=vae, null_embeds=torch.randn(1, 5, 16, generator=g),
                      negative_embeds=torch.randn(1, 5, 16, generator=g), lpips=lp, csd=csd)
    return model, helpers


def _batch(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, 32, 32, generator=g) * 2 - 1, torch.rand(b, 3, 32, 32, generator=g) * 2 - 1,
            torch.randn(b, 5, 16, generator=g))


@pytest.mark.parametrize("stage", ["pix", "sem"])
def test_stage_step_and_batch_equals_its_halves(setup, stage):
    model, helpers = setup
    L.apply_stage(model, stage)
    lr, hr, c = _batch()
    with torch.no_grad():
        full = train_step(model, helpers, lr, hr, c, [10, 11], seed=3, stage=stage, readout="x0")
        halves = [train_step(model, helpers, lr[i:i + 1], hr[i:i + 1], c[i:i + 1], [10 + i], seed=3,
                             stage=stage, readout="x0") for i in range(2)]
    assert full.features.shape == (7, 2, 4, 16, 16) and full.pred.shape == (2, 3, 32, 32)
    torch.testing.assert_close(full.loss, (halves[0].loss + halves[1].loss) / 2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(full.features[:, 1:], halves[1].features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full.parts["mse"], F.mse_loss(full.pred, hr))
    if stage == "pix":
        assert set(full.parts) == {"mse"}
        torch.testing.assert_close(full.loss, full.parts["mse"])
    else:
        p = full.parts
        assert set(p) == {"mse", "lpips", "csd"}
        torch.testing.assert_close(full.loss, p["mse"] + 2 * p["lpips"] + p["csd"])
    L.apply_stage(model, "pix")


def test_step_gradient_reaches_only_the_stage_set(setup):
    model, helpers = setup
    try:
        params = L.apply_stage(model, "sem", train_heads=True)
        lr, hr, c = _batch(seed=1)
        out = train_step(model, helpers, lr, hr, c, [0, 1], seed=0, stage="sem", readout="x0")
        (out.loss + out.features[:-1].square().mean()).backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None}
        want = {n for n, p in model.named_parameters() if any(p is q for q in params)}
        assert got == want and any(n.startswith("framer_heads.") for n in got)
        assert all(torch.isfinite(p.grad).all() for p in params)
    finally:
        model.zero_grad(set_to_none=True)
        L.apply_stage(model, "pix")


def test_null_prompt_is_drawn_per_sample(setup):
    model, helpers = setup
    lr, hr, c = _batch(seed=2)
    null = helpers.null_embeds.expand_as(c)
    with torch.no_grad():
        always = train_step(model, helpers, lr, hr, c, [5, 6], seed=0, stage="pix", null_prob=1.0)
        by_hand = train_step(model, helpers, lr, hr, null, [5, 6], seed=0, stage="pix", null_prob=0.0)
        never = train_step(model, helpers, lr, hr, c, [5, 6], seed=0, stage="pix", null_prob=0.0)
    torch.testing.assert_close(always.loss, by_hand.loss)
    assert not torch.equal(always.z_h, never.z_h)
    with pytest.raises(ValueError, match="positions"):
        train_step(model, helpers, lr, hr, c, [5], seed=0, stage="pix")


def test_hf_coarse_where_students_lie_below_the_lf_radius():
    """pisasr.hf_coarse through the family's step at 32x32 latents (256 px): the tiny preset's
    8x8 students (blocks 1-3) carry nothing above 4 cycles, below the LF radius r * 32 / 2 = 4.8
    cycles at r = 0.3 ('skip': no HF term, LF kept); 'keep' keeps every HF term. (At r = 0.2 the
    tiny preset's coarsest grid, S/4, lies above the radius; at sd2.1-base 512 px the 8x8 students
    2-4 lie below 0.2 x 64.)"""
    from pathlib import Path

    from framer_dist.config import load_config
    from framer_dist.framer import framer_objective
    from framer_dist.framer.layers import select_layers
    from framer_dist.models import StepContext, get_family
    from framer_dist.models.pisasr import hf_student_mask

    repo = Path(__file__).resolve().parent.parent
    fam = get_family("pisasr")
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 256, 256, generator=g) * 2 - 1
    batch = {"hr": hr, "lr": hr.flip(-1), "prompt_embeds": torch.randn(2, 77, 16, generator=g)}
    metrics = {}
    for mode in ("skip", "keep"):
        cfg = load_config(str(repo / "configs" / "tiny_pisasr_cpu.toml"),
                          ["data.resolution=256", "framer.radius=0.3", f'pisasr.hf_coarse="{mode}"'])
        torch.manual_seed(cfg.train.seed)
        model = fam.build(cfg)
        fam.trainable(model, cfg)
        out = fam.step(model, batch, StepContext(cfg, [0, 1], helpers=fam.helpers(model, cfg, torch.device("cpu"))))
        assert out.features.shape[-2:] == (32, 32)
        assert model.block_grids((32, 32))[:6] == [(16, 16), (8, 8), (8, 8), (8, 8), (16, 16), (32, 32)]
        want = [True, False, False, False, True, True] if mode == "skip" else [True] * 6
        assert out.hf_layers.tolist() == want + [True]  # the teacher's entry: True
        students, teacher = select_layers(model.num_blocks, cfg.framer)
        res = framer_objective(out.features[students], out.features[teacher].detach(), cfg.framer,
                               torch.Generator().manual_seed(0), hf_layers=out.hf_layers[students])
        metrics[mode] = {k: v.detach() for k, v in res.metrics.items()}
    skip, keep = metrics["skip"], metrics["keep"]
    assert (skip["a_hf"][1:4] == 0).all() and (keep["l_hf"][1:4] > 0).all()
    torch.testing.assert_close(skip["l_lf"], keep["l_lf"])  # LF terms untouched
    # at r = 0.2 the same grids keep every student (the rule, not a fixed list)
    assert hf_student_mask([(8, 8)], (32, 32), 0.2, "skip").tolist() == [True]


def _family_cfg(*overrides: str):
    from pathlib import Path

    from framer_dist.config import load_config

    repo = Path(__file__).resolve().parent.parent
    return load_config(str(repo / "configs" / "tiny_pisasr_cpu.toml"), list(overrides))


def test_the_null_prompt_reaches_the_unet_not_csd():
    """PiSA-SR drops the tag prompt only at the U-Net input; CSD's positive branch keeps it. The
    loader hands the family its prompts untouched (own_null_prompt), the step swaps in the empty
    prompt per sample: with data.null_prompt_prob = 1 two different tag prompts give the same
    prediction (MSE) but different CSD terms."""
    from framer_dist.data import build_dataloader
    from framer_dist.models import StepContext, get_family

    fam = get_family("pisasr")
    assert fam.own_null_prompt
    cfg = _family_cfg('train.mode="sem"', "data.null_prompt_prob=1.0", "data.prompt_len=7")
    batch = next(iter(build_dataloader(cfg, 0, 1, start_sample=0)))
    assert batch["prompt_embeds"].abs().sum() > 0  # not the zero null prompt: kept for the step
    torch.manual_seed(cfg.train.seed)
    model = fam.build(cfg)
    fam.trainable(model, cfg)
    helpers = fam.helpers(model, cfg, torch.device("cpu"))
    assert helpers.frozen.null_embeds.shape == (1, 7, 16) and helpers.frozen.null_embeds.abs().sum() == 0
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    outs = []
    for k in range(2):
        b = {"hr": hr, "lr": hr.flip(-1), "prompt_embeds": torch.randn(2, 7, 16, generator=g)}
        with torch.no_grad():
            outs.append(fam.step(model, b, StepContext(cfg, [0, 1], helpers=helpers)).parts)
    assert torch.equal(outs[0]["mse"], outs[1]["mse"])
    assert not torch.equal(outs[0]["csd"], outs[1]["csd"])


def test_family_checks_and_init_from_errors(tmp_path, capsys):
    from framer_dist.config import ConfigError
    from framer_dist.data import load_vae
    from framer_dist.models import get_family
    from framer_dist.models.pisasr.family import init_from

    fam = get_family("pisasr")
    for bad, msg in (("framer.teacher_layer=-2", "framer.teacher_layer"),
                     ('framer.students="all"', "framer.students"),
                     ("framer.students=[0, 6]", "framer.students")):
        with pytest.raises(ConfigError, match=msg):
            fam.check(_family_cfg(bad))
    fam.check(_family_cfg("framer.students=[0, 5]"))
    rel = tmp_path / "pisa_sr.pkl"
    torch.save({"state_dict_unet": {}}, rel)
    model = build_model("unet-tiny")
    with pytest.raises(ConfigError, match=r"not a safetensors LoRA export .*tools/import_pisasr\.py"):
        init_from(model, rel)
    cfg = _family_cfg('train.mode="sem"')
    torch.manual_seed(0)
    fam.build(cfg)
    assert "WARNING: train.mode = 'sem' without pisasr.init_from" in capsys.readouterr().out
    assert get_family("pisasr").inference.defaults["positive_suffix"] == ""
    # the VAE cache keeps one VAE per dtype
    d = cfg.data
    assert load_vae(d, "pisasr").vae.dtype == torch.float32
    assert load_vae(d, "pisasr", dtype=torch.bfloat16).vae.dtype == torch.bfloat16
