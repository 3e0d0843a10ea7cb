"""The exponential moving average of the trainable parameters: one class for every backend."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

# yields (name, tensor) for the tensors to average, in the form the backend owns them
Source = Callable[[], Iterable[tuple[str, Tensor]]]


class EMA:
    """Exponential moving average of the trainable parameters, kept in fp32.

    ``source()`` gives the tensors to average as the backend owns them, so the averages have the
    same kind: full tensors (none; DeepSpeed ZeRO-0/1/2, the module weights), DTensor shards
    (FSDP2: DCP saves and reshards them like the model), this rank's flat fp32 master partition
    (ZeRO-3, ``parallel/deepspeed/ema.py``). Every backend uses it the same way: ``update()``
    after each optimizer step, ``state_dict()`` / ``load_state_dict()`` in its checkpoint,
    ``reset()`` when a checkpoint has no EMA state; it turns ``state_dict()`` into full tensors
    for export as it does its parameters (``Backend.ema_state_dict``).
    """

    def __init__(self, source: Source, decay: float) -> None:
        self.source = source
        self.decay = decay
        self.shadow: dict[str, Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Start again from the current values of the source."""
        self.shadow = {n: t.detach().float().clone() for n, t in self.source()}

    @torch.no_grad()
    def update(self) -> None:
        for n, t in self.source():
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
