"""The EMA (``parallel/ema.py``) under DeepSpeed: where its tensors come from, its files, and its
full tensors for export.

ZeRO-3: each rank averages its own fp32 master partition (safe_get_local_fp32_param), saved per
rank (``ema_rank00000.pt``, ...); a world-size change re-slices the concatenated partitions
(ZeRO-3 splits every flattened parameter into equal, end-padded chunks in rank order).
ZeRO-0/1/2: the module weights are full on every rank after the step; they are averaged in fp32
(in bf16 runs the source is the bf16 copy of the weights) and rank 0 saves them
(``ema_full.pt``). :func:`read_full` puts either layout back together in one process (for
``read_checkpoint_weights(..., ema=True)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

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


def read_full(path: Path, saved_world: int,
              shapes: Callable[[], Mapping[str, tuple[int, ...]]]) -> dict[str, Tensor]:
    """The EMA in the checkpoint folder ``path`` as full fp32 CPU tensors, in one process, by the
    names ``save`` wrote (the engine module's; ``{}`` when it holds none: train.ema was off).
    ZeRO-0/1/2: ``ema_full.pt`` as it is. ZeRO-3: the ``saved_world`` ranks' flat partitions
    concatenated in rank order, the end padding cut off, reshaped to the parameter's shape from
    ``shapes()`` (by the same names; called only here). Reads through :func:`load_torch`; a
    missing rank file is its one-line error, partitions that do not fit together a
    ``ValueError``."""
    if (path / FULL_FILE).is_file():
        full = load_torch(path / FULL_FILE)
        if not isinstance(full, dict) or not all(isinstance(t, Tensor) for t in full.values()):
            raise ValueError(f"{path / FULL_FILE} holds no tensors by name")
        return full
    if not (path / _rank_file(0)).is_file():
        return {}
    parts = [load_torch(path / _rank_file(r)) for r in range(saved_world)]
    names = list(parts[0])
    for r, part in enumerate(parts):
        if (not isinstance(part, dict) or set(part) != set(names)
                or not all(isinstance(t, Tensor) for t in part.values())):
            raise ValueError(f"{path / _rank_file(r)} does not hold the partitions of the "
                             f"parameters {path / _rank_file(0)} holds")
    full_shapes = shapes()
    out: dict[str, Tensor] = {}
    for n in names:
        if n not in full_shapes:
            raise ValueError(f"DeepSpeed's module states name no parameter {n!r} of "
                             f"{path / _rank_file(0)}")
        shape = torch.Size(full_shapes[n])
        flat = torch.cat([part[n].reshape(-1) for part in parts])
        if not 0 <= flat.numel() - shape.numel() < saved_world:  # end padding: under one per rank
            raise ValueError(f"the {saved_world} EMA partitions of {n!r} hold {flat.numel()} "
                             f"values, its shape {tuple(shape)} needs {shape.numel()}")
        out[n] = flat[:shape.numel()].reshape(shape).clone()
    return out
