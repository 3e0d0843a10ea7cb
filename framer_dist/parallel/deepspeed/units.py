"""ZeRO-3 fetch units (docs/distributed.md, "ZeRO-3 fetch units").

DeepSpeed's own ``zero_optimization.leaf_module`` (classes, names or name suffixes; by default
the classes of the model's blocks, see ``config.build_ds_config``) makes each block one fetch
unit (one coalesced all-gather, one set of hooks) instead of one per Linear/norm. Two things this
module adds so that works and pays off:

* DeepSpeed reduces a leaf's gradients from a *full backward hook* on the leaf. When none of the
  leaf's inputs requires grad (the first block in control and LoRA modes: its inputs come from
  frozen embedders) torch fires that hook as soon as the gradient of the leaf's *outputs* exists,
  before any parameter gradient: DeepSpeed then fills ``param.grad`` with ``zeros_like`` of the
  released (0-element) parameter and the real gradient fails to accumulate ("The size of tensor
  a (0) must match ..."). :func:`guard_leaf_inputs` makes the smallest floating input of such a
  call require grad, so the hook fires after the block's backward as intended.
* ``parallel.zero3_persist_head``: the output head the FRAMER readout uses after every block
  stays gathered (DeepSpeed's persistent parameters), see :func:`persist_modules`.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn


def _leaf_input_needs_grad(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook of a ZeRO-3 leaf with trainable parameters: when grad is on and no
    floating tensor argument requires grad, replace the smallest one with a detached copy that
    does (no data copy). Its gradient is computed and dropped; the only cost is that the leaf's
    backward also computes input gradients (the frozen layers' dX) in that one call."""
    if not torch.is_grad_enabled():
        return None
    found = [(i, a) for i, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point()]
    if not found or any(a.requires_grad for _, a in found):
        return None
    i, a = min(found, key=lambda t: t[1].numel())
    out = list(args)
    out[i] = a.detach().requires_grad_(True)
    return tuple(out)


def guard_leaf_inputs(module: nn.Module) -> list[str]:
    """Register :func:`_leaf_input_needs_grad` (first in order, before DeepSpeed's own pre-hooks
    and before torch sets up the full backward hook) on every ZeRO-3 leaf module that holds
    trainable parameters. Returns the leaves' names."""
    from deepspeed.utils import z3_leaf_module

    names = []
    for n, m in module.named_modules():
        if z3_leaf_module(m):
            names.append(n)
            if any(p.requires_grad for p in m.parameters()):
                m.register_forward_pre_hook(_leaf_input_needs_grad, prepend=True)
    return names


def persist_modules(engine: Any, names: Iterable[str]) -> int:
    """Mark the parameters of the named submodules of ``engine.module`` as ZeRO-3 persistent, as
    DeepSpeed does for parameters under ``stage3_param_persistence_threshold``: gathered at the
    first use, never released between uses, partitioned for the optimizer step and gathered again
    right after it (one all-gather per step instead of one per use). Returns how many parameter
    elements became persistent (each rank then holds them in full)."""
    optimizer = engine.optimizer
    persistent = optimizer.persistent_parameters
    # the optimizer and the parameter coordinator share this list (stage3.py)
    assert persistent is optimizer.parameter_offload.persistent_parameters
    modules = dict(engine.module.named_modules())
    added = 0
    for name in names:
        for p in modules[name].parameters():
            if not p.ds_persist:
                p.ds_persist = True
                persistent.append(p)
                added += p.ds_numel
    return added
