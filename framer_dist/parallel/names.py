"""Parameter names across the wrappers the backends add: the trainable set is remembered by
name (sharding replaces or partitions the parameter objects) and exported without wrapper
prefixes."""

from __future__ import annotations

from torch import nn


def trainable_names(model: nn.Module, params: list[nn.Parameter]) -> dict[int, str]:
    """``id(param) -> name`` (model order) for the parameters a backend will train; an empty list or
    a parameter the model does not own is an error."""
    if not params:
        raise ValueError("no trainable parameters were passed to the backend (check train.mode)")
    ids = {id(p) for p in params}
    names = {id(p): n for n, p in model.named_parameters() if id(p) in ids}
    if len(names) != len(params):
        raise ValueError("some trainable parameters passed to setup_backend are not parameters "
                         "of the model")
    return names


def strip_wrapper_prefixes(name: str) -> str:
    """Remove names added by wrappers (checkpoint_wrapper, torch.compile, DDP) from a parameter name."""
    name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
    return name[len("module."):] if name.startswith("module.") else name
