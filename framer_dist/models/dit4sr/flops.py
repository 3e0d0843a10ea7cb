"""FLOP count of the three-stream (noisy X | LR L | text C) MMDiT of docs/specs/dit4sr.md, for MFU.

Conventions (the usual ones for MFU, e.g. PaLM's appendix B):
- one multiply-add = 2 FLOPs; a linear layer on ``n`` tokens costs ``2 n d_in d_out``;
- scaled-dot-product attention over ``S`` tokens of width ``D`` costs ``4 S^2 D`` forward
  (``Q K^T`` and ``P V``) and twice that backward (``dP``, ``dV``, ``dQ``, ``dK``);
- backward of a linear layer = input gradient (``dgrad``, same cost as forward) + weight gradient
  (``wgrad``, same cost again) -- **frozen weights need no wgrad**, and layers whose input does
  not require grad need no dgrad (the embedders, the AdaLN modulation when ``temb`` is frozen,
  the frozen projections of block 0);
- norms, activations, softmax and other elementwise work are not counted (a few % at most);
- activation-checkpoint recomputation is not counted: MFU measures useful model FLOPs.

Per sample, with ``N = (H/p)(W/p)`` image tokens, ``T`` text tokens, width ``D``, MLP width ``mD``:

    embed      patch X, L: 2 * lin(N, p^2 c, D); context: lin(T, D_joint, D); time+pooled MLPs
    per block  AdaLN: lin(1, D, 6D) (9D dual) + lin(1, D, 6D) (2D in the last, text-pre-only block)
               QKV:  3 lin(N,D,D) X + 3 lin(N,D,D) L (shared frozen) + 3 lin(N,D,D) L control
                     + 3 lin(T,D,D) C
               SDPA over S = 2N + T: 4 S^2 D
               out:  lin(N,D,D) X + lin(N,D,D) L control + lin(T,D,D) C (not in the last block)
               dual blocks (attn2 over [X | L], S2 = 2N): the X/L QKV, control, SDPA, out again
               MLP:  lin(2N, D, mD) + depth-wise 3x3 conv on mD channels over N (2*9*mD*N)
                     + lin(2N, mD, D); text MLP lin(T, D, mD) + lin(T, mD, D) (not in the last)
    head       lin(1, D, 2D) + lin(N, D, p^2 c_out); with the FRAMER readout once per block

Training FLOPs = forward + dgrad (every layer downstream of a trainable parameter) + wgrad
(trainable layers only). ``tests/test_train_flops.py`` checks the formula against
``torch.utils.flop_counter.FlopCounterMode`` on the real tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MMDiTGeometry:
    num_blocks: int
    hidden: int                    # D = heads * head_dim
    patch: int = 2
    in_channels: int = 16
    out_channels: int = 16
    joint_attention_dim: int = 4096
    pooled_dim: int = 2048
    dual_blocks: tuple[int, ...] = ()  # indices of blocks with the second (X|L) self-attention
    mlp_ratio: int = 4
    time_proj_dim: int = 256


def geometry_from_model(model: Any) -> MMDiTGeometry:
    """Read the geometry from a diffusers-style ``model.config``."""
    c = model.config
    get = (c.get if isinstance(c, dict) else lambda k, d=None: getattr(c, k, d))
    dual = get("dual_attention_layers", ()) or ()
    return MMDiTGeometry(
        num_blocks=int(get("num_layers")),
        hidden=int(get("num_attention_heads")) * int(get("attention_head_dim")),
        patch=int(get("patch_size", 2)),
        in_channels=int(get("in_channels", 16)),
        out_channels=int(get("out_channels", None) or get("in_channels", 16)),
        joint_attention_dim=int(get("joint_attention_dim", 4096)),
        pooled_dim=int(get("pooled_projection_dim", 2048)),
        dual_blocks=tuple(int(i) for i in dual),
    )


def _lin(n: int, d_in: int, d_out: int) -> int:
    return 2 * n * d_in * d_out


def train_flops_per_sample(g: MMDiTGeometry, latent_hw: tuple[int, int], text_tokens: int,
                           mode: str = "control", readout: bool = False,
                           lora_rank: int = 0) -> dict[str, int]:
    """Forward, backward and total training FLOPs for one sample (see the module docstring).

    ``mode`` is ``control``, ``lora`` or ``full`` (which weights train); ``readout`` adds the
    FRAMER per-block head; ``lora_rank`` > 0 adds adapters with the default ``dit4sr.lora.targets``
    (to_q/k/v on the X and L tokens, to_out.0 on X) in every attention.
    """
    if mode not in ("control", "lora", "full"):
        raise ValueError(f"mode must be control, lora or full, got {mode!r}")
    h, w = latent_hw
    if h % g.patch or w % g.patch:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {g.patch}")
    n, t, d, md = (h // g.patch) * (w // g.patch), text_tokens, g.hidden, g.mlp_ratio * g.hidden
    full = mode == "full"
    fwd = dgrad = wgrad = 0

    def lin(f: int, trainable: bool, needs_dgrad: bool = True) -> None:
        nonlocal fwd, dgrad, wgrad
        fwd += f
        dgrad += f if needs_dgrad else 0
        wgrad += f if trainable else 0

    def attn(f: int) -> None:
        nonlocal fwd, dgrad
        fwd += f
        dgrad += 2 * f

    def lora(grad_in: bool) -> None:
        """Adapters (default targets) on to_q/k/v over [X; L] and on to_out.0 over X."""
        if lora_rank:
            r = lora_rank
            lin(3 * (_lin(2 * n, d, r) + _lin(2 * n, r, d)), True, grad_in)
            lin(_lin(n, d, r) + _lin(n, r, d), True)

    p_in, p_out = g.patch ** 2 * g.in_channels, g.patch ** 2 * g.out_channels
    # Embedders: their inputs are data, so never a dgrad; weights train only in full mode.
    lin(2 * _lin(n, p_in, d), full, False)
    lin(_lin(t, g.joint_attention_dim, d), full, False)
    lin(_lin(1, g.time_proj_dim, d) + _lin(1, d, d) + _lin(1, g.pooled_dim, d) + _lin(1, d, d),
        full, False)
    temb_grad = full  # temb requires grad only when the time/pooled embedders train

    for i in range(g.num_blocks):
        first, last, dual = i == 0, i == g.num_blocks - 1, i in g.dual_blocks
        grad_in = full or not first  # does this block's input already require grad?
        lin(_lin(1, d, 9 * d if dual else 6 * d), full, temb_grad)
        lin(_lin(1, d, 2 * d if last else 6 * d), full, temb_grad)
        for s_tokens, s_len in (("xl", 2 * n), ("c", t)):
            lin(3 * _lin(s_len, d, d), full, grad_in)
        lin(3 * _lin(n, d, d), True, grad_in)                   # L control q/k/v
        lora(grad_in)
        attn(4 * (2 * n + t) ** 2 * d)
        lin(_lin(n, d, d), full)                                # X to_out
        lin(_lin(n, d, d), True)                                # L to_out_control
        if not last:
            lin(_lin(t, d, d), full)                            # C to_add_out
        if dual:
            lin(3 * _lin(2 * n, d, d), full, grad_in)
            lin(3 * _lin(n, d, d), True, grad_in)
            lora(grad_in)
            attn(4 * (2 * n) ** 2 * d)
            lin(_lin(n, d, d), full)
            lin(_lin(n, d, d), True)
        lin(_lin(2 * n, d, md), full)                           # MLP in on [X; L]
        lin(2 * 9 * md * n, True)                               # LR depth-wise conv
        lin(_lin(2 * n, md, d), full)                           # MLP out
        if not last:
            lin(_lin(t, d, md) + _lin(t, md, d), full)          # text MLP
    heads = g.num_blocks if readout else 1
    lin(heads * _lin(1, d, 2 * d), full, temb_grad)
    lin(heads * _lin(n, d, p_out), full)
    return {"forward": fwd, "backward": dgrad + wgrad, "total": fwd + dgrad + wgrad}
