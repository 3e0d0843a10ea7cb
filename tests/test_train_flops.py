"""The MFU FLOP formula (framer_dist/flops.py) against torch's FlopCounterMode on the real tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from framer_dist.config import ModelConfig
from framer_dist.models.dit4sr.config import LoraConfig
from framer_dist.models.dit4sr.flops import geometry_from_model, train_flops_per_sample


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                        _transposed, _output_padding, _groups, output_mask, out_shape=None, **_):
    # torch's own conv-backward formula ignores `groups` (it counts a depth-wise 3x3 conv as a
    # dense one, x channels); per requested gradient the cost equals the forward conv.
    per = 2 * math.prod(grad_out_shape) * math.prod(w_shape[1:])
    return per * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


@pytest.mark.parametrize("mode", ["control", "lora", "full"])
def test_flop_formula_matches_flop_counter(mode):
    from framer_dist.models.dit4sr import apply_training_mode, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"))
    apply_training_mode(model, mode, LoraConfig(rank=4))
    b, h, w, t = 2, 8, 8, 4
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(b, 16, h, w, generator=g), torch.randn(b, 16, h, w, generator=g),
            torch.rand(b, generator=g) * 1000, torch.randn(b, t, 32, generator=g),
            torch.randn(b, 32, generator=g))
    formula = train_flops_per_sample(geometry_from_model(model), (h, w), t, mode, readout=True,
                                     lora_rank=4 if mode == "lora" else 0)
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten.convolution_backward: _conv_backward_flop})
    # The math SDPA backend decomposes attention into counted matmuls (the fused CPU kernel is
    # not counted at all).
    with sdpa_kernel(SDPBackend.MATH), counter:
        out = model(*args, readout="velocity")
    fwd = counter.get_total_flops() / b
    with sdpa_kernel(SDPBackend.MATH), counter:
        out = model(*args, readout="velocity")
        (out.sample.pow(2).mean() + out.features.pow(2).mean()).backward()
    total = counter.get_total_flops() / b
    assert fwd == pytest.approx(formula["forward"], rel=0.01)
    assert total == pytest.approx(formula["total"], rel=0.03)
