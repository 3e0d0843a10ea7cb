"""How one optimizer step is made, the same for every backend: the optimizer (AdamW or
bitsandbytes 8-bit AdamW), the LR schedule, and the micro-batches accumulated per step."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from framer_dist.config import ConfigError, TrainConfig


def optimizer_kwargs(t: TrainConfig) -> dict[str, Any]:
    return {"lr": t.lr, "betas": tuple(t.betas), "eps": t.adam_eps, "weight_decay": t.weight_decay}


def no_decay_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes the model keeps out of weight decay (its optional
    ``no_weight_decay`` attribute, e.g. FRAMER_U's alignment heads, whose loss is scale-invariant)."""
    return tuple(getattr(model, "no_weight_decay", ()) or ())


def param_groups(params: list[Any], names: list[str], no_decay: tuple[str, ...]) -> list[Any]:
    """``params`` as one group, or, when some names start with a ``no_decay`` prefix, two: the
    rest, then those with ``weight_decay`` 0."""
    free = {i for i, n in enumerate(names) if no_decay and n.startswith(no_decay)}
    if not free:
        return list(params)
    rest = [p for i, p in enumerate(params) if i not in free]
    groups: list[dict[str, Any]] = [{"params": rest}] if rest else []
    return groups + [{"params": [p for i, p in enumerate(params) if i in free], "weight_decay": 0.0}]


def build_optimizer(t: TrainConfig, params: list[nn.Parameter], names: list[str] | None = None,
                    no_decay: tuple[str, ...] = ()) -> torch.optim.Optimizer:
    """train.optimizer: 'adamw' (torch) or 'adamw8bit' (bitsandbytes, blockwise 8-bit state).
    ``names`` (parallel to ``params``) starting with a ``no_decay`` prefix get no weight decay."""
    if not params:
        raise ValueError("no trainable parameters were passed to the backend (check train.mode)")
    kw = optimizer_kwargs(t)
    groups = param_groups(params, names or [""] * len(params), no_decay)
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)
    if all(p.is_cuda for p in params):
        # One fused kernel for all parameters: the per-parameter loop costs ~0.2 s per step at
        # SD3.5-medium full fine-tune on an H100 (bench/results/train_step_h100.md).
        return torch.optim.AdamW(groups, fused=True, **kw)
    # CPU: foreach=False, the same per-parameter arithmetic on every backend, so the fp32 parity
    # tests compare like with like.
    return torch.optim.AdamW(groups, foreach=False, **kw)


def lr_lambda(t: TrainConfig) -> Callable[[int], float]:
    """Multiplier of train.lr after `step` optimizer steps (LambdaLR convention)."""
    warm, total, floor = t.warmup_steps, t.steps, t.min_lr_ratio

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def resolve_grad_accum(t: TrainConfig, micro: int, world_size: int) -> int:
    """Micro-batches per optimizer step for micro-batches of ``micro`` (data.batch_size) samples.
    With train.global_batch_size > 0 the global batch is kept constant across world sizes:
    grad_accum = global / (micro * world), which must divide evenly."""
    gbs = t.global_batch_size
    if gbs <= 0:
        return t.grad_accum
    per_step = micro * world_size
    if gbs % per_step:
        raise ConfigError(
            f"config key 'train.global_batch_size': {gbs} is not divisible by data.batch_size "
            f"({micro}) x world size ({world_size}) = {per_step}; pick a global batch that is a "
            f"multiple of {per_step} or change data.batch_size")
    return gbs // per_step
