"""Joining the launcher's process group: the device, the local rank, and the one check of the
launch environment (torchrun / deepspeed variables) for every backend."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from framer_dist.config import ConfigError, TrainConfig


def resolve_device(t: TrainConfig, local_rank: int) -> torch.device:
    """train.device: 'auto' -> cuda:<local_rank> if CUDA is there, else cpu."""
    want = t.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("config key 'train.device': 'cuda' requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def local_rank_from_env(argv: list[str] | None = None) -> int:
    """LOCAL_RANK from the env (torchrun, deepspeed launcher), else a `--local_rank N` argument."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    argv = sys.argv if argv is None else argv
    for i, a in enumerate(argv):
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            return int(a.split("=", 1)[1])
        if a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            return int(argv[i + 1])
    return 0


def launcher_problem(backend_name: str, env: dict[str, str] | None = None) -> str | None:
    """Why the launcher's environment does not fit ``parallel.backend`` (None when it does): a
    distributed backend needs torchrun's / deepspeed's variables, ``none`` is one process. The one
    check of the launch, used up front (``preflight``), by ``setup_backend`` and before joining
    the process group."""
    env = os.environ if env is None else env
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if backend_name != "none" and missing:
        return (f"config key 'parallel.backend': {backend_name!r} needs a distributed launcher, "
                f"but {', '.join(missing)} are not set: start it with `torchrun --nproc-per-node N "
                "framer_dist/train.py ...` or `deepspeed framer_dist/train.py ...` (one process is "
                "fine), or use --backend none for a plain single process")
    world = int(env.get("WORLD_SIZE", "1"))
    if backend_name == "none" and world > 1:
        return (f"config key 'parallel.backend': 'none' is single-process, but this was launched "
                f"with WORLD_SIZE={world}; use --backend fsdp2 or --ds JSON")
    return None


def init_process_group(backend_name: str, device_type: str) -> tuple[int, int, int]:
    """Join (or reuse) the default process group from launcher env vars; returns (rank, world, local_rank).

    gloo on CPU, nccl on CUDA. A distributed backend launched without the env gets a clear error
    instead of DeepSpeed's mpi4py traceback or a hang.
    """
    local_rank = local_rank_from_env()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    problem = launcher_problem(backend_name)
    if problem:
        raise ConfigError(problem)
    pg_backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(pg_backend, timeout=timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), local_rank


def join_process_group(backend_name: str, t: TrainConfig) -> tuple[torch.device, int, int, int]:
    """A distributed backend's start: this process's device (train.device on the launcher's
    local rank), then (rank, world size, local rank) from :func:`init_process_group`."""
    device = resolve_device(t, local_rank_from_env())
    return (device, *init_process_group(backend_name, device.type))
