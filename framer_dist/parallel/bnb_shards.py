"""bitsandbytes AdamW8bit on FSDP2's local shards, with a DCP-friendly (reshardable) state.

Why not torchao's FSDP2-aware AdamW8bit: it torch.compiles every parameter's update (minutes of
inductor/C++ builds on CPU, a per-rank cache to manage) and it would be one more heavy dependency;
bitsandbytes is already the 8-bit optimizer of the DeepSpeed path, so both backends share the same
update rule and state format. bitsandbytes rejects DTensors, so it is built on each parameter's
local shard (a view of FSDP2's sharded storage, so its in-place update is the parameter's update).

Checkpoints hold the state twice, small as it is: (1) each rank's raw bitsandbytes state (uint8
codes + block absmax) in a per-rank file, loaded bit for bit when the world size is unchanged; (2)
the moments dequantised to fp32 and wrapped as DTensors with the parameter's sharding, which DCP
reshards on a world-size change and which are quantised again on load. (2) alone is not exact: the
signed 8-bit map has no code for -1.0, so a block whose largest moment is negative gets a slightly
different absmax after a dequantise/quantise round trip.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from framer_dist.parallel.optim import param_groups

BLOCK = 256          # bitsandbytes' optimizer block size
MIN_8BIT = 4096      # same rule as bitsandbytes: smaller parameters keep 32-bit state


def _adamw8bit_cls():
    import bitsandbytes as bnb

    class _ShardAdamW8bit(bnb.optim.AdamW8bit):
        """Decides 8-bit vs 32-bit state by the FULL parameter size, not the shard size, so the
        choice does not depend on the world size."""

        full_numel: dict[int, int] = {}

        def get_config(self, gindex, pindex, group):
            config = super().get_config(gindex, pindex, group)
            p = self.param_groups[gindex]["params"][pindex]
            config["min_8bit_size"] = 0 if self.full_numel.get(id(p), 0) >= MIN_8BIT else 1 << 62
            return config

    return _ShardAdamW8bit


class ShardedAdamW8bit:
    """Optimizer-like wrapper: `.step()`, `.zero_grad()`, `.param_groups`, DCP state helpers."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], no_decay: tuple[str, ...] = (),
                 **kw: Any) -> None:
        self.named = [(n, p) for n, p in named_params]
        self.locals: dict[str, Tensor] = {}
        with torch.no_grad():
            for n, p in self.named:
                loc = p.to_local() if isinstance(p, DTensor) else p.data
                if loc.numel() > 0:  # a rank can own an empty shard of a small parameter
                    self.locals[n] = loc
        cls = _adamw8bit_cls()
        # a placeholder keeps bitsandbytes happy on a rank that owns no shard at all
        tensors = list(self.locals.values()) or [torch.zeros(1)]
        names = list(self.locals) or [""]
        self.opt = cls(param_groups(tensors, names, no_decay), **kw)
        self.opt.full_numel = {id(self.locals[n]): p.numel() for n, p in self.named if n in self.locals}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.opt.param_groups

    def step(self) -> None:
        for n, p in self.named:
            if n in self.locals:
                g = p.grad
                self.locals[n].grad = None if g is None else (g.to_local() if isinstance(g, DTensor) else g)
        self.opt.step()
        for loc in self.locals.values():
            loc.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, p in self.named:
            p.grad = None

    # -- state -----------------------------------------------------------------------------------
    def _like(self, p: nn.Parameter, local: Tensor) -> Tensor:
        if isinstance(p, DTensor):
            return DTensor.from_local(local, device_mesh=p.device_mesh, placements=p.placements,
                                      shape=p.shape, stride=p.stride(), run_check=False)
        return local

    def _moments(self, n: str, p: nn.Parameter) -> tuple[Tensor, Tensor, int]:
        """fp32 (exp_avg, exp_avg_sq, step) of the local shard."""
        import bitsandbytes.functional as F

        loc_shape = (p.to_local() if isinstance(p, DTensor) else p).shape
        st = self.opt.state.get(self.locals[n]) if n in self.locals else None
        if not st:
            z = torch.zeros(loc_shape, dtype=torch.float32, device=p.device)
            return z, z.clone(), 0
        out = []
        for i in (1, 2):
            s = st[f"state{i}"]
            if s.dtype == torch.uint8:
                s = F.dequantize_blockwise(s, absmax=st[f"absmax{i}"], code=st[f"qmap{i}"],
                                           blocksize=BLOCK)
            out.append(s.float().reshape(loc_shape).clone())
        return out[0], out[1], int(st["step"])

    def dcp_state(self) -> dict[str, Any]:
        """{name: {exp_avg, exp_avg_sq (DTensors), step}} plus the param groups' hyper-parameters."""
        state: dict[str, Any] = {}
        for n, p in self.named:
            m, v, step = self._moments(n, p)
            state[n] = {"exp_avg": self._like(p, m), "exp_avg_sq": self._like(p, v),
                        "step": torch.tensor(float(step))}
        return state

    @torch.no_grad()
    def load_dcp_state(self, state: dict[str, Any]) -> None:
        """Quantise loaded fp32 moments back into the bitsandbytes state."""
        import bitsandbytes.functional as F

        for gi, group in enumerate(self.opt.param_groups):
            for pi, loc in enumerate(group["params"]):
                name = next((n for n, t in self.locals.items() if t is loc), None)
                if name is None:
                    continue
                st = self.opt.state[loc]
                if not st:
                    self.opt.init_state(group, loc, gi, pi)
                    st = self.opt.state[loc]
                ent = state[name]
                st["step"] = int(ent["step"].item())
                for i, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
                    val = ent[key]
                    val = (val.to_local() if isinstance(val, DTensor) else val).reshape(-1).float()
                    if st[f"state{i}"].dtype == torch.uint8:
                        q, qs = F.quantize_blockwise(val.contiguous(), code=st[f"qmap{i}"],
                                                     blocksize=BLOCK)
                        st[f"state{i}"].copy_(q.view_as(st[f"state{i}"]))
                        st[f"absmax{i}"].copy_(qs.absmax)
                    else:
                        st[f"state{i}"].copy_(val.view_as(st[f"state{i}"]))

    # -- raw per-rank state (exact resume on the same world size) ---------------------------------
    def raw_state(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for n, loc in self.locals.items():
            st = self.opt.state.get(loc)
            if st:
                out[n] = {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in st.items()}
        return out

    @torch.no_grad()
    def load_raw_state(self, raw: dict[str, dict[str, Any]]) -> None:
        if set(raw) - set(self.locals):
            raise KeyError(f"8-bit optimizer state for unknown parameters {sorted(set(raw) - set(self.locals))[:5]}")
        for n, st in raw.items():
            loc = self.locals[n]
            self.opt.state[loc] = {k: (v.to(loc.device).clone() if isinstance(v, Tensor) else v)
                                   for k, v in st.items()}
