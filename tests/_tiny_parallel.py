"""A tiny stand-in backbone for the parallel/checkpoint tests: a few blocks, a frozen part, and the
model interface the backends rely on (transformer_blocks, num_blocks, set_activation_checkpointing)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

DIM = 64  # 64x64 = 4096: bitsandbytes gives parameters this large real 8-bit state


class TinyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.base = nn.Linear(dim, dim)        # frozen in "control" mode
        self.control = nn.Linear(dim, dim)     # trainable
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.base(self.norm(x))) + 0.5 * torch.tanh(self.control(x))


class TinyModel(nn.Module):
    def __init__(self, dim: int = DIM, blocks: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.transformer_blocks = nn.ModuleList(TinyBlock(dim) for _ in range(blocks))
        self.head = nn.Linear(dim, 8)
        self.register_buffer("pos", torch.linspace(0, 1, dim))
        self._ac: set[int] = set()

    @property
    def num_blocks(self) -> int:
        return len(self.transformer_blocks)

    def set_activation_checkpointing(self, indices) -> None:
        self._ac = set(indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # like diffusers' PatchEmbed: the fp32 buffer (DeepSpeed keeps buffers fp32 in bf16) is
        # cast back to the compute dtype
        h = self.embed(x)
        h = (h + self.pos).to(h.dtype)
        for i, b in enumerate(self.transformer_blocks):
            h = checkpoint(b, h, use_reentrant=False) if i in self._ac and self.training else b(h)
        return self.head(h)


def make_model(seed: int = 0, mode: str = "control") -> tuple[TinyModel, list[nn.Parameter]]:
    torch.manual_seed(seed)
    m = TinyModel()
    for n, p in m.named_parameters():
        p.requires_grad_(mode == "full" or ".control." in n)
    return m, [p for p in m.parameters() if p.requires_grad]


def batch(step: int, rank: int, world: int, micro: int, global_batch: int = 4):
    """The slice of a fixed global batch for (step, rank): the same samples in any world size."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(global_batch, 8, generator=g)
    y = torch.randn(global_batch, 8, generator=g)
    per_rank = global_batch // world
    xs, ys = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
    return [(xs[i:i + micro], ys[i:i + micro]) for i in range(0, per_rank, micro)]
