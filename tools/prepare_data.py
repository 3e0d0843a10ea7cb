#!/usr/bin/env python
"""Offline training pairs: degrade HR crops and cache VAE latents of HR and bicubic-LR.

  python tools/prepare_data.py --images data/hr --out cache/ --vae /models/sd3.5-medium --passes 4
  python tools/prepare_data.py ... --processes 8                 # CPU worker processes
  torchrun --nproc-per-node 8 tools/prepare_data.py ... --device cuda   # one GPU per process

Resumable: finished shards are skipped. Train from the result with data.source='cached',
data.path=<out>.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout
import torch.multiprocessing as mp

from framer_dist.data.captioning import ModelFolderError
from framer_dist.data.prepare import prepare_pairs
from framer_dist.data.sources import DataSourceError
from framer_dist.models import DEFAULT_FAMILY


def _run(worker: int, a: argparse.Namespace, num_workers: int, device: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, a.threads))
    report = prepare_pairs(a.images, a.out, resolution=a.resolution, scale=a.scale, passes=a.passes,
                           seed=a.seed, vae_path=a.vae, shard_size=a.shard_size,
                           batch_size=a.batch_size, worker=worker, num_workers=num_workers,
                           device=device, dtype=a.dtype, min_size=a.min_size, usm=not a.no_usm,
                           limit_shards=a.limit_shards, family=a.family)
    print(f"worker {worker}/{num_workers}: {report.summary()}")


def _spawned(proc: int, a: argparse.Namespace, base: int, total: int) -> None:
    _run(base + proc, a, total, a.device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="HR image folder or tar shard pattern")
    ap.add_argument("--out", required=True, help="output folder of pairs-NNNNN.safetensors")
    ap.add_argument("--vae", default="", help="diffusers VAE folder (or a pipeline folder with vae/); "
                    "'' = the family's tiny random VAE")
    ap.add_argument("--family", default=DEFAULT_FAMILY,
                    help="model family whose latents to cache (its VAE normalisation; model.family)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--passes", type=int, default=1, help="degradations per image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--min-size", type=int, default=64)
    ap.add_argument("--no-usm", action="store_true", help="do not USM-sharpen the HR target")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: one GPU per torchrun process)")
    ap.add_argument("--processes", type=int, default=1, help="worker processes on this machine")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    ap.add_argument("--limit-shards", type=int, default=None, help="write at most this many shards")
    a = ap.parse_args(argv)
    # torchrun / SLURM-style environment: this process is one of world_size workers
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = a.device
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        if a.processes > 1:
            if device != "cpu":
                raise ValueError("--processes > 1 is for CPU workers; use torchrun for GPUs")
            mp.spawn(_spawned, args=(a, rank * a.processes, world * a.processes), nprocs=a.processes)
        else:
            _run(rank, a, world, device)
    # ValueError includes ConfigError: an unknown --family
    except (ModelFolderError, DataSourceError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
