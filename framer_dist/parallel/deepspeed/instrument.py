"""Counting what ZeRO-3's parameter coordinator does, for benchmarks (bench/train_step.py) and
tests. It patches DeepSpeed's coordinator class while active, so the runtime never imports it."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn


@contextlib.contextmanager
def zero3_fetch_counter() -> Iterator[dict[str, int]]:
    """Count what ZeRO-3's parameter coordinator does inside the block (for benchmarks and tests;
    it patches the coordinator class while active): ``hook_fetches`` (module fetch requests from
    the forward/backward hooks), ``allgathers`` (coalesced all-gather launches, prefetches
    included), ``params_gathered`` / ``numel_gathered``, ``releases`` (parameters partitioned
    again). The once-per-step gather of persistent parameters after the optimizer step goes
    around the coordinator and is not counted."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    cls = ppc.PartitionedParameterCoordinator
    gather_name = "_PartitionedParameterCoordinator__all_gather_params_"
    release_name = "_PartitionedParameterCoordinator__release_param"
    orig_fetch, orig_gather, orig_release = (cls.fetch_sub_module, getattr(cls, gather_name),
                                             getattr(cls, release_name))
    counts = {"hook_fetches": 0, "allgathers": 0, "params_gathered": 0, "numel_gathered": 0,
              "releases": 0}
    unavailable = ppc.ZeroParamStatus.NOT_AVAILABLE

    def fetch(self: Any, sub_module: nn.Module, forward: bool) -> None:
        counts["hook_fetches"] += 1
        return orig_fetch(self, sub_module, forward)

    def gather(self: Any, params: Any, forward: bool, quantize: bool = False) -> None:
        todo = [p for p in params if p.ds_status == unavailable]
        if todo:
            counts["allgathers"] += 1
            counts["params_gathered"] += len(todo)
            counts["numel_gathered"] += sum(p.ds_numel for p in todo)
        return orig_gather(self, params, forward, quantize)

    def release(self: Any, param: Any, free_data: bool = True) -> None:
        if param.ds_status == ppc.ZeroParamStatus.AVAILABLE and not param.ds_active_sub_modules:
            counts["releases"] += 1
        return orig_release(self, param, free_data)

    cls.fetch_sub_module = fetch
    setattr(cls, gather_name, gather)
    setattr(cls, release_name, release)
    try:
        yield counts
    finally:
        cls.fetch_sub_module = orig_fetch
        setattr(cls, gather_name, orig_gather)
        setattr(cls, release_name, orig_release)
