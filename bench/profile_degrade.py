#!/usr/bin/env python
"""Profile one batched degradation call (torch.profiler): where the time goes, per op."""

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--res", type=int, default=512)
    a = ap.parse_args()
    hr = hr_batch(a.batch, a.res, a.device)
    for i in range(3):
        degrade(hr, list(range(i * 100, i * 100 + a.batch)))
    acts = [torch.profiler.ProfilerActivity.CPU]
    if a.device.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        t = time.perf_counter()
        degrade(hr, list(range(1000, 1000 + a.batch)))
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        print("wall ms", 1000 * (time.perf_counter() - t))
    key = "self_cuda_time_total" if a.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25))


if __name__ == "__main__":
    main()
