"""The LR-conditioned MMDiT block: a diffusers ``JointTransformerBlock`` plus the DiT4SR layers.

The image stream is ``[X | L]`` (noisy tokens, then LR tokens, ``[B, 2N, D]``). X and L share the
block's AdaLN modulation and gates; attention is three-stream (``attention.py``); in the MLP the
LR half of the first linear's activation, as a ``[B, 4D, h, w]`` grid, is injected into the noisy
half by a zero-initialised depth-wise 3x3 conv before the frozen second linear.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import JointTransformerBlock
from torch import nn

from .attention import LRJointAttnProcessor, add_control_projections, init_control_projections

_PROCESSOR = LRJointAttnProcessor()


class DiT4SRBlock(JointTransformerBlock):
    """Built from a stock block (:meth:`from_block`) so no stock weights are allocated twice."""

    lr_injection_scale: float

    @classmethod
    def from_block(cls, base: JointTransformerBlock, lr_injection_scale: float) -> "DiT4SRBlock":
        # Adopt the stock block's modules and attributes as they are; then add the new layers.
        block = cls.__new__(cls)
        block.__dict__.update(base.__dict__)
        block.lr_injection_scale = float(lr_injection_scale)
        add_control_projections(block.attn)
        if block.attn2 is not None:
            add_control_projections(block.attn2)
        ref = block.ff.net[2].weight
        inner = block.ff.net[2].in_features
        block.conv_control = nn.Conv2d(inner, inner, 3, padding=1, groups=inner, bias=True,
                                       device=ref.device, dtype=ref.dtype)
        block.init_control_layers()
        return block

    @torch.no_grad()
    def init_control_layers(self) -> None:
        """The DiT4SR initial state: zero LR projections and conv, to_out_control = to_out[0]."""
        init_control_projections(self.attn)
        if self.attn2 is not None:
            init_control_projections(self.attn2)
        self.conv_control.weight.zero_()
        self.conv_control.bias.zero_()

    def inject_lr(self, act: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``act``: first-linear activations of ``[X; L]``, ``[B, 2N, 4D]`` -> the same with the
        conv of the LR half (a row-major ``h x w`` grid) added to the noisy half."""
        h, w = grid
        n = h * w
        act_x, act_l = act[:, :n], act[:, n:]
        b, _, c = act_l.shape
        lr_grid = act_l.transpose(1, 2).reshape(b, c, h, w)
        inj = self.conv_control(lr_grid).flatten(2).transpose(1, 2)
        return torch.cat([act_x + self.lr_injection_scale * inj, act_l], dim=1)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                temb: torch.Tensor, grid: tuple[int, int]
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``hidden_states`` [B, 2N, D] = [X | L]; ``grid`` = (h, w) patches with h * w = N."""
        n = grid[0] * grid[1]
        if self.use_dual_attention:
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp, normed2, gate_msa2 = self.norm1(
                hidden_states, emb=temb)
        else:
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        if self.context_pre_only:
            normed_c = self.norm1_context(encoder_hidden_states, temb)
        else:
            normed_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
                encoder_hidden_states, emb=temb)

        attn_out, context_out = _PROCESSOR(self.attn, normed, normed_c, n)
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_out
        if self.use_dual_attention:
            attn_out2, _ = _PROCESSOR(self.attn2, normed2, None, n)
            hidden_states = hidden_states + gate_msa2.unsqueeze(1) * attn_out2

        normed = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff = self.ff.net
        act = ff[1](ff[0](normed))  # frozen first linear + GELU (+ its dropout) on [X; L]
        ff_out = ff[2](self.inject_lr(act, grid))
        for extra in ff[3:]:  # a final dropout, when the FeedForward has one
            ff_out = extra(ff_out)
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_out

        if self.context_pre_only:
            return None, hidden_states
        c = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_out
        normed_c = self.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        c = c + c_gate_mlp.unsqueeze(1) * self.ff_context(normed_c)
        return c, hidden_states
