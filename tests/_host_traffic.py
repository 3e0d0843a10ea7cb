"""A dispatch mode that records ops reading the device back or bringing new host data in (used
to check that the degradation's device step is CUDA-graph safe)."""

from __future__ import annotations

import torch
import torch.utils._python_dispatch


class HostTrafficRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that read the device back or bring new host data in."""

    def __init__(self) -> None:
        super().__init__()
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name in ("aten._local_scalar_dense", "aten.lift_fresh", "aten.lift_fresh_copy", "aten.lift"):
            self.bad.append(name)
        if name in ("aten._to_copy", "aten.copy_", "aten.to"):
            src = args[1] if name == "aten.copy_" else args[0]
            dst = args[0].device if name == "aten.copy_" else kwargs.get("device", src.device)
            if isinstance(src, torch.Tensor) and torch.device(dst) != src.device:
                self.bad.append(f"{name} {src.device}->{dst}")
        return func(*args, **kwargs)
