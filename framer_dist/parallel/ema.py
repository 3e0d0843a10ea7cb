"""The exponential moving average of the trainable parameters."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


class EMA:
    """Exponential moving average of the trainable parameters, kept in fp32.

    The averaged tensors have the same kind as the parameters the backend owns: full tensors
    (none, ZeRO-2), DTensor shards (FSDP2: DCP saves and reshards them like the model).
    """

    def __init__(self, named: Iterable[tuple[str, Tensor]], decay: float) -> None:
        self.decay = decay
        self.shadow: dict[str, Tensor] = {n: t.detach().float().clone() for n, t in named}

    @torch.no_grad()
    def update(self, named: Iterable[tuple[str, Tensor]]) -> None:
        for n, t in named:
            self.shadow[n].lerp_(t.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(sd)
        if missing:
            raise KeyError(f"EMA state in the checkpoint lacks {sorted(missing)[:5]}")
        for n, t in self.shadow.items():
            t.copy_(sd[n])
