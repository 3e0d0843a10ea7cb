"""PiSA-SR's one-step U-Net with the FRAMER per-block readout (docs/specs/framer_u.md).

:class:`PiSASRUNet` wraps a diffusers ``UNet2DConditionModel`` (kept as ``self.unet``, so a stock
state dict loads into ``model.unet`` and the parameter names stay ``unet.<stock name>``) and runs
``r = unet(z_L, t=1, c)``, ``z_H = z_L - r``. Its forward is diffusers' ``UNet2DConditionModel
.forward`` re-spelled block by block for the parts SD2.1 uses (time embedding, conv_in, down
blocks with their residuals, mid block, up blocks with the residuals and upsample sizes,
conv_norm_out / SiLU / conv_out), in one top-level loop over the blocks ``down_blocks[0..]``,
``mid_block``, ``up_blocks[0..]`` (``blocks``, 9 at SD2.1-base, 7 in ``unet-tiny``). Each block's
output is taken in that loop, exactly once, with or without activation checkpointing; no hooks.

FRAMER readout (spec "Features", "Heads"): the students are blocks ``0 .. L-2``; student ``i``'s
output ``h_i`` goes through its training-only head ``P_i`` (``framer_heads[i]``: 1x1 conv
``C_i -> C_0`` without bias, orthogonal init), a bilinear resize to the output grid
(align_corners=False), then the model's own ``conv_norm_out``, SiLU and ``conv_out``: ``r_i``.

- ``readout="x0"``: ``F_i = z_L - r_i``; the last entry is the real ``z_H``;
- ``readout="velocity"``: ``F_i = r_i``; the last entry is the real ``r``;
- ``readout="hidden"``: ``F_i = resize(P_i h_i)``; the last entry is the last block's output.

The last block needs no head: its output already has ``C_0`` channels on the output grid, and
``conv_out(SiLU(conv_norm_out(.)))`` of it *is* the model output. So ``features[-1]`` is the
teacher of every readout (``framer.students = all_but_last`` selects it), taken from the real
forward. The FRAMER objective detaches it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from framer_dist.models import block_indices

Readout = Literal["x0", "velocity", "hidden"] | None
READOUTS = ("x0", "velocity", "hidden")

# The diffusers block classes of the presets: ZeRO-3 leaf modules (spec "Distribution").
BLOCK_CLASSES = ("CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "UpBlock2D",
                 "CrossAttnUpBlock2D")


class PiSASROutput(NamedTuple):
    """A named tuple so ZeRO-3 and FSDP2 hooks see the tensors inside (they walk tuples)."""

    sample: Tensor                   # [B, 4, H, W] the U-Net output r (PiSA-SR's model_pred)
    z_h: Tensor                      # [B, 4, H, W] z_L - r, fp32
    features: Tensor | None = None   # [L, B, C, H, W] per-block readout (last = teacher), or None


@dataclass
class ReadoutStats:
    """How often a FRAMER head ran: in forward passes, and recomputed inside backward."""

    forward: int = 0
    recomputed: int = 0


def _check_supported(config) -> None:
    """The forward below re-spells only what SD2.1's U-Net uses; refuse anything else by key."""
    unsupported = {
        "center_input_sample": False, "class_embed_type": None, "num_class_embeds": None,
        "addition_embed_type": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
        "time_embedding_type": "positional", "time_embedding_act_fn": None,
        "time_cond_proj_dim": None,
    }
    for key, want in unsupported.items():
        got = config.get(key, want)
        if got != want:
            raise ValueError(f"pisasr U-Net: config key {key!r} = {got!r} is not supported "
                             f"(the one-step forward follows SD2.1's U-Net: {key} = {want!r})")


class PiSASRUNet(nn.Module):
    """The module a backend wraps: the U-Net (``unet``), the FRAMER heads (``framer_heads``,
    training only) and the block-by-block one-step forward."""

    def __init__(self, unet: nn.Module, *, heads: bool = True, head_seed: int = 0,
                 timestep: int = 1) -> None:
        super().__init__()
        _check_supported(unet.config)
        self.unet = unet
        self.timestep = int(timestep)
        # A plain tuple, not a ModuleList: the parameters stay registered once, under unet.*.
        self._blocks: tuple[nn.Module, ...] = (*unet.down_blocks, unet.mid_block, *unet.up_blocks)
        self._n_down = len(unet.down_blocks)
        self._n_up = len(unet.up_blocks)
        self.block_channels: tuple[int, ...] = tuple(
            int(b.resnets[-1].out_channels) for b in self._blocks)
        self.head_channels = int(unet.config.block_out_channels[0])  # conv_norm_out's input
        self.framer_heads: nn.ModuleList | None = None
        if heads:
            self.framer_heads = nn.ModuleList(
                nn.Conv2d(c, self.head_channels, 1, bias=False) for c in self.block_channels[:-1])
            self.init_heads(head_seed)
        self._ac_indices: frozenset[int] = frozenset()
        self.readout_stats = ReadoutStats()

    # ------------------------------------------------------------------ structure

    @property
    def blocks(self) -> tuple[nn.Module, ...]:
        return self._blocks

    @property
    def readout_head_modules(self) -> tuple[str, ...]:
        """Used after every block by the readout: kept gathered under ZeRO-3, unsharded (root)
        under FSDP2."""
        heads = ("framer_heads",) if self.framer_heads is not None else ()
        return ("unet.conv_norm_out", "unet.conv_out", *heads)

    @property
    def no_weight_decay(self) -> tuple[str, ...]:
        """Parameter-name prefixes without weight decay: the heads (the FRAMER loss does not change
        when they are scaled, so decay would only shrink them; spec "Heads")."""
        return ("framer_heads.",)

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def config(self):
        return self.unet.config

    def init_heads(self, seed: int = 0) -> None:
        """Orthogonal (gain 1) head weights from a generator seeded by ``seed`` alone, so every rank
        (and a re-initialisation after loading an export) gets the same heads. No-op on meta."""
        if self.framer_heads is None:
            return
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for head in self.framer_heads:
                w = head.weight
                if w.is_meta:
                    continue
                cpu = torch.empty(w.shape, dtype=torch.float32)
                nn.init.orthogonal_(cpu, gain=1.0, generator=g)
                w.copy_(cpu.to(w.dtype))

    def block_grids(self, size: tuple[int, int]) -> list[tuple[int, int]]:
        """Each block's output grid ``(h, w)`` for a latent of ``size``: the forward's residual
        bookkeeping on shapes alone (the stride-2 downsamplers give ``ceil(n / 2)``, the upsamplers
        return to the size of the next skip)."""
        h, w = int(size[0]), int(size[1])
        res = [(h, w)]  # conv_in's output
        grids = []
        for b in self._blocks[: self._n_down]:
            res.extend([(h, w)] * len(b.resnets))
            if getattr(b, "downsamplers", None) is not None:
                h, w = math.ceil(h / 2), math.ceil(w / 2)
                res.append((h, w))
            grids.append((h, w))
        grids.append((h, w))  # mid block
        for b in self._blocks[self._n_down + 1:]:
            res = res[: -len(b.resnets)]
            if getattr(b, "upsamplers", None) is not None:
                h, w = res[-1] if res else (2 * h, 2 * w)
            grids.append((h, w))
        return grids

    # ------------------------------------------------------------------ checkpointing

    def set_activation_checkpointing(self, indices: Iterable[int]) -> None:
        """Recompute the listed blocks in backward (and their readouts, each its own checkpointed
        function); ``[]`` turns it off. Features are still taken once, in the top-level loop."""
        self._ac_indices = block_indices(indices, self.num_blocks)

    @property
    def activation_checkpointing(self) -> frozenset[int]:
        return self._ac_indices

    # ------------------------------------------------------------------ forward pieces

    def _out_head(self, x: Tensor) -> Tensor:
        """conv_norm_out -> SiLU -> conv_out (diffusers' post-process)."""
        u = self.unet
        if u.conv_norm_out is not None:
            x = u.conv_act(u.conv_norm_out(x))
        return u.conv_out(x)

    def _readout(self, i: int, h: Tensor, z_l: Tensor, mode: str) -> Tensor:
        # Counted so tests can prove exactly-once capture; inside backward it is a recomputation.
        if torch._C._current_graph_task_id() == -1:
            self.readout_stats.forward += 1
        else:
            self.readout_stats.recomputed += 1
        y = self.framer_heads[i](h)
        size = z_l.shape[-2:]
        if y.shape[-2:] != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        if mode == "hidden":
            return y
        r = self._out_head(y)
        return z_l.float() - r.float() if mode == "x0" else r

    def _block(self, i: int, h: Tensor, emb: Tensor, ctx: Tensor, res: tuple[Tensor, ...],
               upsample_size: tuple[int, int] | None):
        """Block ``i`` as in ``UNet2DConditionModel.forward``: a down block returns
        ``(h, res_samples)``, the mid and up blocks ``h``."""
        # The hidden state goes in positionally: module hooks see positional tensors only, and
        # ZeRO-3's leaf-gradient hook (a full backward hook) needs it (parallel/deepspeed/units.py).
        b = self._blocks[i]
        cross = {"encoder_hidden_states": ctx} if getattr(b, "has_cross_attention", False) else {}
        if i <= self._n_down:  # down blocks and the mid block
            return b(h, emb, **cross)
        return b(h, res, emb, upsample_size=upsample_size, **cross)

    def _check_inputs(self, z: Tensor, ctx: Tensor, readout: Readout) -> None:
        cfg = self.unet.config
        if readout not in (None, *READOUTS):
            raise ValueError(f"readout must be None, 'x0', 'velocity' or 'hidden', got {readout!r}")
        if readout is not None and self.framer_heads is None:
            raise ValueError("readout needs the FRAMER heads; this model was built with heads=False "
                             "(inference)")
        if z.ndim != 4 or z.shape[1] != cfg.in_channels:
            raise ValueError(f"z_l must be [B, {cfg.in_channels}, H, W], got {tuple(z.shape)}")
        if ctx.ndim != 3 or ctx.shape[0] != z.shape[0] or ctx.shape[2] != cfg.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states must be [B={z.shape[0]}, T, "
                             f"{cfg.cross_attention_dim}], got {tuple(ctx.shape)}")

    # ------------------------------------------------------------------ forward

    def forward(self, z_l: Tensor, encoder_hidden_states: Tensor,
                timestep: int | Tensor | None = None, readout: Readout = None) -> PiSASROutput:
        """``r = unet(z_l, t, c)`` (t = ``self.timestep``, PiSA-SR's 1, unless given),
        ``z_h = z_l - r``; with ``readout`` also every block's FRAMER feature ``[L, B, C, H, W]``
        on the output grid (see the module docstring)."""
        self._check_inputs(z_l, encoder_hidden_states, readout)
        u = self.unet
        dt = u.conv_in.weight.dtype
        sample = z_l.to(dt)
        ctx = encoder_hidden_states.to(dt)

        # upsample sizes are forwarded when the latent is not a multiple of 2 ** num_upsamplers
        up_factor = 2 ** u.num_upsamplers
        forward_upsample_size = any(d % up_factor != 0 for d in sample.shape[-2:])

        # 1. time
        t_emb = u.get_time_embed(sample=sample, timestep=self.timestep if timestep is None else timestep)
        emb = u.time_embedding(t_emb, None)
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        # 2. pre-process
        h = u.conv_in(sample)

        ac = self._ac_indices
        use_ac = torch.is_grad_enabled() and bool(ac)
        n = self.num_blocks
        feats: list[Tensor] = []
        res_samples: tuple[Tensor, ...] = (h,)
        for i in range(n):
            res: tuple[Tensor, ...] = ()
            upsample_size = None
            if i > self._n_down:  # an up block: take its residuals off the stack
                k = len(self._blocks[i].resnets)
                res, res_samples = res_samples[-k:], res_samples[:-k]
                if i < n - 1 and forward_upsample_size:
                    upsample_size = tuple(res_samples[-1].shape[2:])
            ckpt = use_ac and i in ac
            if ckpt:
                out = checkpoint(self._block, i, h, emb, ctx, res, upsample_size, use_reentrant=False)
            else:
                out = self._block(i, h, emb, ctx, res, upsample_size)
            if i < self._n_down:
                h, down_res = out
                res_samples = res_samples + tuple(down_res)
            else:
                h = out
            # the block's feature, taken here and only here
            if readout is not None and i < n - 1:
                if ckpt:
                    f = checkpoint(self._readout, i, h, z_l, readout, use_reentrant=False)
                else:
                    f = self._readout(i, h, z_l, readout)
                feats.append(f)

        # 6. post-process: the real output (the teacher's readout, no head)
        r = self._out_head(h)
        z_h = z_l.float() - r.float()
        if readout is None:
            return PiSASROutput(sample=r, z_h=z_h)
        last = {"x0": z_h, "velocity": r, "hidden": h}[readout]
        feats.append(last.to(feats[0].dtype) if feats else last)
        return PiSASROutput(sample=r, z_h=z_h, features=torch.stack(feats))


def hf_student_mask(student_grids: Sequence[tuple[int, int]], teacher_grid: tuple[int, int],
                    radius: float, mode: Literal["skip", "keep"] = "skip") -> Tensor:
    """Which students' HF terms count (``pisasr.hf_coarse``, spec "Features"): a bool ``[L]``.

    A student whose grid ``s`` satisfies ``s <= radius * S`` on both axes (``S`` the teacher's
    grid, ``radius`` the LF radius as a fraction of Nyquist, as ``framer.radius``) carries nothing
    above the LF radius: its HF band is interpolation leakage. ``skip`` drops those students' HF
    terms (False in the mask), ``keep`` keeps every one. The LF terms and the students' role as
    negatives are untouched (the objective multiplies the HF term of layer ``i`` by ``mask[i]``).
    """
    if mode not in ("skip", "keep"):
        raise ValueError(f"config key 'pisasr.hf_coarse': {mode!r} is not allowed; allowed values: "
                         "'skip', 'keep'")
    if mode == "keep":
        return torch.ones(len(student_grids), dtype=torch.bool)
    big, bigw = teacher_grid
    return torch.tensor([not (h <= radius * big and w <= radius * bigw) for h, w in student_grids],
                        dtype=torch.bool)
