"""The EMA (``parallel/ema.py``) under DeepSpeed: where its tensors come from, its files, and its
full tensors for export.

ZeRO-3: each rank averages its own fp32 master partition (safe_get_local_fp32_param), saved per
rank (``ema_rank00000.pt``, ...); a world-size change re-slices the concatenated partitions
(ZeRO-3 splits every flattened parameter into equal, end-padded chunks in rank order).
ZeRO-0/1/2: the module weights are full on every rank after the step; they are averaged in fp32
(in bf16 runs the source is the bf16 copy of the weights) and rank 0 saves them
(``ema_full.pt``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from framer_dist.parallel.ema import EMA
from framer_dist.parallel.names import strip_wrapper_prefixes
from framer_dist.safe_load import load_torch

FULL_FILE = "ema_full.pt"


def _rank_file(rank: int) -> str:
    return f"ema_rank{rank:05d}.pt"


class ZeroEMALayout:
    """How the EMA of the trainable parameters ``trainable`` of ``module`` (the engine's module)
    is laid out over the ranks and the checkpoint files for a ZeRO ``stage``."""

    def __init__(self, module: nn.Module, trainable: Iterable[str], stage: int, rank: int,
                 world_size: int) -> None:
        names = set(trainable)
        self.params = [(n, p) for n, p in module.named_parameters() if n in names]
        self.z3 = stage == 3
        self.rank, self.world_size = rank, world_size

    def source(self) -> Iterator[tuple[str, Tensor]]:
        """The EMA's source (``EMA(layout.source, decay)``): this rank's fp32 master partition
        (ZeRO-3) or the module weights."""
        if self.z3:
            from deepspeed.utils import safe_get_local_fp32_param

            for n, p in self.params:
                yield n, safe_get_local_fp32_param(p).reshape(-1)
        else:
            yield from ((n, p.data) for n, p in self.params)

    def save(self, ema: EMA, path: Path) -> None:
        state = {n: t.cpu() for n, t in ema.state_dict().items()}
        if self.z3:
            torch.save(state, path / _rank_file(self.rank))
        elif self.rank == 0:
            torch.save(state, path / FULL_FILE)

    @torch.no_grad()
    def load(self, ema: EMA, path: Path, saved_world: int) -> bool:
        """Load the EMA state that ``path`` (written on ``saved_world`` ranks) holds into ``ema``;
        False when it holds none."""
        if not (path / FULL_FILE).is_file() and not (path / _rank_file(0)).is_file():
            return False
        if (path / FULL_FILE).is_file():
            full = load_torch(path / FULL_FILE)
        elif saved_world == self.world_size and self.z3:
            ema.load_state_dict(load_torch(path / _rank_file(self.rank)))
            return True
        else:
            parts = [load_torch(path / _rank_file(r)) for r in range(saved_world)]
            full = {n: torch.cat([pt[n] for pt in parts]) for n in parts[0]}
        shadow = ema.state_dict()
        sliced = {}
        for n, p in self.params:
            flat = full[n].reshape(-1)
            if self.z3:
                numel = int(p.ds_numel)
                part = shadow[n].numel()
                flat = torch.nn.functional.pad(flat[:numel], (0, part * self.world_size - numel))
                sliced[n] = flat[self.rank * part:(self.rank + 1) * part]
            else:
                sliced[n] = flat[:p.numel()].view_as(shadow[n])
        ema.load_state_dict(sliced)
        return True

    def full(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """The EMA's ``state_dict()`` as full CPU tensors on rank 0 (collective under ZeRO-3)."""
        out: dict[str, Tensor] = {}
        for n, p in self.params:
            t = sd[n]
            if self.z3 and self.world_size > 1:
                parts = [torch.empty_like(t) for _ in range(self.world_size)]
                dist.all_gather(parts, t.contiguous())
                t = torch.cat(parts)
            if self.rank == 0:
                shape = p.ds_shape if self.z3 else p.shape
                out[strip_wrapper_prefixes(n)] = t[: int(torch.Size(shape).numel())].reshape(shape).cpu().clone()
        return out
