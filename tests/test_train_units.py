"""Unit tests of the trainer's own pieces: flow maths, FLOP formula invariants, TensorBoard logging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from framer_dist import flow
from framer_dist.models.dit4sr.config import FlowConfig
from framer_dist.models.dit4sr.flops import MMDiTGeometry, train_flops_per_sample


def test_shift_schedule_and_sigma_distribution():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(flow.shift_sigma(t, 3.0), torch.tensor([0.0, 0.75, 1.0]))
    assert torch.allclose(flow.shift_sigma(t, 1.0), t)
    cfg = FlowConfig(shift=3.0)
    sig, noise = flow.sample_sigma_and_noise(list(range(4000)), (2,), cfg, seed=0)
    assert sig.shape == (4000,) and noise.shape == (4000, 2)
    assert bool(((sig > 0) & (sig < 1)).all())
    # median of logit-normal(0,1) is t=0.5, shifted by 3 -> 0.75
    assert abs(sig.median().item() - 0.75) < 0.03
    assert abs(noise.std().item() - 1.0) < 0.05


def test_per_sample_randomness_depends_only_on_seed_and_position():
    cfg = FlowConfig()
    s_all, n_all = flow.sample_sigma_and_noise([10, 11, 12, 13], (3, 4, 4), cfg, seed=7)
    s_b, n_b = flow.sample_sigma_and_noise([12, 13], (3, 4, 4), cfg, seed=7)
    assert torch.equal(s_all[2:], s_b) and torch.equal(n_all[2:], n_b)
    s_c, _ = flow.sample_sigma_and_noise([12, 13], (3, 4, 4), cfg, seed=8)
    assert not torch.equal(s_b, s_c)


def test_noising_velocity_and_preconditioned_loss():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    xt = flow.add_noise(x0, eps, sigma)
    v = flow.velocity_target(x0, eps)
    assert torch.allclose(flow.x0_from_velocity(xt, v, sigma), x0, atol=1e-6)
    assert flow.noise_loss(v, xt, x0, eps, sigma).item() < 1e-10
    v_hat = v + torch.randn(v.shape, generator=g)
    pre = flow.noise_loss(v_hat, xt, x0, eps, sigma, precondition_outputs=True)
    plain = flow.noise_loss(v_hat, xt, x0, eps, sigma, precondition_outputs=False)
    # preconditioned = sigma^2-weighted v-loss
    ref = ((sigma.view(-1, 1, 1, 1) ** 2) * (v_hat - v) ** 2).mean()
    assert torch.allclose(pre, ref, rtol=1e-5)
    assert torch.allclose(plain, ((v_hat - v) ** 2).mean(), rtol=1e-6)
    # x0 conversion broadcasts over a leading layer dimension
    stack = torch.stack([v, v_hat])
    assert flow.x0_from_velocity(xt, stack, sigma).shape == stack.shape


def test_flop_formula_invariants():
    g = MMDiTGeometry(num_blocks=24, hidden=1536, dual_blocks=tuple(range(13)))
    ctrl = train_flops_per_sample(g, (64, 64), 333, mode="control")
    full = train_flops_per_sample(g, (64, 64), 333, mode="full")
    ro = train_flops_per_sample(g, (64, 64), 333, mode="control", readout=True)
    assert ctrl["forward"] == full["forward"]
    # full trains every weight: backward about twice forward; control has no frozen wgrads
    assert 1.8 < full["backward"] / full["forward"] < 2.05
    assert ctrl["backward"] < full["backward"]
    assert ro["forward"] > ctrl["forward"]
    # SD3.5-M forward at 512 px is several TFLOPs per sample (2.6 B params x ~2.4k tokens x 2)
    assert 5e12 < ctrl["forward"] < 3e13
    with pytest.raises(ValueError, match="patch"):
        train_flops_per_sample(g, (63, 64), 1)


def _read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_and_heatmap_read_back(tmp_path):
    from framer_dist.metrics import TBWriter, framer_layer_scalars, heatmap_image
    layers = [0, 1, 2]
    m = {k: torch.linspace(0, 1, 3) for k in
         ("w_lf", "w_hf", "a_lf", "a_hf", "cos_lf", "cos_hf", "l_intra", "l_inter")}
    img = heatmap_image(m, layers, step=5)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.std() > 10  # not blank
    w = TBWriter(tmp_path / "tb")
    w.scalars({"loss/total": 1.5, **framer_layer_scalars(m, layers)}, step=5)
    w.image("framer/heatmap", img, step=5)
    w.close()
    acc = _read_events(tmp_path / "tb")
    assert acc.Scalars("loss/total")[0].value == 1.5
    assert math.isclose(acc.Scalars("framer/w_lf/layer_02")[0].value, 1.0)
    (ev,) = acc.Images("framer/heatmap")
    assert (ev.width, ev.height) == (img.shape[1], img.shape[0])
    # disabled writer writes nothing
    TBWriter(tmp_path / "off", enabled=False).scalars({"x": 1}, 0)
    assert not (tmp_path / "off").exists()


@pytest.mark.parametrize("mode", ["control", "lora"])
def test_frozen_layers_in_bf16_give_the_same_bits_with_less_memory(mode):
    """Backend 'none', precision bf16: frozen Linear/Conv weights are held in bf16 (autocast casts
    them at every use anyway), so loss and gradients equal the all-fp32-weights run bit for bit."""
    import copy

    from framer_dist.config import load_config
    from framer_dist.framer import select_layers
    from framer_dist.models.dit4sr import apply_training_mode, build_model
    from framer_dist.models.dit4sr.config import section
    from framer_dist.micro_batch import micro_batch_loss
    from framer_dist.models import StepContext, get_family
    from framer_dist.parallel import setup_backend

    runs = {}
    for frozen_bf16 in (False, True):
        cfg = load_config(None, ['model.preset="tiny"', 'train.precision="bf16"', 'train.device="cpu"',
                                 f'train.mode="{mode}"', f"train.frozen_bf16={str(frozen_bf16).lower()}"])
        torch.manual_seed(0)
        model = build_model(cfg.model)
        backend = setup_backend(cfg, model, apply_training_mode(model, mode, section(cfg).lora))
        c = model.config
        g = torch.Generator().manual_seed(1)
        lat = (2, c.in_channels, 16, 16)
        batch = {"hr_latent": torch.randn(lat, generator=g), "lr_latent": torch.randn(lat, generator=g),
                 "prompt_embeds": torch.randn(2, 8, c.joint_attention_dim, generator=g),
                 "pooled": torch.randn(2, c.pooled_projection_dim, generator=g)}
        students, teacher = select_layers(model.num_blocks, cfg.framer)
        loss = micro_batch_loss(get_family("dit4sr"), backend.model, batch,
                                StepContext(cfg, [0, 1], backend.autocast()), students, teacher,
                                torch.Generator().manual_seed(3))
        backend.backward(loss.total)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        not_layers = {f"{mn}.{pn}" for mn, m in model.named_modules()
                      if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                      for pn, _ in m.named_parameters(recurse=False)}
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        runs[frozen_bf16] = (loss.total.detach(), grads, dtypes, nbytes, backend.frozen_bf16_numel)

    (l32, g32, d32, b32, n32), (l16, g16, d16, b16, n16) = runs[False], runs[True]
    assert not_layers, "the tiny model has norm/embedding parameters"
    assert n32 == 0 and n16 > 0
    assert set(d32.values()) == {torch.float32}
    frozen_bf16 = {n for n, d in d16.items() if d == torch.bfloat16}
    assert frozen_bf16 and not frozen_bf16 & set(g16)                    # trainable stay fp32
    assert any(n.endswith("to_q.weight") or n.endswith("to_q.base_layer.weight") for n in frozen_bf16)
    assert not frozen_bf16 & not_layers                                  # norms etc. keep fp32
    assert b16 < 0.75 * b32
    assert torch.equal(l32, l16)
    assert g32.keys() == g16.keys() and all(torch.equal(g32[k], g16[k]) for k in g32)


def test_heatmap_has_the_per_band_loss_panel():
    """docs/specs/framer.md section 6: the layers x {LF, HF} heat map shows w, a, L_intra, L_inter
    and the teacher cosine. The loss panel is l_lf / l_hf (L_intra on LF and L_inter on HF with the
    default band assignment), so the image has four panels, not three."""
    from framer_dist.metrics import HEATMAP_ROWS, heatmap_image
    assert ("loss", "l_lf", "l_hf") in HEATMAP_ROWS
    layers = [0, 1, 2]
    base = {k: torch.linspace(0, 1, 3) for k in ("w_lf", "w_hf", "a_lf", "a_hf", "cos_lf", "cos_hf")}
    with_loss = {**base, "l_lf": torch.tensor([0.5, 0.7, 0.69]), "l_hf": torch.tensor([2.3, 1.9, 1.5])}
    assert heatmap_image(with_loss, layers).shape[1] > heatmap_image(base, layers).shape[1]
