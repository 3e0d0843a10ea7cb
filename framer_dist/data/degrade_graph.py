"""The batched degradation replayed from CUDA graphs: one launch instead of ~1,600 small ones.

:class:`GraphedDegrader` keeps one captured :class:`torch.cuda.CUDAGraph` per (batch size, H, W,
dtype, device, :class:`~.degrade_plan.DegradeParams`). A call plans on the CPU with a *static
canvas* (every batch of that key has the same tensor shapes, see
:func:`~.degrade_plan.plan_degradation`), copies the packed plan (four pinned buffers, one per
dtype) and the HR batch into the graph's static input buffers, replays
(:func:`~.degrade_run.run_plan`), and returns clones of the static outputs. The outputs equal the
eager batched call's on the same device bit for bit (same kernels, same shapes; tested on CUDA).

Memory: each cached graph holds its private memory pool, i.e. every intermediate of one batched
call at the static canvas (stage 1 up to 1.5 H x 1.5 W per sample, float32, with int64 noise hash
words of that size), plus the static inputs and outputs. At 512 px,
batch 16, that is of the order of a few GB (``bench/degrade.py`` records the reserved memory);
call :meth:`GraphedDegrader.clear` to free it.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from torch import Tensor

from .degrade_plan import DegradeParams, DegradePlan, check_inputs, plan_degradation
from .degrade_run import full_fp32, prepare_device, run_plan


class _Captured:
    """One captured graph with its static inputs (HR batch, packed plan buffers) and outputs."""

    def __init__(self, hr: Tensor, plan: DegradePlan, warmup: int) -> None:
        buffers, self.layout = plan.packed()
        self.buffers = {d: b.to(hr.device) for d, b in buffers.items()}
        self.plan = plan.with_buffers(self.buffers, self.layout)
        self.hr = hr.clone()
        prepare_device(hr.device, plan.p, plan.hw)      # cached tables exist before the capture
        side = torch.cuda.Stream(hr.device)
        side.wait_stream(torch.cuda.current_stream(hr.device))
        # warm-up on a side stream (PyTorch's rule for capture): cuBLAS/cuDNN handles, workspaces
        with torch.cuda.stream(side), full_fp32():
            for _ in range(warmup):
                run_plan(self.hr, self.plan)
        torch.cuda.current_stream(hr.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a DataLoader's pin-memory thread) may go on
        with full_fp32(), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = run_plan(self.hr, self.plan)

    def __call__(self, hr: Tensor, plan: DegradePlan) -> dict[str, Tensor]:
        buffers, layout = plan.packed(pin=True)
        if layout != self.layout:
            raise RuntimeError("degradation plan layout changed under a cached CUDA graph "
                               "(plans for graphs must use static_canvas=True)")
        for d, b in buffers.items():
            # pinned staging from the caching host allocator: it is not reused before this copy ran
            self.buffers[d].copy_(b, non_blocking=True)
        self.hr.copy_(hr)
        self.graph.replay()
        return {k: v.clone() for k, v in self.out.items()}


class GraphedDegrader:
    """Callable like :func:`~.degrade.degrade` (CUDA only): plans on the CPU, replays a graph."""

    def __init__(self, warmup: int = 3, max_graphs: int = 2) -> None:
        if max_graphs < 1:
            raise ValueError(f"GraphedDegrader: max_graphs must be >= 1, got {max_graphs}")
        self.warmup = warmup
        # each graph holds a memory pool of a few GB: keep the most recently used few, so a
        # stream of odd batch sizes (last batches of shards) cannot pile pools up
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()

    def __call__(self, hr: Tensor, seeds: list[int] | Tensor,
                 p: DegradeParams | None = None) -> dict[str, Tensor]:
        if hr.device.type != "cuda":
            raise ValueError(f"GraphedDegrader needs a CUDA tensor, got device {hr.device}")
        p, seeds = check_inputs(hr, seeds, p)
        b, _, H, W = hr.shape
        plan = plan_degradation(seeds, p, (H, W), static_canvas=True)
        key = (b, H, W, hr.dtype, hr.device, p)
        with torch.cuda.device(hr.device):               # capture and replay on hr's GPU
            if key in self._graphs:
                self._graphs.move_to_end(key)
            else:
                while len(self._graphs) >= self.max_graphs:
                    self._graphs.popitem(last=False)     # frees that graph's pool
                self._graphs[key] = _Captured(hr, plan, self.warmup)
            return self._graphs[key](hr, plan)

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every cached graph (and with it its memory pool)."""
        self._graphs.clear()


@functools.lru_cache(maxsize=1)
def default_degrader() -> GraphedDegrader:
    """The process-wide degrader that ``degrade(..., graph=True)`` uses."""
    return GraphedDegrader()
