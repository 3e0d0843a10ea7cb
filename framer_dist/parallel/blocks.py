"""The model's repeated blocks as the backends use them: FSDP2 units, ZeRO-3 fetch units,
activation-checkpointing and compile targets (the family exposes them as ``transformer_blocks``
or ``blocks``)."""

from __future__ import annotations

from torch import nn

from framer_dist.config import ConfigError, ParallelConfig


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (FSDP2 units, AC and compile targets): `transformer_blocks` or `blocks`."""
    for attr in ("transformer_blocks", "blocks"):
        blocks = getattr(model, attr, None)
        if isinstance(blocks, (nn.ModuleList, list, tuple)) and len(blocks) > 0:
            return list(blocks)
    return []


def block_classes(model: nn.Module) -> list[str]:
    """The blocks' classes as ``module.QualifiedName`` (DeepSpeed matches ``leaf_module`` classes
    by that or the bare name), each once, in model order: the ZeRO-3 fetch units."""
    return list(dict.fromkeys(f"{type(b).__module__}.{type(b).__qualname__}"
                              for b in transformer_blocks(model)))


def ac_indices(p: ParallelConfig, num_blocks: int) -> list[int]:
    """Which blocks recompute activations in backward, from parallel.activation_checkpointing."""
    if p.activation_checkpointing == "none":
        return []
    if p.activation_checkpointing == "all":
        return list(range(num_blocks))
    if p.activation_checkpointing == "every_k":
        return list(range(0, num_blocks, p.ac_every_k))
    bad = [i for i in p.ac_blocks if not -num_blocks <= i < num_blocks]
    if bad:
        raise ConfigError(f"config key 'parallel.ac_blocks': indices {bad} are out of range for a "
                          f"model with {num_blocks} blocks")
    return sorted({i % num_blocks for i in p.ac_blocks})


def apply_activation_checkpointing(p: ParallelConfig, model: nn.Module) -> list[int]:
    """Ask the model to checkpoint the chosen blocks (its own non-reentrant route, which keeps
    module names unchanged, unlike torch's checkpoint_wrapper)."""
    blocks = transformer_blocks(model)
    idx = ac_indices(p, getattr(model, "num_blocks", len(blocks)))
    if idx:
        if not hasattr(model, "set_activation_checkpointing"):
            raise ConfigError("config key 'parallel.activation_checkpointing': the model has no "
                              "set_activation_checkpointing(indices) method")
        model.set_activation_checkpointing(idx)
    return idx
