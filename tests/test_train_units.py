"""Unit tests of the trainer's own pieces: flow maths, FLOP formula invariants, TensorBoard logging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from framer_dist import flow
from framer_dist.config import FlowConfig
from framer_dist.flops import MMDiTGeometry, train_flops_per_sample


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


def test_heatmap_has_the_per_band_loss_panel():
    """FRAMER_SPEC.md section 6: the layers x {LF, HF} heat map shows w, a, L_intra, L_inter and
    the teacher cosine. The loss panel is l_lf / l_hf (L_intra on LF and L_inter on HF with the
    default band assignment), so the image has four panels, not three."""
    from framer_dist.metrics import HEATMAP_ROWS, heatmap_image
    assert ("loss", "l_lf", "l_hf") in HEATMAP_ROWS
    layers = [0, 1, 2]
    base = {k: torch.linspace(0, 1, 3) for k in ("w_lf", "w_hf", "a_lf", "a_hf", "cos_lf", "cos_hf")}
    with_loss = {**base, "l_lf": torch.tensor([0.5, 0.7, 0.69]), "l_hf": torch.tensor([2.3, 1.9, 1.5])}
    assert heatmap_image(with_loss, layers).shape[1] > heatmap_image(base, layers).shape[1]
