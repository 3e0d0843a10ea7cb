"""Data-parallel backends: `none` (one process), `deepspeed` (ZeRO-2/3), `fsdp2`.

All backend-specific code lives in this package; the trainer codes against :class:`Backend`.
This module builds a backend from the config (:func:`setup_backend`) and runs its pre-flight
checks (:func:`check_backend`); the modules by job are listed in docs/distributed.md.
"""

from __future__ import annotations

import os

from torch import nn

from framer_dist.config import Config, ConfigError, ParallelConfig
from framer_dist.parallel.base import Backend, BackendConfig
from framer_dist.parallel.blocks import apply_activation_checkpointing, transformer_blocks
from framer_dist.parallel.optim import resolve_grad_accum
from framer_dist.parallel.process_group import launcher_problem, resolve_device
from framer_dist.parallel.weights import read_checkpoint_weights

__all__ = ["Backend", "setup_backend", "check_backend", "read_checkpoint_weights"]


def check_backend(cfg: Config, world: int, on_this_machine: bool = True) -> None:
    """The backend's own pre-flight checks, before any process group (``preflight.check_paths``):
    the global batch divides over ``world`` ranks; DeepSpeed's JSON against our config (parsed
    and checked here, once, by the builder the backend uses); the launcher's environment
    (skipped by a submitter on a login node)."""
    bc = BackendConfig.from_config(cfg)
    accum = resolve_grad_accum(bc.train, bc.micro_batch, world)
    if cfg.parallel.backend == "deepspeed":
        from framer_dist.parallel.deepspeed.config import build_ds_config
        build_ds_config(bc, accum, world)
    if on_this_machine and (problem := launcher_problem(cfg.parallel.backend,
                                                        {**os.environ, "WORLD_SIZE": str(world)})):
        raise ConfigError(problem)


def setup_backend(cfg: Config, model: nn.Module, params: list[nn.Parameter]) -> Backend:
    """Wrap `model` for training `params` (the trainable ones) with cfg.parallel.backend.

    Applies activation checkpointing (parallel.activation_checkpointing) and, on request,
    torch.compile of each block before wrapping. Distributed backends join the process group from
    the launcher's env vars (torchrun / deepspeed).
    """
    name = cfg.parallel.backend
    if name == "none" and (problem := launcher_problem("none")):
        raise ConfigError(problem)
    apply_activation_checkpointing(cfg.parallel, model)
    _maybe_compile(cfg.parallel, model)  # in place, before DeepSpeed wraps or fully_shard shards the blocks
    bc = BackendConfig.from_config(cfg)  # the backends read only these sections
    if name == "none":
        from framer_dist.parallel.single import SingleBackend

        return SingleBackend(bc, model, params, resolve_device(bc.train, 0))
    if name == "deepspeed":
        from framer_dist.parallel.deepspeed.backend import DeepSpeedBackend

        return DeepSpeedBackend.create(bc, model, params)
    if name == "fsdp2":
        from framer_dist.parallel.fsdp import FSDP2Backend

        return FSDP2Backend.create(bc, model, params)
    raise ConfigError(f"config key 'parallel.backend': unknown backend {name!r}")


def _maybe_compile(p: ParallelConfig, model: nn.Module) -> None:
    """parallel.compile: torch.compile each transformer block in place (names unchanged)."""
    if not p.compile:
        return
    blocks = transformer_blocks(model)
    if not blocks:
        raise ConfigError("config key 'parallel.compile': the model has no transformer_blocks to compile")
    for b in blocks:
        b.compile()
    compile_head(model)


def compile_head(model: nn.Module) -> None:
    """Also compile the model's output head where it has one: the FRAMER readout runs it after
    every block, and in eager mode its norm/modulation/cast kernels were most of the FRAMER step
    overhead on an H100 (bench/results/h100/)."""
    if hasattr(model, "compile_head"):
        model.compile_head()
