"""The LR-conditioned SD3/SD3.5 transformer (DiT4SR design) with the FRAMER per-layer readout.

Subclasses diffusers' ``SD3Transformer2DModel`` so the pretrained weights keep their names; the
blocks become :class:`DiT4SRBlock`. Forward (docs/specs/dit4sr.md):
``h = [pos_embed(z_t) | pos_embed(z_lr)]`` -> blocks (each ``(c, h)``) -> noisy half -> the
frozen head ``norm_out(., temb)``, ``proj_out``, unpatchify.

Readout (docs/specs/framer.md section 1): with ``readout="velocity"`` every block's noisy half goes
through that same head; ``"hidden"`` gives the raw noisy tokens as a grid. The readout is computed
inside the per-block function and *returned* from it, never captured by hooks, so it exists exactly
once per block per forward whatever the activation checkpointing. A checkpointed block's function
is block + head, so backward recomputes the full-width per-layer tokens instead of keeping them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, NamedTuple

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from torch.utils.checkpoint import checkpoint

from framer_dist.models import block_indices

from .block import DiT4SRBlock

Readout = Literal["velocity", "hidden"] | None


class DiT4SROutput(NamedTuple):
    """A named tuple so ZeRO-3 and FSDP2 hooks see the tensors inside (they walk tuples)."""

    sample: torch.Tensor                    # [B, 16, H, W] velocity
    features: torch.Tensor | None = None    # [L, B, C, h, w] per-block readout, or None


@dataclass
class ReadoutStats:
    """How often the readout head ran: in forward passes, and recomputed inside backward."""

    forward: int = 0
    recomputed: int = 0


class DiT4SRTransformer(SD3Transformer2DModel):
    """SD3/SD3.5 MMDiT with the LR image as a second image-token stream."""

    # The output head, which the velocity readout runs after every block: distributed backends
    # may keep it gathered (parallel.zero3_persist_head).
    readout_head_modules = ("norm_out", "proj_out")

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
        lr_injection_scale: float = 1.2,
    ):
        super().__init__(
            sample_size=sample_size, patch_size=patch_size, in_channels=in_channels,
            num_layers=num_layers, attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads, joint_attention_dim=joint_attention_dim,
            caption_projection_dim=caption_projection_dim,
            pooled_projection_dim=pooled_projection_dim, out_channels=out_channels,
            pos_embed_max_size=pos_embed_max_size, dual_attention_layers=tuple(dual_attention_layers),
            qk_norm=qk_norm,
        )
        self.transformer_blocks = torch.nn.ModuleList(
            [DiT4SRBlock.from_block(b, lr_injection_scale) for b in self.transformer_blocks])
        self._ac_indices: frozenset[int] = frozenset()
        self.readout_stats = ReadoutStats()

    # ------------------------------------------------------------------ configuration

    @property
    def num_blocks(self) -> int:
        return len(self.transformer_blocks)

    @property
    def lr_injection_scale(self) -> float:
        return self.transformer_blocks[0].lr_injection_scale

    @lr_injection_scale.setter
    def lr_injection_scale(self, value: float) -> None:
        for b in self.transformer_blocks:
            b.lr_injection_scale = float(value)
        self.register_to_config(lr_injection_scale=float(value))

    def init_control_layers(self) -> None:
        """Reset every new layer to the DiT4SR initial state (after loading stock weights)."""
        for b in self.transformer_blocks:
            b.init_control_layers()

    @property
    def head_trainable(self) -> bool:
        """Whether any output-head parameter (``norm_out``, ``proj_out``) is trained."""
        return any(p.requires_grad for m in (self.norm_out, self.proj_out) for p in m.parameters())

    def set_activation_checkpointing(self, indices: Iterable[int]) -> None:
        """Recompute the listed blocks in backward (with their readout when the head is trained,
        see :meth:`forward`); ``[]`` turns it off."""
        self._ac_indices = block_indices(indices, self.num_blocks)

    @property
    def activation_checkpointing(self) -> frozenset[int]:
        return self._ac_indices

    # ------------------------------------------------------------------ forward

    def _check_inputs(self, z: torch.Tensor, lr: torch.Tensor, timestep: torch.Tensor,
                      context: torch.Tensor, pooled: torch.Tensor, readout: Readout) -> None:
        cfg = self.config
        c_in, p = cfg.in_channels, cfg.patch_size
        if readout not in (None, "velocity", "hidden"):
            raise ValueError(f"readout must be None, 'velocity' or 'hidden', got {readout!r}")
        if z.ndim != 4 or z.shape[1] != c_in:
            raise ValueError(f"hidden_states (noisy latent) must be [B, {c_in}, H, W], "
                             f"got {tuple(z.shape)}")
        if lr.ndim != 4 or lr.shape[1] != c_in:
            raise ValueError(f"lr_latent must be [B, {c_in}, H, W], got {tuple(lr.shape)}")
        if lr.shape != z.shape:
            raise ValueError(f"lr_latent {tuple(lr.shape)} must have the size of the noisy latent "
                             f"{tuple(z.shape)} (upsample the LR image before VAE encoding)")
        h, w = z.shape[-2:]
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}")
        m = cfg.pos_embed_max_size
        if m and (h // p > m or w // p > m):
            raise ValueError(f"latent size {h}x{w} exceeds the positional embedding range "
                             f"{m * p}x{m * p}; tile the input")
        b = z.shape[0]
        if timestep.ndim != 1 or timestep.shape[0] != b:
            raise ValueError(f"timestep must be [B={b}], got {tuple(timestep.shape)}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states must be [B={b}, T, {cfg.joint_attention_dim}], "
                             f"got {tuple(context.shape)}")
        if pooled.ndim != 2 or pooled.shape != (b, cfg.pooled_projection_dim):
            raise ValueError(f"pooled_projections must be [B={b}, {cfg.pooled_projection_dim}], "
                             f"got {tuple(pooled.shape)}")

    def _head(self, x: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The output head on the noisy tokens (the first ``h * w`` of ``x [B, >= N, D]``) ->
        velocity ``[B, C, H, W]``. The slice is inside so that a compiled head writes the gradient
        of the whole ``[X | L]`` token tensor in its own backward kernel (slicing outside costs a
        zero fill and a copy per readout)."""
        x = x[:, : grid[0] * grid[1]]
        y = self.proj_out(self.norm_out(x, temb))
        h, w = grid
        p, c = self.config.patch_size, self.out_channels
        y = y.reshape(y.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", y).reshape(y.shape[0], c, h * p, w * p)

    def compile_head(self, **compile_kwargs: Any) -> None:
        """torch.compile the output head (used once per block by the velocity readout).
        The readout counter lives in ``_readout``, outside the compiled function."""
        self._head = torch.compile(self._head, **compile_kwargs)  # type: ignore[method-assign]

    def _readout(self, h: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int],
                 mode: str) -> torch.Tensor:
        # Counted so tests can prove exactly-once capture; inside backward it is a recomputation.
        if torch._C._current_graph_task_id() == -1:
            self.readout_stats.forward += 1
        else:
            self.readout_stats.recomputed += 1
        if mode == "velocity":
            return self._head(h, temb, grid)
        x = h[:, : grid[0] * grid[1]]
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid[0], grid[1])

    def _block_step(self, block: DiT4SRBlock, h: torch.Tensor, c: torch.Tensor, temb: torch.Tensor,
                    grid: tuple[int, int], readout: Readout
                    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        c, h = block(h, c, temb, grid)
        return c, h, (self._readout(h, temb, grid, readout) if readout else None)

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        lr_latent: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        readout: Readout = None,
    ) -> DiT4SROutput:
        self._check_inputs(hidden_states, lr_latent, timestep, encoder_hidden_states,
                           pooled_projections, readout)
        # Inputs follow the compute dtype of the weights (e.g. fp32 latents into a bf16 model).
        dt = self.pos_embed.proj.weight.dtype
        hidden_states, lr_latent = hidden_states.to(dt), lr_latent.to(dt)
        encoder_hidden_states, pooled_projections = encoder_hidden_states.to(dt), pooled_projections.to(dt)
        b = hidden_states.shape[0]
        p = self.config.patch_size
        grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
        # The same frozen patch + positional embedding for both latents, in one call.
        tokens = self.pos_embed(torch.cat([hidden_states, lr_latent], dim=0))
        h = torch.cat([tokens[:b], tokens[b:]], dim=1)  # [B, 2N, D] = [X | L]
        temb = self.time_text_embed(timestep, pooled_projections)
        c = self.context_embedder(encoder_hidden_states)

        ac = self._ac_indices if not self.gradient_checkpointing else range(self.num_blocks)
        # Where the readout of a checkpointed block runs. A frozen head with a frozen modulation
        # (control, LoRA) runs it after the checkpoint: its backward needs only the block output,
        # which the next checkpoint holds anyway, and per-token norm statistics, so recomputing
        # it in backward would save no memory (on an H100 it cost ~8 ms of a 0.75 s step). A
        # trainable head or time embedding (full fine-tune) would keep the normalised [B, N, D]
        # tokens per layer for their gradients: there it stays inside and is recomputed.
        trained = self.head_trainable or temb.requires_grad
        inner = readout if readout is not None and trained else None
        feats = []
        for i, block in enumerate(self.transformer_blocks):
            if i in ac and torch.is_grad_enabled():
                c, h, f = checkpoint(self._block_step, block, h, c, temb, grid, inner,
                                     use_reentrant=False)
                if readout is not None and inner is None:
                    f = self._readout(h, temb, grid, readout)
            else:
                c, h, f = self._block_step(block, h, c, temb, grid, readout)
            if f is not None:
                feats.append(f)

        if readout is None:
            return DiT4SROutput(sample=self._head(h, temb, grid))
        features = torch.stack(feats)
        # With the velocity readout the last block's readout *is* the output: reuse it (the
        # block's own tensor, not a view of the stack: FSDP2 warns on view outputs).
        sample = feats[-1] if readout == "velocity" else self._head(h, temb, grid)
        return DiT4SROutput(sample=sample, features=features)

