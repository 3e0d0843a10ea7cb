"""Three-stream joint attention for the LR-conditioned MMDiT (docs/specs/dit4sr.md).

One SDPA over ``[X | L | C]``: noisy image tokens X and text C use the frozen pretrained
projections; the LR tokens L go through the same frozen projection followed by a zero-initialised
``*_control`` Linear(D, D). The q/k RMS norms act on the LR queries and keys themselves (the first
public release normalised the noisy keys twice by mistake). The LR output plus the LR stream's own
normalised input goes through ``to_out_control``, a copy of the pretrained ``to_out[0]``.
For ``attn2`` of the SD3.5 dual-attention blocks the same is done over ``[X | L]`` with no text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

CONTROL_PROJECTIONS = ("to_q_control", "to_k_control", "to_v_control", "to_out_control")


def add_control_projections(attn: Attention) -> None:
    """Attach the LR-stream layers to a stock diffusers ``Attention`` (same device and dtype)."""
    ref = attn.to_out[0].weight
    dim = attn.inner_dim
    if attn.inner_kv_dim != dim or attn.to_out[0].in_features != dim:
        raise ValueError("LR control projections need inner_dim == inner_kv_dim == to_out input size")
    for name in CONTROL_PROJECTIONS:
        out_f = attn.to_out[0].out_features if name == "to_out_control" else dim
        setattr(attn, name, nn.Linear(dim, out_f, bias=True, device=ref.device, dtype=ref.dtype))
    init_control_projections(attn)


@torch.no_grad()
def init_control_projections(attn: Attention) -> None:
    """q/k/v control to zero; ``to_out_control`` := the (possibly just loaded) ``to_out[0]``."""
    for name in ("to_q_control", "to_k_control", "to_v_control"):
        lin = getattr(attn, name)
        lin.weight.zero_()
        lin.bias.zero_()
    src = attn.to_out[0]
    src = getattr(src, "base_layer", src)  # peft-wrapped: copy the frozen base weights
    attn.to_out_control.weight.copy_(src.weight)
    attn.to_out_control.bias.copy_(src.bias)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.view(b, n, heads, d // heads).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class LRJointAttnProcessor:
    """SDPA over ``[X | L | C]`` (``C`` absent for ``attn2``); returns ``([X' | L'], C')``.

    ``hidden_states`` is ``[B, 2N, D]`` with the noisy tokens first; ``num_noisy`` is N.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None, num_noisy: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = num_noisy
        lr_in = hidden_states[:, n:]
        # One call of each shared projection over [X; L]; the LR half then gets its control Linear.
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = torch.cat([q[:, :n], attn.to_q_control(q[:, n:])], dim=1)
        k = torch.cat([k[:, :n], attn.to_k_control(k[:, n:])], dim=1)
        v = torch.cat([v[:, :n], attn.to_v_control(v[:, n:])], dim=1)
        q, k, v = _heads(q, attn.heads), _heads(k, attn.heads), _heads(v, attn.heads)
        # The per-head norms apply to every image token, LR queries/keys included.
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        num_img = hidden_states.shape[1]
        if encoder_hidden_states is not None:
            cq = _heads(attn.add_q_proj(encoder_hidden_states), attn.heads)
            ck = _heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
            cv = _heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        out = _merge(F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False))
        out = out.to(hidden_states.dtype)
        out_x, out_l, out_c = out[:, :n], out[:, n:num_img], out[:, num_img:]
        out_x = attn.to_out[1](attn.to_out[0](out_x))
        out_l = attn.to_out_control(out_l + lr_in)
        context = None
        if encoder_hidden_states is not None and not attn.context_pre_only:
            context = attn.to_add_out(out_c)
        return torch.cat([out_x, out_l], dim=1), context
