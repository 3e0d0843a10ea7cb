#!/usr/bin/env python
"""Profile one batched degradation call (torch.profiler): where the time goes, per op.

  python bench/profile_degrade.py                  # CUDA: the eager batched call, then the graphed one
  python bench/profile_degrade.py --only graphed   # one of them (eager | graphed)
  python bench/profile_degrade.py --device cpu     # the eager call on the CPU

The graphed call shows the host side (planning, packing, copies) and one graph launch; its GPU
kernels appear as one replay, so compare its wall time with the eager call's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from degrade import hr_batch  # noqa: E402  (bench/degrade.py)
from framer_dist.data.degrade import degrade  # noqa: E402


def profile(hr: torch.Tensor, batch: int, graph: bool, rows: int) -> None:
    cuda = hr.device.type == "cuda"
    for i in range(3):                                  # warm-up (and the capture when graphed)
        degrade(hr, list(range(i * 100, i * 100 + batch)), batched=True, graph=graph)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        t = time.perf_counter()
        degrade(hr, list(range(1000, 1000 + batch)), batched=True, graph=graph)
        if cuda:
            torch.cuda.synchronize()
        print(f"{'graphed' if graph else 'eager'}: wall ms", 1000 * (time.perf_counter() - t))
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--only", choices=("eager", "graphed"), default=None)
    ap.add_argument("--rows", type=int, default=25)
    a = ap.parse_args()
    hr = hr_batch(a.batch, a.res, a.device)
    modes = [a.only] if a.only else (["eager", "graphed"] if a.device.startswith("cuda") else ["eager"])
    for m in modes:
        profile(hr, a.batch, m == "graphed", a.rows)


if __name__ == "__main__":
    main()
